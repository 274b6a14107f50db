"""ImageNet-size reconstruction under a memory cap (issue #14): peak memory and ms/iter per unit.

For each of torchvision resnet18, resnet50 and mobilenet_v2 (random weights: this measures memory
and time, not accuracy, and no accuracy is reported), W4A4 QDrop (academic preset) on 1,024
calibration images at 224 px with `--max-cache-mb` as the cap on cached unit inputs/outputs in
memory. The images are the 1,000 ImageNet samples in DATA/imagenet/samples (one per class, the
model's own preprocessing), filled up to 1,024 with horizontally flipped copies of the first 24.
The steps are those of `qdrop quantize`: prepare, calibrate activations on 256 of the images (batches
of 64), reconstruct on all 1,024 (batch 32, `--iters` per unit).

Each model runs in its own process, so that its peak resident memory (getrusage ru_maxrss, which
counts everything: the 616 MB of calibration images, the model, the units' activations, the caches
held in memory) is its own. Recorded per model: peak RSS (after loading the images, after
calibration, at the end), where the caches lived (report["cache"]: the slowest tier used, and each
unit's), cache_bytes (the most cached bytes held at once, wherever) and cache_memory_bytes (of them,
in memory), ms/iter per unit, wall times. The disk tier's temporary files go in tempfile's
directory ($TMPDIR, /tmp); `--cache-dir` sets it, and its file system is recorded (a RAM-backed
tmpfs would save no memory).

    nice -n 10 python benchmarks/imagenet_memory.py [--models resnet18,resnet50,mobilenet_v2]
        [--max-cache-mb 1024] [--iters 20] [--threads N] [--cache-dir DIR]

Rows are merged into benchmarks/results/imagenet_memory.json by model (a run of a subset keeps the
others' rows; each row records its own environment and settings) and the whole table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "imagenet_memory.json"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
N_CALIB, N_FLIPPED = 1024, 24


def peak_rss_mib() -> float:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def file_system(path: str) -> str | None:
    """The type of the file system holding `path` (the longest mount point above it), from /proc/mounts."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")), key=lambda m: len(m[0]),
               default=None)
    return best[1] if best else None


def calibration_images(data: str | None, preprocess: str):
    """The 1,000 sample images plus flipped copies of the first 24: [1024, 3, 224, 224] float32."""
    from qdrop.data import data_root, list_imagefolder, load_images

    root = data_root(data) / "imagenet" / "samples"
    if not root.is_dir():
        root = data_root(data)
    paths, _ = list_imagefolder(root)
    if len(paths) + N_FLIPPED < N_CALIB:
        raise SystemExit(f"{root} has {len(paths)} images; {N_CALIB - N_FLIPPED} are needed")
    paths = paths[: N_CALIB - N_FLIPPED]
    # decoded into one tensor, the 24 extra ones flipped in place: no second copy of 616 MB
    x = load_images(paths + paths[:N_FLIPPED], preprocess, progress=False)
    x[len(paths):] = x[len(paths):].flip(-1)
    return x, f"{len(paths)} images of {root} + {N_FLIPPED} horizontally flipped copies of the first {N_FLIPPED}"


