"""`qdrop demo`: the whole workflow on Fashion-MNIST in a few minutes on a CPU.

Train a small ResNet once (cached), then quantize it with naive PTQ and QDrop at several
bit-widths and print FP vs quantized accuracy on the 10,000 test images.
"""
from __future__ import annotations

import time

import torch

from .api import calibrate
from .quant.calibration import batched
from .data import load_split
from .eval.metrics import top1
from .graph.prepare import prepare
from .models import SmallResNet
from .io import atomic_torch_save
from .recon import reconstruct

SETTINGS = [("w8a8", "naive"), ("w4a4", "naive"), ("w4a4", "qdrop"), ("w2a4", "naive"), ("w2a4", "qdrop")]


def trained_model(retrain: bool = False):
    from .models.zoo import fmnist_weights_path
    from .train import train_classifier

    path = fmnist_weights_path()
    model = SmallResNet()
    if path.is_file() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"using the cached model {path}")
        return model.eval()
    train = load_split("fashion_mnist", "calib")
    print(f"training a small ResNet on {train.description} (cached afterwards)")
    train_classifier(model, train.x, train.y)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), path)
    return model.eval()


def run_demo(iters: int = 500, retrain: bool = False, calib: int = 1024) -> list[dict]:
    t0 = time.perf_counter()
    model = trained_model(retrain)
    test = load_split("fashion_mnist", "test")
    calib_split = load_split("fashion_mnist", "calib", limit=calib, seed=0)
    fp = top1(model, test.x, test.y)
    rows = []
    for bits, algo in SETTINGS:
        t = time.perf_counter()
        qmodel = prepare(model, (calib_split.x[:2],), bits=bits)
        calibrate(qmodel, batched(calib_split.x[:256], 64))
        if algo != "naive":
            reconstruct(qmodel, None, calib_split.x, algo=algo, iters=iters, device="cpu")
        acc = top1(qmodel, test.x, test.y)
        rows.append(dict(bits=bits, algo=algo, fp=fp, quant=acc, seconds=time.perf_counter() - t))
        print(f"  {bits} {algo:6s} {acc:6.2f}  ({rows[-1]['seconds']:.0f} s)")
    print(f"\nFashion-MNIST test ({len(test)} images), small ResNet, calibration: {len(calib_split)} training images")
    print(f"| bits | algorithm | top-1 | drop vs FP ({fp:.2f}) |")
    print("|---|---|---|---|")
    for r in rows:
        iters_note = f" ({iters} it/unit)" if r["algo"] != "naive" else ""
        print(f"| {r['bits'].upper()} | {r['algo']}{iters_note} | {r['quant']:.2f} | {r['quant'] - fp:+.2f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return rows
