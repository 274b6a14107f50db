"""A small copy of the CIFAR-10 folder that reproduces seed-`--seed` runs exactly, for a lent GPU machine.

Such a machine gets only the working tree and carried paths, 64 MiB in all; the tree (~10 MB) and the shared
folder's three files (58 MB) do not fit together. The calibration split of a run is `--calib` images drawn
from train_subset.npz with the run's seed; this writes those images alone, in the order they are drawn, so that
loading all of them gives the same tensors (for that seed and calibration size only), beside test.npz and the
ResNet weights. 1,024 calibration images: 2.9 MB instead of 28 MB.

    python benchmarks/compact_cifar.py ../shared/data/cifar10 gpu_carry/cifar10 [--calib 1024] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from qdrop.data import _select  # the draw load_split makes, so the two cannot drift apart
from qdrop.data.cifar10 import load_cifar10
from qdrop.io import atomic_write, atomic_write_json


def compact(src: Path, dst: Path, calib: int, seed: int) -> dict:
    x, y = load_cifar10(src, "train")
    keep, note = _select(len(x), "calib", calib, seed, what=str(src))
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write(dst / "train_subset.npz", lambda f: np.savez_compressed(f, x=x[keep], y=y[keep]), binary=True)
    copied = [p.name for p in sorted(src.glob("*.th")) + [src / "test.npz"] if p.is_file()]
    for name in copied:
        with open(src / name, "rb") as f_in:
            atomic_write(dst / name, lambda f: shutil.copyfileobj(f_in, f), binary=True)
    info = dict(source=str(src), calib=calib, seed=seed, drawn=note, copied=copied,
                note=f"only --calib {calib} --seed {seed} runs see the same calibration images as with the full folder")
    atomic_write_json(dst / "COMPACT.json", info, indent=1)
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(compact(args.src, args.dst, args.calib, args.seed)))
