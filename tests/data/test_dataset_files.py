"""Fashion-MNIST, CIFAR-10, SVHN and smallNORB: each reader round-trips files written in
its true format, a damaged file gets one line naming it and what is wrong, the offline
error names the files and folders, and the shared fetcher downloads from an HTTP server
on 127.0.0.1 (checksums checked, nothing half-written left in the cache)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from capsnet.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    DownloadError,
    cifar10,
    fashion_mnist,
    load_cifar10,
    load_fashion_mnist,
    load_smallnorb,
    load_svhn,
    smallnorb,
    svhn,
)
from capsnet.data import files as fetcher
from capsnet.data.mnist import FILE_NAMES
from tests.data.dataset_files import (
    cifar_records,
    idx_bytes,
    norb_bytes,
    write_cifar10,
    write_fashion_mnist,
    write_smallnorb,
    write_svhn,
)

LOADERS = {"fashion-mnist": (load_fashion_mnist, write_fashion_mnist, fashion_mnist),
           "cifar10": (load_cifar10, write_cifar10, cifar10), "svhn": (load_svhn, write_svhn, svhn),
           "smallnorb": (load_smallnorb, write_smallnorb, smallnorb)}


def same(got, wrote: dict[str, np.ndarray]) -> None:
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(got, key), wrote[key], err_msg=key)
    assert got.train_labels.dtype == np.int64 and got.train_images.dtype == np.uint8


# -------------------------------------------------------------------- round trips


def test_fashion_mnist_round_trips_gzipped_and_plain(isolated_env):
    folder = isolated_env / "fashion"
    wrote = write_fashion_mnist(folder)
    same(load_fashion_mnist(folder, download=False), wrote)
    for name in FILE_NAMES:  # uncompressed copies are read too
        (folder / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))
        (folder / f"{name}.gz").unlink()
    data = load_fashion_mnist(folder, download=False)
    same(data, wrote)
    assert data.classes[0] == "T-shirt/top" and data.train_images.shape == (6, 28, 28)


def test_cifar10_round_trips_the_archive_and_the_unpacked_folder(isolated_env):
    wrote = write_cifar10(isolated_env / "packed")
    data = load_cifar10(isolated_env / "packed", download=False)
    same(data, wrote)
    assert data.train_images.shape == (10, 3, 32, 32) and data.classes == cifar10.CLASSES
    assert (isolated_env / "packed" / cifar10.ARCHIVE).read_bytes()[:2] == b"\x1f\x8b"  # gzip, as served
    wrote = write_cifar10(isolated_env / "unpacked", packed=False, seed=3)
    same(load_cifar10(isolated_env / "unpacked", download=False), wrote)


def test_cifar10_record_layout_is_label_then_red_green_blue_planes():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 0, 0, 1], image[0, 1, 0, 0], image[0, 2, 31, 31] = 11, 22, 33
    data = cifar_records(image, np.array([7]))
    assert len(data) == cifar10.RECORD_BYTES == 3073
    assert data[0] == 7 and data[1 + 1] == 11 and data[1 + 1024] == 22 and data[-1] == 33
    images, labels = cifar10.read_cifar10_records(data, "x")
    np.testing.assert_array_equal(images, image)
    assert labels.tolist() == [7]


def test_svhn_round_trips_with_ten_for_the_digit_zero(isolated_env):
    pytest.importorskip("scipy")
    folder = isolated_env / "svhn"
    wrote = write_svhn(folder)
    data = load_svhn(folder, download=False)
    same(data, wrote)
    assert 0 in data.train_labels.tolist() and data.train_images.shape == (5, 3, 32, 32)


def test_smallnorb_round_trips_the_stereo_pairs_labels_and_info(isolated_env):
    folder = isolated_env / "norb"
    wrote = write_smallnorb(folder)
    data = load_smallnorb(folder, download=False)
    same(data, wrote)
    np.testing.assert_array_equal(data.extra["train_info"], wrote["train_info"])
    np.testing.assert_array_equal(data.extra["test_info"], wrote["test_info"])
    assert data.train_images.shape == (6, 2, 96, 96) and data.classes == smallnorb.CLASSES
    # the header: little-endian magic 0x1E3D4C54, ndim 1, three sizes for a 1-D int32 matrix
    cat = gzip.decompress((folder / smallnorb.file_name("training", "cat")).read_bytes())
    assert cat[:4] == bytes.fromhex("544c3d1e") and len(cat) == 20 + 4 * 6
    write_smallnorb(isolated_env / "plain", compressed=False)  # uncompressed copies are read too
    same(load_smallnorb(isolated_env / "plain", download=False), wrote)


# ------------------------------------------------------------------ damaged files


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_fashion_mnist_damaged_files(isolated_env):
    folder = isolated_env / "f"
    write_fashion_mnist(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-5]))
    with pytest.raises(DatasetFormatError) as info:
        load_fashion_mnist(folder, download=False)
    assert str(images) in _one_line(info) and "truncated" in str(info.value)
    write_fashion_mnist(folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes([1, 2, 10, 3])))
    with pytest.raises(DatasetFormatError, match=r"labels must be 0\.\.9, found 10 at index 2") as info:
        load_fashion_mnist(folder, download=False)
    assert str(labels) in _one_line(info)
    labels.write_bytes(gzip.compress(idx_bytes([1, 2, 3, 4], magic=0x0803)))
    with pytest.raises(DatasetFormatError, match=r"wrong magic number 0x00000803") as info:
        load_fashion_mnist(folder, download=False)
    _one_line(info)


def test_mnist_files_are_not_taken_for_fashion_mnist(mnist_dir):
    """The two share file names; a folder of MNIST given for Fashion-MNIST is refused."""
    with pytest.raises(DatasetFormatError, match=r"holds MNIST's training labels, not Fashion-MNIST's") as info:
        load_fashion_mnist(mnist_dir, download=False)
    _one_line(info)


@pytest.mark.parametrize("packed", [True, False])
def test_cifar10_damaged_files(isolated_env, packed):
    folder = isolated_env / "c"
    good = cifar_records(np.zeros((2, 3, 32, 32), np.uint8), np.array([1, 2]))
    write_cifar10(folder, packed=packed, members={"data_batch_3.bin": good[:-100]})
    with pytest.raises(DatasetFormatError, match=r"data_batch_3\.bin: truncated .*not a whole number of 3073-byte"
                       ) as info:
        load_cifar10(folder, download=False)
    _one_line(info)
    write_cifar10(folder, packed=packed, members={"test_batch.bin": cifar_records(
        np.zeros((3, 3, 32, 32), np.uint8), np.array([1, 12, 2]))})
    with pytest.raises(DatasetFormatError, match=r"test_batch\.bin: labels .* must be 0\.\.9, found 12 at index 1"
                       ) as info:
        load_cifar10(folder, download=False)
    _one_line(info)


def test_cifar10_truncated_archive(isolated_env):
    folder = isolated_env / "c"
    write_cifar10(folder)
    archive = folder / cifar10.ARCHIVE
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetFormatError, match=r"damaged or truncated archive") as info:
        load_cifar10(folder, download=False)
    assert str(archive) in _one_line(info)


def test_svhn_damaged_files(isolated_env):
    pytest.importorskip("scipy")
    folder = isolated_env / "s"
    write_svhn(folder, labels=(np.array([1, 2, 3, 11, 4]), np.array([1, 2, 3])))
    with pytest.raises(DatasetFormatError, match=r"train_32x32\.mat: labels must be 1\.\.10.*found 10 at index 3"
                       ) as info:
        load_svhn(folder, download=False)
    _one_line(info)
    write_svhn(folder)
    test = folder / svhn.TEST_FILE
    test.write_bytes(test.read_bytes()[:300])
    with pytest.raises(DatasetFormatError, match=r"test_32x32\.mat: not a readable MATLAB file") as info:
        load_svhn(folder, download=False)
    _one_line(info)


def test_smallnorb_damaged_files(isolated_env):
    folder = isolated_env / "n"
    cat = smallnorb.file_name("training", "cat")
    write_smallnorb(folder, replace={"training-cat": norb_bytes(np.array([0, 1, 7, 2, 3, 4]))})
    with pytest.raises(DatasetFormatError, match=r"categories must be 0\.\.4, found 7 at index 2") as info:
        load_smallnorb(folder, download=False)
    assert cat in _one_line(info)
    write_smallnorb(folder, replace={"testing-dat": norb_bytes(np.zeros((4, 2, 96, 96), np.uint8))[:-7]})
    with pytest.raises(DatasetFormatError, match=r"testing-dat\.mat\.gz: truncated: header says 4x2x96x96 uint8"
                       ) as info:
        load_smallnorb(folder, download=False)
    _one_line(info)
    write_smallnorb(folder, replace={"training-info": norb_bytes(np.zeros((6, 4), np.int32), magic=0x1E3D4C50)})
    with pytest.raises(DatasetFormatError, match=r"training-info\.mat\.gz: wrong magic number 0x1E3D4C50") as info:
        load_smallnorb(folder, download=False)
    _one_line(info)
    write_smallnorb(folder, replace={"training-info": norb_bytes(np.zeros((5, 4), np.int32))})
    with pytest.raises(DatasetFormatError, match=r"image and label counts differ.*has 6 images .* has 5 labels"):
        load_smallnorb(folder, download=False)


# ------------------------------------------------------------------------- offline


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_offline_error_names_the_files_and_where_to_put_them(isolated_env, monkeypatch, name):
    if name == "svhn":
        pytest.importorskip("scipy", reason="SVHN's reader needs scipy (the svhn extra) before it looks for files")
    load, _, module = LOADERS[name]
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(isolated_env / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load(isolated_env / "given", download=False)
    message = str(info.value)
    for remote in module.FILES.files:
        assert remote.name in message
    folder = module.FILES.folder
    for where in (isolated_env / "given", isolated_env / "env" / folder, isolated_env / "xdg-cache" / "capsnet" /
                  folder):
        assert str(where) in message
    assert "--data-dir" in message and isinstance(info.value, FileNotFoundError)


# ------------------------------------------------------------------------ downloads


class _Handler(BaseHTTPRequestHandler):
    """/good/<file>, /bad/<file> (one byte changed), /drop/<file> (half the body, then hang up)."""

    def do_GET(self):  # noqa: N802  (http.server's name)
        self.server.requests.append(self.path)
        mode, _, name = self.path.lstrip("/").partition("/")
        data = self.server.files.get(name)
        if data is None or mode not in ("good", "bad", "drop"):
            self.send_error(404, "File not found")
            return
        if mode == "bad":
            data = data[:-1] + bytes([data[-1] ^ 1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if mode == "drop" else data)
        if mode == "drop":
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-body are part of these tests


@pytest.fixture
def serve(isolated_env, monkeypatch):
    """serve(name) -> (base URL, the arrays written, the server): a server on 127.0.0.1 with
    the files of ``name`` written by the tests; the dataset's FileSet points at it and
    carries those files' sha256."""
    servers = []

    def start(name: str) -> tuple[str, dict[str, np.ndarray], _Server]:
        load, write, module = LOADERS[name]
        source = isolated_env / f"{name}-served"
        wrote = write(source)
        served = {p.name: p.read_bytes() for p in source.iterdir()}
        remotes = tuple(dataclasses.replace(r, sha256=hashlib.sha256(served[r.name]).hexdigest())
                        for r in module.FILES.files)
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.files, httpd.requests = served, []
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.setattr(module, "FILES", dataclasses.replace(module.FILES, files=remotes,
                                                                 mirrors=(f"{url}/good/",)))
        return url, wrote, httpd

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_download_on_first_use_into_the_cache(serve, isolated_env, name):
    if name == "svhn":
        pytest.importorskip("scipy")
    url, wrote, httpd = serve(name)
    load, _, module = LOADERS[name]
    same(load(progress=False), wrote)  # nothing anywhere: downloaded into the per-user cache
    cache = isolated_env / "xdg-cache" / "capsnet" / module.FILES.folder
    assert leftovers(cache) == sorted(r.name for r in module.FILES.files)
    httpd.requests.clear()
    same(load(progress=False), wrote)
    assert httpd.requests == []  # found in the cache: nothing fetched


