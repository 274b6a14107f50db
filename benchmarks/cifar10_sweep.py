"""CIFAR-10 ResNet sweep: naive / adaround / brecq / qdrop at W4A4, W2A4, W3A3, W2A2.

Protocol: shared CIFAR-10 data (../shared/data/cifar10), 1024 calibration images drawn
(seeded) from train_subset.npz, evaluation on all 10,000 test.npz images, academic preset,
batch 32, `--iters` iterations per unit (2,000 on CPU here; the paper uses 20,000).

Each run writes RUNS/<model>/<bits>/<algo>/ (model.pt, metrics.json, ...). Finished runs
(metrics.json present) are skipped, so a killed sweep resumes where it stopped.
Results are collected in benchmarks/results/cifar10_<iters>.json and printed as a table.

    python benchmarks/cifar10_sweep.py --iters 2000 [--models cifar10_resnet20] [--bits w4a4 w2a4] [--algos qdrop]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qdrop.io import atomic_write_json
from qdrop.pipeline import QuantizeJob, run_quantize

ORDER_BITS = ["w4a4", "w2a4", "w3a3", "w2a2"]
ORDER_ALGOS = ["naive", "adaround", "brecq", "qdrop"]


def table(results: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in results))
    lines = []
    for model in models:
        rs = [r for r in results if r["model"] == model]
        fp = rs[0]["fp"]
        bits = [b for b in ORDER_BITS if any(r["bits"] == b for r in rs)]
        lines.append(f"\n{model} (FP {fp:.2f}, {rs[0]['eval_size']} test images)")
        lines.append("| method | " + " | ".join(b.upper() for b in bits) + " |")
        lines.append("|---|" + "---|" * len(bits))
        for algo in ORDER_ALGOS:
            cells = []
            for b in bits:
                hit = [r for r in rs if r["bits"] == b and r["algo"] == algo]
                if not hit:
                    cells.append("")
                    continue
                r = hit[0]
                ms = f" ({r['ms_per_iter']:.1f} ms/it)" if r.get("ms_per_iter") else ""
                cells.append(f"{r['quant']:.2f}{ms}")
            if any(cells):
                lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["cifar10_resnet20"])
    ap.add_argument("--bits", nargs="+", default=ORDER_BITS)
    ap.add_argument("--algos", nargs="+", default=ORDER_ALGOS)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None)
    ap.add_argument("--runs", default="runs/cifar10")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"benchmarks/results/cifar10_{args.iters}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else []
    fp_cache = {}
    for model in args.models:
        for algo in args.algos:
            for bits in args.bits:
                run_dir = Path(args.runs) / f"it{args.iters}_s{args.seed}" / model / bits / algo
                metrics_path = run_dir / "metrics.json"
                if metrics_path.exists():
                    m = json.loads(metrics_path.read_text())
                else:
                    print(f"== {model} {bits} {algo} iters={args.iters}", flush=True)
                    job = QuantizeJob(model, bits, algo, data=args.data, calib=1024, seed=args.seed, iters=args.iters,
                                      device=args.device)
                    m = run_quantize(job, out=run_dir, fp_top1=fp_cache.get(model))
                    print(f"   FP {m['fp']:.2f} -> {m['quant']:.2f}  {m['seconds']}", flush=True)
                fp_cache[model] = m["fp"]
                results = [r for r in results if not (r["model"] == model and r["bits"] == bits and r["algo"] == algo)]
                results.append(m)
                atomic_write_json(out, results, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
