"""capsnet.data.mnist: IDX reading, finding and downloading MNIST, the real files and the
packaged sample.

Downloads are tested end to end against an HTTP server on 127.0.0.1 that serves the real
MNIST files (gzipped) or damaged copies of them."""
from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from capsnet.data import (
    FILE_NAMES,
    MNIST,
    SHA256,
    MNISTDownloadError,
    MNISTFormatError,
    MNISTNotFoundError,
    candidate_dirs,
    download_mnist,
    find_file,
    load_mnist,
    mnist as mnist_module,
    read_idx,
)


TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILE_NAMES


LABEL_FILES = (TRAIN_LABELS, TEST_LABELS)


IMAGE_FILES = (TRAIN_IMAGES, TEST_IMAGES)


# ----------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes holding ``array`` (magic 0x08NN by default)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_mnist(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small but valid set of the four files into ``folder``."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28)),
        TRAIN_LABELS: rng.integers(0, 10, n_train),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28)),
        TEST_LABELS: rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write(folder / f"{name}.gz", idx_bytes(array))
    return arrays


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> MNIST:
    return load_mnist(mnist_dir, download=False, progress=False)


def test_real_mnist_shapes_dtypes_and_labels(mnist, mnist_facts):
    n_train, n_test = mnist_facts["train"], mnist_facts["test"]
    assert mnist.train_images.shape == (n_train, 28, 28)
    assert mnist.train_labels.shape == (n_train,)
    assert mnist.test_images.shape == (n_test, 28, 28)
    assert mnist.test_labels.shape == (n_test,)
    assert mnist.train_images.dtype == np.uint8 and mnist.test_images.dtype == np.uint8
    assert mnist.train_labels.dtype == np.int64 and mnist.test_labels.dtype == np.int64
    for labels in (mnist.train_labels, mnist.test_labels):
        assert set(np.unique(labels).tolist()) == set(range(10))
    assert mnist.train_images.max() == 255 and mnist.train_images.min() == 0
    # Known facts of MNIST: the first training digit is a 5, the first test digit a 7.
    assert mnist.train_labels[0] == 5
    assert mnist.test_labels[0] == 7
    assert str(n_train) in repr(mnist)


def test_real_files_match_the_sha256_of_their_decompressed_content(mnist_dir, mnist_facts):
    for name in FILE_NAMES:
        path = find_file(name, [mnist_dir])
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        assert hashlib.sha256(data).hexdigest() == mnist_facts["sha256"][name], name


def test_sha256_table_matches_the_data_readme(mnist_dir):
    readme = mnist_dir / "README.md"
    if not readme.exists():
        pytest.skip(f"no README.md next to the MNIST files in {mnist_dir}")
    table = dict(re.findall(r"\|\s*([a-z0-9-]+-ubyte)\s*\|\s*([0-9a-f]{64})\s*\|", readme.read_text()))
    assert table == SHA256


# ------------------------------------------------------------ read_idx errors


def test_read_idx_reads_gzip_and_raw_alike(tmp_path, host_rng):
    images = host_rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    raw = read_idx(write(tmp_path / "a-idx3-ubyte", idx_bytes(images)), expect="images")
    packed = read_idx(write(tmp_path / "b-idx3-ubyte.gz", idx_bytes(images)))
    np.testing.assert_array_equal(raw, images)
    np.testing.assert_array_equal(packed, images)
    assert raw.dtype == np.uint8


def test_truncated_image_file(tmp_path):
    path = tmp_path / f"{TRAIN_IMAGES}.gz"
    write(path, idx_bytes(np.zeros((3, 28, 28)))[:16 + 1000])
    with pytest.raises(MNISTFormatError) as info:
        read_idx(path, expect="images")
    message = str(info.value)
    assert str(path) in message
    assert "truncated: header says 3x28x28 = 2352 bytes, file has 1000 bytes" in message


def test_truncated_label_file(tmp_path):
    path = tmp_path / TRAIN_LABELS
    write(path, idx_bytes(np.arange(10))[:8 + 7])
    with pytest.raises(MNISTFormatError, match=r"truncated: header says 10 bytes, file has 7 bytes") as info:
        read_idx(path, expect="labels")
    assert str(path) in str(info.value)


def test_over_long_file(tmp_path):
    path = write(tmp_path / f"{TEST_LABELS}.gz", idx_bytes(np.arange(10)) + b"\0\0")
    with pytest.raises(MNISTFormatError, match=r"too long: header says 10 bytes, file has 12 bytes"):
        read_idx(path, expect="labels")


