"""Datasets for calibration and evaluation, behind one small API: load_split()."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cifar10 import load_cifar10, load_cifar10_with_source
from .fashion_mnist import load_fashion_mnist, load_fashion_mnist_with_source
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, LazyImages, list_imagefolder, load_images
from .paths import cache_dir, data_root
from ..errors import DataError

__all__ = [
    "DataError", "Split", "LazyImages", "load_split", "data_root", "cache_dir",
    "load_cifar10", "load_fashion_mnist", "list_imagefolder", "load_images",
    "DATASETS", "SPLITS", "PREPROCESSINGS",
]

DATASETS = ("cifar10", "fashion_mnist", "imagefolder")
SPLITS = ("calib", "test")
# Which preprocessings make sense for which dataset; the first is the default.
PREPROCESSINGS = {
    "cifar10": ("cifar",),
    "fashion_mnist": ("fmnist",),
    "imagefolder": ("imagenet", "tf_inception"),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
# Test splits of image folders larger than this are decoded batch by batch while evaluating
# (LazyImages) instead of held in memory (0.6 MB per 224x224 image).
EAGER_TEST_IMAGES = 5000
# Sub-folders of a data root (see ../shared/data/README.md) that hold each dataset.
_ROOT_SUBDIR = {"cifar10": Path("cifar10"), "imagefolder": Path("imagenet") / "samples"}


@dataclass
class Split:
    """One split of a dataset, preprocessed: in memory, or (large image-folder test splits)
    decoded per slice."""

    x: torch.Tensor | LazyImages  # float32, preprocessed, NCHW
    y: torch.Tensor  # int64 class indices
    description: str  # where it came from, e.g. "CIFAR-10 test.npz (10000 images)"

    def __len__(self) -> int:
        return len(self.y)


def load_split(
    dataset: str,
    split: str,
    data: str | Path | None = None,
    preprocess: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Split:
    """Load the "calib" or "test" split of `dataset`, preprocessed.

    calib comes from the training images and test from the test images, so they never overlap
    (a single image folder is cut into two fixed halves instead). `data` is the dataset's folder or
    the data root holding it; None means data_root(). `preprocess` defaults to the dataset's own.
    `limit` keeps a random subset: of calib drawn with `seed`, of test a fixed one (seed 0).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    preprocess = preprocess or PREPROCESSINGS[dataset][0]
    if preprocess not in PREPROCESSINGS[dataset]:
        raise DataError(f"preprocessing {preprocess!r} does not apply to {dataset}; use one of {PREPROCESSINGS[dataset]}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")
    if data is not None and (str(data) == "" or not Path(data).expanduser().exists()):
        raise DataError(f"data path {str(data)!r} does not exist")

    if dataset == "cifar10":
        folder = _dataset_dir(data, dataset)
        x, y, source = load_cifar10_with_source(folder, "train" if split == "calib" else "test")
        keep, note = _select(len(y), split, limit, seed, what=f"CIFAR-10 {source}")
        return Split(_cifar_tensor(x[keep]), torch.from_numpy(y[keep]), f"CIFAR-10 {source} ({note})")
    if dataset == "fashion_mnist":
        root = data_root(data)
        x, y, folder = load_fashion_mnist_with_source(root, "train" if split == "calib" else "test")
        keep, note = _select(len(y), split, limit, seed, what=f"Fashion-MNIST {split}")
        name = "train" if split == "calib" else "t10k"
        return Split(_fmnist_tensor(x[keep]), torch.from_numpy(y[keep]), f"Fashion-MNIST {folder}/{name} ({note})")
    return _load_imagefolder(_dataset_dir(data, dataset), split, preprocess, limit, seed)


def _dataset_dir(data: str | Path | None, dataset: str) -> Path:
    """The dataset's own folder: `data` itself, or its standard sub-folder when `data` is a data root."""
    root = data_root(data)
    nested = root / _ROOT_SUBDIR[dataset]
    return nested if nested.is_dir() else root


def _select(n: int, split: str, limit: int | None, seed: int, what: str) -> tuple[np.ndarray, str]:
    """Indices to keep out of n, and a short note on them for Split.description."""
    if n == 0:
        raise DataError(f"{what} holds no samples")
    if limit is None or limit >= n:
        if limit is not None and limit > n:
            warnings.warn(f"{what}: asked for {limit} {split} samples but only {n} exist; using all {n}", stacklevel=3)
        return np.arange(n), f"{n} images"
    if split == "calib":
        return np.random.default_rng(seed).permutation(n)[:limit], f"{limit} of {n} images, random subset seed {seed}"
    # The test subset is random too (files such as test.npz are sorted by class, so the first N would
    # hold few classes) but fixed, so that every run and every method is scored on the same images.
    return np.sort(np.random.default_rng(0).permutation(n)[:limit]), f"{limit} of {n} images, fixed random subset"


def _load_imagefolder(root: Path, split: str, preprocess: str, limit: int | None, seed: int) -> Split:
    if (root / "train").is_dir() and (root / "val").is_dir():
        _check_same_classes(root / "train", root / "val")
        sub = root / ("train" if split == "calib" else "val")
        paths, labels = list_imagefolder(sub)
        keep, note = _select(len(paths), split, limit, seed, what=str(sub))
        description = f"image folder {sub} ({note})"
    else:
        # One folder only: cut it into two fixed halves (seed 0, whatever `seed` is) so that the
        # calibration images are never evaluated, and every run evaluates on the same images.
        paths, labels = list_imagefolder(root)
        order = np.random.default_rng(0).permutation(len(paths))
        n_calib = len(paths) // 2
        half = order[:n_calib] if split == "calib" else order[n_calib:]
        if len(half) == 0:
            raise DataError(f"image folder {root} has too few images ({len(paths)}) to split into calib and test")
        keep, note = _select(len(half), split, limit, seed, what=f"{root} {split} half")
        keep = half[keep]
        description = (
            f"image folder {root}: calibrate on {n_calib}, evaluate on the other {len(paths) - n_calib} "
            f"(fixed split); {split}: {note}"
        )
    files = [paths[i] for i in keep]
    y = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    if split == "test" and len(files) > EAGER_TEST_IMAGES:
        return Split(LazyImages(files, preprocess), y, f"{description}, {preprocess} preprocessing, decoded per batch")
    return Split(load_images(files, preprocess), y, f"{description}, {preprocess} preprocessing")


def _check_same_classes(train: Path, val: Path) -> None:
    """Labels are sorted class-folder positions, so train/ and val/ must hold the same class folders."""
    train_classes, val_classes = ({p.name for p in d.iterdir() if p.is_dir()} for d in (train, val))
    if train_classes != val_classes:
        raise DataError(f"{train} and {val} hold different class folders, so their labels would not match")


def _cifar_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, x/255 normalised with the ImageNet mean/std (as the CIFAR ResNets were trained)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return t.sub_(mean).div_(std).contiguous()


def _fmnist_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28], x/255 normalised with the Fashion-MNIST mean/std."""
    return torch.from_numpy(x).unsqueeze(1).float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)
