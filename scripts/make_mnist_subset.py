"""Write the MNIST sample that ships in the package (capsnet/data/mnist_sample), from the full files.

The first 5,000 training and the first 1,000 test images with their labels, in the
IDX format (the count in each header changed, nothing else), gzip -9 with no time
stamp, so the output is the same bytes on every run. The sha256 of each decompressed
file goes into the folder's README.md table, beside the full set's.

Usage: python scripts/make_mnist_subset.py FULL_MNIST_DIR [--out capsnet/data/mnist_sample]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capsnet.data.mnist import FILE_NAMES, SHA256, find_file  # noqa: E402

COUNTS = {"train": 5000, "t10k": 1000}

README = """# The MNIST sample shipped with capsnet

The first {train} training and the first {test} test images of MNIST, with their labels, in
the standard IDX format (gzip-compressed), installed with the package as data. It is what
`python -m capsnet.train --dataset mnist-sample` and `capsnet.data.load_mnist_sample()` read,
with no download, and what the tests and tutorials train on. It is a sample, not MNIST:
accuracies measured on it are not MNIST's. The tests use it when `CAPSNET_DATA_DIR` is not
set; set `CAPSNET_DATA_DIR` to a folder with the four full files to run them on all of MNIST.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges, distributed under the
Creative Commons Attribution-Share Alike 3.0 licence (CC BY-SA 3.0); this subset is shared
under the same licence. Written by `python scripts/make_mnist_subset.py FULL_MNIST_DIR`,
which cuts the files below from the full ones (only the count in each header changes).

Subset, sha256 of each decompressed file:

| file (decompressed)        | images | sha256 |
|----------------------------|-------:|--------|
{subset}

Cut from the full files with these sha256 (as in `capsnet.data.mnist.SHA256`):

| full file (decompressed)   | sha256 |
|----------------------------|--------|
{full}
"""


def cut(raw: bytes, n: int) -> bytes:
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    if dims[0] < n:
        raise SystemExit(f"the full file holds {dims[0]} items, fewer than {n}")
    item = 1
    for d in dims[1:]:
        item *= d
    start = 4 + 4 * ndim
    return raw[:4] + struct.pack(">" + "I" * ndim, n, *dims[1:]) + raw[start:start + n * item]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/make_mnist_subset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("full_dir", type=Path, help="folder with the four full MNIST files")
    p.add_argument("--out", type=Path, default=REPO / "capsnet" / "data" / "mnist_sample")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    subset_rows, full_rows = [], []
    for name in FILE_NAMES:
        path = find_file(name, [args.full_dir])
        if path is None:
            raise SystemExit(f"{name}(.gz) not found in {args.full_dir}")
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        if hashlib.sha256(raw).hexdigest() != SHA256[name]:
            raise SystemExit(f"{path} is not the standard MNIST file (sha256 differs)")
        n = COUNTS[name.split("-")[0]]
        out = cut(raw, n)
        (args.out / f"{name}.gz").write_bytes(gzip.compress(out, 9, mtime=0))
        subset_rows.append(f"| {name:<26} | {n:>6} | {hashlib.sha256(out).hexdigest()} |")
        full_rows.append(f"| {name:<26} | {SHA256[name]} |")
    (args.out / "README.md").write_text(README.format(train=f"{COUNTS['train']:,}", test=f"{COUNTS['t10k']:,}",
                                                      subset="\n".join(subset_rows), full="\n".join(full_rows)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