def test_header_cut_short(tmp_path):
    path = write(tmp_path / "x.gz", idx_bytes(np.zeros((2, 28, 28)))[:9])
    with pytest.raises(MNISTFormatError, match=r"header needs 16 bytes for 3 dimensions, file has 9"):
        read_idx(path)
    path = write(tmp_path / "y", b"\0\0")
    with pytest.raises(MNISTFormatError, match=r"too short for the 4-byte IDX magic number"):
        read_idx(path)


def test_wrong_magic_number(tmp_path):
    path = write(tmp_path / f"{TRAIN_IMAGES}.gz", idx_bytes(np.arange(10)))  # a label file
    with pytest.raises(MNISTFormatError) as info:
        read_idx(path, expect="images")
    assert str(info.value) == (
        f"{path}: wrong magic number 0x00000801, expected 0x00000803 (an IDX image file)"
    )
    html = write(tmp_path / "page", b"<html>not found</html>")
    with pytest.raises(MNISTFormatError, match=r"wrong magic number 0x3C68746D, expected 0x000008NN"):
        read_idx(html)


def test_corrupted_gzip(tmp_path):
    packed = bytearray(gzip.compress(idx_bytes(np.arange(2000) % 10)))
    packed[len(packed) // 2] ^= 0xFF
    flipped = tmp_path / f"{TRAIN_LABELS}.gz"
    flipped.write_bytes(bytes(packed))
    with pytest.raises(MNISTFormatError, match=r"corrupted gzip") as info:
        read_idx(flipped, expect="labels")
    assert str(flipped) in str(info.value)

    cut = tmp_path / f"{TEST_LABELS}.gz"
    cut.write_bytes(bytes(packed[: len(packed) // 2]))
    with pytest.raises(MNISTFormatError, match=r"corrupted gzip: the compressed stream ends early"):
        read_idx(cut)

    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(np.arange(10)))
    with pytest.raises(MNISTFormatError, match=r"plain.gz: corrupted gzip"):
        read_idx(not_gzip)


def test_read_idx_rejects_an_unknown_expect(tmp_path):
    with pytest.raises(ValueError, match=r"'images', 'labels' or None, got 'image'"):
        read_idx(tmp_path / "whatever", expect="image")


# ---------------------------------------------------------- finding and loading


def test_candidate_dirs_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert candidate_dirs(tmp_path / "given") == [
        tmp_path / "given", tmp_path / "env", tmp_path / "xdg" / "capsnet" / "mnist",
    ]
    monkeypatch.delenv("CAPSNET_DATA_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert candidate_dirs() == [Path.home() / ".cache" / "capsnet" / "mnist"]


def test_load_mnist_from_small_files_gz_or_raw(isolated_env):
    folder = isolated_env / "data"
    arrays = fake_mnist(folder)
    # An uncompressed file is found as well as a .gz one.
    (folder / f"{TEST_LABELS}.gz").unlink()
    write(folder / TEST_LABELS, idx_bytes(arrays[TEST_LABELS]))
    data = load_mnist(folder, download=False, progress=False)
    np.testing.assert_array_equal(data.train_images, arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(data.train_labels, arrays[TRAIN_LABELS])
    np.testing.assert_array_equal(data.test_images, arrays[TEST_IMAGES])
    np.testing.assert_array_equal(data.test_labels, arrays[TEST_LABELS])
    assert data.train_labels.dtype == np.int64


def test_load_mnist_finds_files_through_the_environment(isolated_env, monkeypatch):
    fake_mnist(isolated_env / "env")
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(isolated_env / "env"))
    data = load_mnist(isolated_env / "empty", download=False, progress=False)
    assert data.train_images.shape == (6, 28, 28)


def test_image_label_count_mismatch(isolated_env):
    folder = isolated_env / "data"
    fake_mnist(folder)
    write(folder / f"{TRAIN_LABELS}.gz", idx_bytes(np.zeros(5)))
    with pytest.raises(MNISTFormatError) as info:
        load_mnist(folder, download=False)
    message = str(info.value)
    assert f"{folder / (TRAIN_IMAGES + '.gz')} has 6 images" in message
    assert f"{folder / (TRAIN_LABELS + '.gz')} has 5 labels" in message


def test_label_out_of_range(isolated_env):
    folder = isolated_env / "data"
    fake_mnist(folder)
    write(folder / f"{TEST_LABELS}.gz", idx_bytes([1, 2, 12, 3]))
    with pytest.raises(MNISTFormatError, match=r"labels must be digits 0\.\.9, found 12 at index 2"):
        load_mnist(folder, download=False)


def test_missing_files_without_download(isolated_env, monkeypatch):
    env_dir = isolated_env / "env"
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(env_dir))
    given = isolated_env / "given"
    fake_mnist(given)
    (given / f"{TEST_IMAGES}.gz").unlink()
    (given / f"{TEST_LABELS}.gz").unlink()
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(given, download=False)
    message = str(info.value)
    for folder in (given, env_dir, isolated_env / "xdg-cache" / "capsnet" / "mnist"):
        assert str(folder) in message
    assert f"{TEST_IMAGES}.gz" in message and f"{TEST_LABELS}.gz" in message
    assert TRAIN_IMAGES not in message  # only what is missing
    assert "--data-dir" in message and "CAPSNET_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------- downloads


def _mutated(gz: bytes) -> bytes:
    """The same file recompressed with one byte of its content changed."""
    data = bytearray(gzip.decompress(gz))
    data[-1] ^= 1  # a pixel, or a label that stays within 0..9
    return gzip.compress(bytes(data))


def _bad_gzip(gz: bytes) -> bytes:
    data = bytearray(gz)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


class _MirrorHandler(BaseHTTPRequestHandler):
    """/<mode>/<file>.gz: good, sha (content changed), badgzip, drop (half the body)."""

    def do_GET(self):  # noqa: N802  (http.server's name)
        self.server.requests.append(self.path)
        mode, _, filename = self.path.lstrip("/").partition("/")
        data = self.server.files.get(filename)
        if data is None or mode not in ("good", "sha", "badgzip", "drop"):
            self.send_error(404, "File not found")
            return
        data = {"sha": _mutated, "badgzip": _bad_gzip}.get(mode, bytes)(data)
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002
        pass


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _MirrorHandler)
        self.files = files
        self.requests: list[str] = []

    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-body are part of these tests


@pytest.fixture(scope="session")
def real_gz(mnist_dir) -> dict[str, bytes]:
    """The real files, gzip-compressed, keyed by their .gz name."""
    files = {}
    for name in FILE_NAMES:
        path = find_file(name, [mnist_dir])
        data = path.read_bytes()
        files[f"{name}.gz"] = data if path.suffix == ".gz" else gzip.compress(data, 1)
    return files


@pytest.fixture
def server(real_gz, isolated_env, mnist_facts, monkeypatch):
    # the download checks the content against the table of the files served (the subset's
    # own when the tests run on the shipped subset)
    monkeypatch.setattr(mnist_module, "SHA256", mnist_facts["sha256"])
    httpd = _MirrorServer(real_gz)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    assert host == "127.0.0.1"
    httpd.url = f"http://127.0.0.1:{port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_into_an_empty_folder_then_load(server, isolated_env, real_gz, mnist_facts):
    dest = isolated_env / "fresh"
    written = download_mnist(dest, mirrors=(f"{server.url}/good/",), progress=True)
    assert sorted(p.name for p in written) == sorted(f"{n}.gz" for n in FILE_NAMES)
    assert leftovers(dest) == sorted(f"{n}.gz" for n in FILE_NAMES)  # no temp files
    for name in FILE_NAMES:
        assert (dest / f"{name}.gz").read_bytes() == real_gz[f"{name}.gz"]
    data = load_mnist(dest, download=False, progress=False)
    assert data.train_images.shape == (mnist_facts["train"], 28, 28) and data.train_labels[0] == 5

    server.requests.clear()
    assert download_mnist(dest, mirrors=(f"{server.url}/good/",), progress=False) == []
    assert server.requests == []  # nothing missing, nothing fetched


def test_load_mnist_downloads_only_the_missing_files(server, isolated_env, mnist_dir):
    dest = isolated_env / "partial"
    dest.mkdir()
    for name in IMAGE_FILES:  # the big files are already there
        shutil.copy(find_file(name, [mnist_dir]), dest)
    data = load_mnist(dest, mirrors=(f"{server.url}/good",), progress=False)  # no trailing slash
    assert sorted(server.requests) == sorted(f"/good/{n}.gz" for n in LABEL_FILES)
    assert data.test_labels[0] == 7
    assert all((dest / f"{n}.gz").exists() for n in LABEL_FILES)


def test_checksum_mismatch_leaves_nothing_behind(server, isolated_env):
    dest = isolated_env / "dest"
    with pytest.raises(MNISTDownloadError) as info:
        download_mnist(dest, mirrors=(f"{server.url}/sha/",), progress=False, names=LABEL_FILES)
    message = str(info.value)
    assert f"{server.url}/sha/{TRAIN_LABELS}.gz: " in message
    assert "sha256 mismatch" in message and mnist_module.SHA256[TRAIN_LABELS] in message
    assert leftovers(dest) == []


def test_bad_mirrors_fall_through_to_a_good_one(server, isolated_env):
    dest = isolated_env / "dest"
    mirrors = tuple(f"{server.url}/{mode}/" for mode in ("missing", "sha", "badgzip", "drop", "good"))
    written = download_mnist(dest, mirrors=mirrors, progress=False, names=LABEL_FILES)
    assert [p.name for p in written] == [f"{n}.gz" for n in LABEL_FILES]
    assert leftovers(dest) == sorted(f"{n}.gz" for n in LABEL_FILES)
    for name in LABEL_FILES:
        assert [r for r in server.requests if name in r] == [f"/{m}/{name}.gz" for m in
                                                            ("missing", "sha", "badgzip", "drop", "good")]
    assert read_idx(dest / f"{TRAIN_LABELS}.gz", expect="labels")[0] == 5


def test_every_mirror_error_is_listed(server, isolated_env):
    dest = isolated_env / "dest"
    mirrors = tuple(f"{server.url}/{mode}/" for mode in ("missing", "badgzip"))
    with pytest.raises(MNISTDownloadError) as info:
        download_mnist(dest, mirrors=mirrors, progress=False, names=[TEST_LABELS])
    message = str(info.value)
    assert f"{server.url}/missing/{TEST_LABELS}.gz: HTTP 404" in message
    assert f"{server.url}/badgzip/{TEST_LABELS}.gz: " in message and "corrupted gzip" in message
    assert leftovers(dest) == []


def test_connection_dropped_mid_body(server, isolated_env):
    dest = isolated_env / "dest"
    with pytest.raises(MNISTDownloadError) as info:
        download_mnist(dest, mirrors=(f"{server.url}/drop/",), progress=True, names=[TRAIN_LABELS])
    message = str(info.value)
    size = len(server.files[f"{TRAIN_LABELS}.gz"])
    assert f"{server.url}/drop/{TRAIN_LABELS}.gz: " in message
    assert f"received {size // 2} of {size} bytes" in message or "IncompleteRead" in message
    assert leftovers(dest) == []


def test_unreachable_mirror_says_where_to_put_the_files(isolated_env):
    dest = isolated_env / "offline"
    url = f"http://127.0.0.1:{closed_port()}/mnist/"
    with pytest.raises(MNISTDownloadError) as info:
        load_mnist(dest, mirrors=(url,), progress=False)
    message = str(info.value)
    assert f"{url}{TRAIN_IMAGES}.gz: cannot connect" in message
    assert f"put them in {dest}" in message and "gzip-compressed or not" in message
    for name in FILE_NAMES:
        assert f"{name}.gz" in message
    assert "--data-dir" in message and "CAPSNET_DATA_DIR" in message
    assert isinstance(info.value, OSError)
    assert leftovers(dest) == []


def test_interrupted_download_removes_its_temp_file(server, isolated_env, monkeypatch):
    dest = isolated_env / "dest"
    seen = []

    def interrupt(path, remote, source):
        seen.extend(leftovers(dest))  # the temp file exists at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist_module, "_check_download", interrupt)
    with pytest.raises(KeyboardInterrupt):
        download_mnist(dest, mirrors=(f"{server.url}/good/",), progress=False, names=[TEST_LABELS])
    assert len(seen) == 1 and seen[0].endswith(".part")
    assert leftovers(dest) == []


def test_download_argument_errors(isolated_env):
    with pytest.raises(ValueError, match=r"at least one mirror"):
        download_mnist(isolated_env, mirrors=())
    with pytest.raises(ValueError, match=r"got train-images"):
        download_mnist(isolated_env, names=["train-images"])


def test_a_fresh_clone_reads_the_shipped_subset_without_setup(monkeypatch):
    """With CAPSNET_DATA_DIR unset the real-data tests use the sample installed with the package
    (they were skipped before it shipped), the same files load_mnist_sample reads."""
    from tests import conftest

    monkeypatch.delenv("CAPSNET_DATA_DIR", raising=False)
    assert conftest.mnist_path() == conftest.MNIST_SUBSET
    data = load_mnist(conftest.MNIST_SUBSET, download=False, progress=False)
    assert data.train_images.shape == (5000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert data.train_labels[0] == 5 and data.test_labels[0] == 7


def test_the_packaged_sample_loads_with_no_folder_searched(monkeypatch, tmp_path):
    """load_mnist_sample reads the package's own files: no $CAPSNET_DATA_DIR, no cache, no network."""
    from capsnet.data import SAMPLE_DIR, load_mnist_sample

    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    data = load_mnist_sample()
    assert data.train_images.shape == (5000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert sorted(np.unique(data.train_labels).tolist()) == list(range(10))
    assert not (tmp_path / "no-cache").exists()
    assert SAMPLE_DIR.parent == Path(mnist_module.__file__).resolve().parent  # inside the package


def test_an_incomplete_sample_names_the_missing_file_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist_module, "SAMPLE_DIR", tmp_path)
    with pytest.raises(MNISTNotFoundError, match=r"lacks train-images-idx3-ubyte.gz.*reinstall capsnet"):
        mnist_module.load_mnist_sample()
