"""ImageNet-style folders (root/<class>/<image>) and the two standard ImageNet preprocessings."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..distributed import is_main  # under torchrun, rank 0 alone shows progress
from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224
IMAGE_PREPROCESSINGS = ("tf_inception", "imagenet")


def list_imagefolder(root: str | Path) -> tuple[list[Path], list[int]]:
    """Image files under root/<class>/ and their labels; the label is the class folder's sorted position."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                paths.append(file)
                labels.append(label)
    if not paths:
        raise DataError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
    return paths, labels


def load_images(paths: list[Path], preprocess: str, progress: bool = True) -> torch.Tensor:
    """Decode and preprocess images into a float32 tensor [N,3,224,224].

    "tf_inception": short side 256 (bicubic), center crop 224, (x - 127) / 128 with x in 0..255
    (the TensorFlow EfficientNet-Lite convention). "imagenet": short side 256 (bilinear), center
    crop 224, x / 255 normalised with the ImageNet mean/std (the torchvision convention).
    Images are decoded on a few threads (PIL releases the GIL while decoding and resizing).
    """
    _check_preprocess(preprocess)
    from PIL import Image  # optional dependency (qdrop[vision]); only image folders need it

    resample = Image.Resampling.BICUBIC if preprocess == "tf_inception" else Image.Resampling.BILINEAR

    def decode(path):
        try:
            with Image.open(path) as image:
                return _resize_crop(image.convert("RGB"), resample)
        except OSError as err:
            raise DataError(f"cannot decode image {path}: {err}") from err

    out = torch.empty(len(paths), 3, CROP, CROP)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = pool.map(decode, paths)
        for i, pixels in enumerate(tqdm(decoded, total=len(paths), desc="decoding images", unit="img", leave=False,
                                        disable=not progress or not is_main())):
            out[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    if preprocess == "tf_inception":
        return out.sub_(127.0).div_(128.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return out.div_(255.0).sub_(mean).div_(std)


class LazyImages:
    """Images decoded when sliced, for evaluation sets too large to hold preprocessed: ImageNet's
    50,000 validation images are 30 GB as float32 [3,224,224] tensors. Evaluation code slices
    it batch by batch (x[i:i+b]) exactly as it slices an in-memory tensor."""

    def __init__(self, paths: list[Path], preprocess: str):
        _check_preprocess(preprocess)
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple:
        return (len(self.paths), 3, CROP, CROP)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return load_images(self.paths[index], self.preprocess, progress=False)
        if isinstance(index, (int, np.integer)):
            return load_images([self.paths[index]], self.preprocess, progress=False)[0]
        raise TypeError(f"LazyImages takes an int or a slice, not {type(index).__name__}")


def _check_preprocess(preprocess: str) -> None:
    if preprocess not in IMAGE_PREPROCESSINGS:
        raise DataError(f"unknown image preprocessing {preprocess!r}; expected one of {IMAGE_PREPROCESSINGS}")


def _resize_crop(image, resample) -> np.ndarray:
    """Resize the short side to 256 then take the central 224x224 (sizes rounded as torchvision does)."""
    w, h = image.size
    scale = RESIZE / min(w, h)
    size = (RESIZE, int(h * scale)) if w <= h else (int(w * scale), RESIZE)
    if size != (w, h):
        image = image.resize(size, resample)
    w, h = image.size
    left, top = int(round((w - CROP) / 2.0)), int(round((h - CROP) / 2.0))
    return np.asarray(image.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
