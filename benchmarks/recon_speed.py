"""Reconstruction loop cost per iteration vs a bare PyTorch step, per CIFAR ResNet-20 unit.

For every block unit of ResNet-20 (W4A4, academic preset, QDrop settings: drop 0.5,
input mixing 0.5, AdaRound + LSQ learned jointly) this times
  loop  - qdrop's own reconstruction loop (recon.engine._optimize), batch 32 sampled
          from 1024 cached inputs, mixing, rounding loss, two Adams, cosine schedule;
  bare  - the same unit module in the same state, a fixed batch, forward + MSE loss +
          backward + one Adam step over the same parameters, nothing else;
in one process, alternating, and prints the ratio. Target (issue #14): loop <= 1.1x bare.
--cuda-graph times the loop replayed as CUDA graphs (recon.engine._CudaGraphStep).

    python benchmarks/recon_speed.py [--iters 200] [--device cpu] [--cuda-graph] [--out benchmarks/results/recon_speed.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qdrop
from qdrop.graph import block_units, subgraph
from qdrop.models import load_model
from qdrop.io import atomic_write_json, environment
from qdrop.recon.configs import ReconConfig, get_algorithm
from qdrop.recon.engine import _optimize, default_lambda, quant_mode, run_chunks


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass


def bare_step_time(qmodel, unit, mod, x, y, iters, device):
    layers = [qmodel.get_submodule(t) for t in unit.layers]
    acts = [qmodel.get_submodule(t) for t in unit.act_quants]
    for layer in layers:
        layer.weight_quant.init_adaround(layer.layer.weight)
    for q in acts:
        q.learn_scale()
        q.prob = 0.5
        q.train()
    params = [l.weight_quant.alpha for l in layers] + [q.scale for q in acts]
    opt = torch.optim.Adam(params, lr=1e-3)
    xb, yb = x[:32].to(device), y[:32].to(device)
    for i in range(iters + 10):
        if i == 10:
            sync(device)
            t = time.perf_counter()
        loss = (mod(xb) - yb).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    dt = (time.perf_counter() - t) / iters
    for layer in layers:
        layer.weight_quant.alpha = None
    for q in acts:
        q.stop_learning()
        q.prob = 1.0
        q.eval()
    return dt


def restore(qmodel, unit, state):
    """Undo a timing run: drop learned rounding, reload step sizes."""
    for t in unit.layers:
        wq = qmodel.get_submodule(t).weight_quant
        wq.alpha = None
        wq.round_up = None
    qmodel.load_state_dict(state)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--model", default="cifar10_resnet20")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="benchmarks/results/recon_speed.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    from qdrop.data import load_split

    model, info = load_model(args.model, data=args.data)
    calib = load_split(info.dataset, "calib", data=args.data, preprocess=info.preprocess, limit=1024, seed=0).x
    qmodel = qdrop.prepare(model, (calib[:2],), bits="w4a4").to(device)
    qdrop.calibrate(qmodel, [calib[:256].to(device)])
    stage = get_algorithm("qdrop").stages[0]
    cfg = ReconConfig(iters=args.iters, cuda_graph=args.cuda_graph)
    lam = default_lambda(qmodel)
    rows = []
    x_fp = calib.to(device)
    x_q = x_fp
    for k, unit in enumerate(block_units(qmodel)):
        mod = subgraph(qmodel, unit.nodes, unit.input, [unit.output])
        with quant_mode(qmodel, weights=False, acts=False):
            y_fp = run_chunks(mod, x_fp, device)
        state = {n: v.clone() for n, v in qmodel.state_dict().items()}
        bare = bare_step_time(qmodel, unit, mod, x_q, y_fp, args.iters, device)
        restore(qmodel, unit, state)
        with quant_mode(qmodel, weights=True, acts=True):
            _optimize(qmodel, unit, mod, x_q, x_fp, y_fp, stage, 10, cfg, lam, device, 0, _NoBar(), unit.name)  # warm-up
            restore(qmodel, unit, state)
            sync(device)
            r = _optimize(qmodel, unit, mod, x_q, x_fp, y_fp, stage, args.iters, cfg, lam, device, 0, _NoBar(), unit.name)
        restore(qmodel, unit, state)
        loop = r["seconds"] / args.iters
        rows.append(dict(unit=unit.name, loop_ms=round(1000 * loop, 2), bare_ms=round(1000 * bare, 2), ratio=round(loop / bare, 3)))
        print(f"{k:2d} {unit.name:12s} loop {1000 * loop:7.2f} ms  bare {1000 * bare:7.2f} ms  ratio {loop / bare:5.2f}", flush=True)
        with quant_mode(qmodel, weights=True, acts=True):
            x_q = run_chunks(mod, x_q, device)
        x_fp = y_fp
    total_loop = sum(r["loop_ms"] for r in rows)
    total_bare = sum(r["bare_ms"] for r in rows)
    summary = dict(model=args.model, bits="w4a4", algo="qdrop", iters=args.iters, device=str(device), units=rows,
                   loop="cuda-graph" if args.cuda_graph else "eager",
                   mean_loop_ms=round(total_loop / len(rows), 2), mean_bare_ms=round(total_bare / len(rows), 2),
                   ratio=round(total_loop / total_bare, 3), max_ratio=max(r["ratio"] for r in rows), environment=environment())
    print(f"mean loop {summary['mean_loop_ms']} ms/iter, bare {summary['mean_bare_ms']} ms/iter, ratio {summary['ratio']} "
          f"(worst unit {summary['max_ratio']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, summary, indent=1)


if __name__ == "__main__":
    main()
