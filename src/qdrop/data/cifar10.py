"""CIFAR-10 from local .npz files, the official python batches, or the official tarball."""

from __future__ import annotations

import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .download import download
from ..errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"

_NPZ_NAMES = {"train": ("train_subset.npz", "train.npz"), "test": ("test.npz",)}
_BATCH_NAMES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,32,32,3] (RGB, HWC) and labels int64 [N] of the "train" or "test" split."""
    x, y, _ = load_cifar10_with_source(root, split)
    return x, y


def load_cifar10_with_source(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Like load_cifar10, plus the name of the file(s) the images came from."""
    if split not in _NPZ_NAMES:
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    for name in _NPZ_NAMES[split]:
        if (root / name).is_file():
            x, y = _read_npz(root / name)
            return x, y, name
    batches = root / BATCHES_DIR
    if not batches.is_dir():
        try:
            _download_batches(root)
        except (OSError, tarfile.TarError) as err:
            looked_for = ", ".join(_NPZ_NAMES[split]) + f" or {BATCHES_DIR}/"
            raise DataError(
                f"CIFAR-10 {split} data not found in {root} (looked for {looked_for}) "
                f"and downloading {URL} failed: {err}"
            ) from err
    x, y = _read_batches(batches, _BATCH_NAMES[split])
    return x, y, f"{BATCHES_DIR}/{_BATCH_NAMES[split][0]}" + ("..5" if split == "train" else "")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise DataError(f"{path} must hold arrays 'x' and 'y', has {sorted(f.files)}")
        x, y = f["x"], f["y"].astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise DataError(f"{path}: expected x uint8 [N,32,32,3] and y [N], got x {x.dtype} {x.shape}, y {y.shape}")
    return x, y


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 batch {path} is missing")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        # Rows are 3072 bytes: the R, G and B planes of a 32x32 image one after another.
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _download_batches(root: Path) -> None:
    """Fetch the official tarball and unpack it into root/cifar-10-batches-py atomically."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        download(URL, archive, md5=MD5)
    # Unpack next to the destination, then rename: a crash never leaves a half-filled batches folder.
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-extract-") as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths and links out of tmp (Python >= 3.10.12).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        extracted = Path(tmp) / BATCHES_DIR
        if not extracted.is_dir():
            raise OSError(f"{archive} does not contain {BATCHES_DIR}/")
        try:
            extracted.rename(root / BATCHES_DIR)
        except OSError:
            if not (root / BATCHES_DIR).is_dir():  # someone else finishing first is fine
                raise
    archive.unlink(missing_ok=True)