def measure(model_name: str, args) -> dict:
    """One model, in this process."""
    import torch

    import qdrop
    from qdrop.io import environment
    from qdrop.models import load_model
    from qdrop.pipeline import ACT_CALIB

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = load_model(f"torchvision:{model_name}", pretrained=False)
    x, described = calibration_images(args.data, info.preprocess)
    seconds, rss = dict(load=time.perf_counter() - t0), dict(loaded=peak_rss_mib())

    t = time.perf_counter()
    qmodel = qdrop.prepare(model, (x[:2],), bits="w4a4")
    qdrop.calibrate(qmodel, [x[i : i + 64] for i in range(0, ACT_CALIB, 64)])
    seconds["calibrate"], rss["calibrated"] = time.perf_counter() - t, peak_rss_mib()

    t = time.perf_counter()
    report = qdrop.reconstruct(qmodel, None, x, algo="qdrop", iters=args.iters, batch_size=args.batch_size, seed=0,
                               device="cpu", progress=False, max_cache_bytes=args.max_cache_mb * 2**20)
    seconds["reconstruct"], rss["end"] = time.perf_counter() - t, peak_rss_mib()
    seconds["total"] = time.perf_counter() - t0
    cache_dir = tempfile.gettempdir()
    return dict(
        model=f"torchvision:{model_name}", weights="random", bits="w4a4", algo="qdrop", iters=args.iters,
        batch_size=args.batch_size, n_calib=int(x.shape[0]), calib_data=described, max_cache_mb=args.max_cache_mb,
        peak_rss_mib=rss["end"], peak_rss_mib_at=rss, cache=report["cache"],
        cache_mib=round(report["cache_bytes"] / 2**20, 1), cache_memory_mib=round(report["cache_memory_bytes"] / 2**20, 1),
        cache_dir=cache_dir, cache_dir_fs=file_system(cache_dir),
        ms_per_iter=round(sum(r["seconds"] for r in report["unit_reports"]) * 1000
                          / sum(r["iters"] for r in report["unit_reports"]), 1),
        units=[dict(unit=r["unit"], cache=r["cache"], ms_per_iter=round(r["ms_per_iter"], 1)) for r in report["unit_reports"]],
        seconds={k: round(v, 1) for k, v in seconds.items()}, environment=environment())


def run_in_subprocess(model_name: str, args) -> dict:
    """measure() in a fresh process: ru_maxrss is per process and never goes down."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_name, "--row", str(out), "--iters", str(args.iters),
               "--max-cache-mb", str(args.max_cache_mb), "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--data", args.data] if args.data else []
        env = dict(os.environ, TMPDIR=args.cache_dir) if args.cache_dir else None
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{model_name}: the measuring process failed (exit {done.returncode})")
        row = json.loads(out.read_text())
    row["seconds"]["process"] = round(time.perf_counter() - t, 1)  # with the imports and the image decoding
    return row


def print_table(rows: list[dict]):
    print(f"{'model':24s} {'cap MiB':>8s} {'it/unit':>7s} {'peak RSS MiB':>12s} {'cache':>10s} {'cached MiB':>10s} "
          f"{'in memory':>9s} {'ms/iter':>8s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['model']:24s} {r['max_cache_mb']:8d} {r['iters']:7d} {r['peak_rss_mib']:12.0f} {r['cache']:>10s} "
              f"{r['cache_mib']:10.0f} {r['cache_memory_mib']:9.0f} {r['ms_per_iter']:8.1f} {r['seconds']['process']:7.0f}")
    for r in rows:
        print(f"\n{r['model']}: per unit ms/iter (cache tier); peak RSS MiB {r['peak_rss_mib_at']}; {r['calib_data']}")
        print("  " + ", ".join(f"{u['unit']} {u['ms_per_iter']:.0f} ({u['cache']})" for u in r["units"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--max-cache-mb", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20, help="iterations per unit (memory and ms/iter, not accuracy)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="where the disk tier's files go ($TMPDIR of the measuring process)")
    ap.add_argument("--data", default=None, help="data root holding imagenet/samples (default: qdrop's)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the measuring process: one model
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        Path(args.row).write_text(json.dumps(measure(args.one, args)))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {','.join(MODELS)}")

    from qdrop.io import atomic_write_json

    out = Path(args.out)
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]} if out.is_file() else {}
    for name in models:
        print(f"{name}: measuring (cap {args.max_cache_mb} MiB, {args.iters} it/unit) ...", flush=True)
        row = run_in_subprocess(name, args)
        rows[row["model"]] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, dict(rows=[rows[k] for k in sorted(rows)]), indent=1)  # after each model: a kill keeps it
    print_table([rows[k] for k in sorted(rows)])


if __name__ == "__main__":
    main()