def test_a_wrong_checksum_is_refused_and_nothing_half_written_stays(serve, isolated_env):
    url, _, httpd = serve("smallnorb")
    dest = isolated_env / "dest"
    mirrors = (f"{url}/bad/", f"{url}/drop/")
    with pytest.raises(DownloadError) as info:
        load_smallnorb(dest, mirrors=mirrors, progress=False)
    message = str(info.value)
    first = smallnorb.file_name("training", "dat")
    assert f"{url}/bad/{first}: sha256 mismatch for {first}: got " in message
    assert f"{url}/drop/{first}: " in message and ("received" in message or "IncompleteRead" in message)
    assert f"put them in {dest}" in message and "$CAPSNET_DATA_DIR/smallnorb" in message
    assert leftovers(dest) == []  # no .part file, no unverified file
    # a good mirror after the bad ones: every file arrives, verified
    load_smallnorb(dest, mirrors=(*mirrors, f"{url}/good/"), progress=False)
    assert leftovers(dest) == sorted(r.name for r in smallnorb.FILES.files)


def test_a_download_that_verifies_but_does_not_parse_is_refused(serve, isolated_env, monkeypatch):
    url, _, httpd = serve("cifar10")
    archive = cifar10.ARCHIVE
    httpd.files[archive] = httpd.files[archive][:1000]  # a cut archive whose sha256 the table carries
    monkeypatch.setattr(cifar10, "FILES", dataclasses.replace(cifar10.FILES, files=(dataclasses.replace(
        cifar10.FILES.files[0], sha256=hashlib.sha256(httpd.files[archive]).hexdigest()),)))
    with pytest.raises(DownloadError, match=r"damaged or truncated archive"):
        load_cifar10(isolated_env / "dest", progress=False)
    assert leftovers(isolated_env / "dest") == []


def test_the_official_file_tables(isolated_env):
    """The names and hosts of the official distributions, and a sha256 for every file."""
    assert [r.name for r in fashion_mnist.FILES.files] == [f"{n}.gz" for n in FILE_NAMES]
    assert [r.name for r in cifar10.FILES.files] == ["cifar-10-binary.tar.gz"]
    assert [r.name for r in svhn.FILES.files] == ["train_32x32.mat", "test_32x32.mat"]
    assert smallnorb.file_name("testing", "dat") == "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz"
    for module in (fashion_mnist, cifar10, svhn, smallnorb):
        assert all(len(r.sha256) == 64 and int(r.sha256, 16) >= 0 for r in module.FILES.files)
        assert module.FILES.mirrors and all(m.startswith("http") for m in module.FILES.mirrors)
    assert fetcher.cache_dir("svhn") == isolated_env / "xdg-cache" / "capsnet" / "svhn"
