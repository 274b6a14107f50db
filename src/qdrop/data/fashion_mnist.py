"""Fashion-MNIST from IDX files: a local folder, the Debian package, or the official download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .download import download
from .paths import cache_dir
from ..errors import DataError

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Where the Debian/Ubuntu package dataset-fashion-mnist installs the files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# md5 of the official .gz files (same values torchvision checks).
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_PREFIX = {"train": "train", "test": "t10k"}
# IDX magic numbers (big-endian int32): 0x0000 08 0d = uint8 elements (08), d dimensions.
_IMAGES_MAGIC = 0x0803
_LABELS_MAGIC = 0x0801


def load_fashion_mnist(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,28,28] and labels int64 [N] of the "train" or "test" split."""
    x, y, _ = load_fashion_mnist_with_source(root, split)
    return x, y


def load_fashion_mnist_with_source(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """Like load_fashion_mnist, plus the folder the files came from."""
    if split not in _PREFIX:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    names = (f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte")
    folders = [Path(root) / "fashion-mnist", Path(root)] if root is not None else []
    target = cache_dir() / "fashion-mnist"
    folders += [SYSTEM_DIR, target]
    for folder in folders:
        images, labels = (_find(folder, name) for name in names)
        if images and labels:
            return *_read_pair(images, labels), folder
    try:
        for name in names:
            download(URL + name + ".gz", target / (name + ".gz"), md5=MD5[name + ".gz"])
    except OSError as err:
        searched = ", ".join(str(f) for f in folders)
        raise DataError(
            f"Fashion-MNIST {split} files ({names[0]}[.gz], {names[1]}[.gz]) not found in {searched}, "
            f"and downloading them from {URL} failed ({err}). "
            "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`."
        ) from err
    return *_read_pair(target / (names[0] + ".gz"), target / (names[1] + ".gz")), target


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images_path, _IMAGES_MAGIC)
    y = _read_idx(labels_path, _LABELS_MAGIC).astype(np.int64)
    if x.shape[1:] != (28, 28) or len(x) != len(y):
        raise DataError(f"{images_path} / {labels_path}: expected [N,28,28] images and N labels, got {x.shape}, {y.shape}")
    return x, y


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip raises these for truncated/corrupt archives
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    # Header: two zero bytes, type code 0x08 (uint8), number of dimensions, then one big-endian uint32 per dimension.
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic != expected_magic:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} (corrupt or wrong file?)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()
