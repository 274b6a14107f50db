"""AdaRound's learned rounding on CPU: closed-form gradients vs autograd through the expressions.

The reconstruction loop on a transformer block spends most of an iteration on elementwise work over
the weights, not on matmuls: the soft-rounded weight s(clamp(floor(w/s) + h(V) + z) - z) and the
regulariser sum(1 - |2h(V) - 1|^beta), each differentiated by autograd through a chain of temporaries
(pow's backward recomputes the power). qdrop.quant.quantizer computes both with their gradients in
closed form (_SoftRoundWeight, _RoundLoss). This times, in one process, alternating:
  parts  - weight + regulariser, forward and backward, for the weights of one MiniLM block and of one
           ResNet-20 block, closed form vs the plain expressions (the earlier code);
  minilm - (--minilm) whole reconstruction iterations: MiniLM W4A4 qdrop after observers (8 sentences a step), `--iters`
           per block, ms per iteration averaged over the six blocks (needs ../shared/data).

    python benchmarks/rounding_speed.py [--threads 2] [--minilm] [--iters 100] [--out benchmarks/results/rounding_speed.json]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from qdrop.io import atomic_write_json, environment
from qdrop.quant import QScheme, Quantizer
from qdrop.quant.quantizer import GAMMA, ZETA, _bshape

SHAPES = {
    "minilm_block": [(384, 384)] * 4 + [(1536, 384), (384, 1536)],
    "resnet20_block": [(16, 16, 3, 3)] * 2,
}


def _expression_adaround(self, w):
    s = _bshape(w, self.scheme.ch_axis, self.scale)
    z = _bshape(w, self.scheme.ch_axis, self.zero_point)
    return (torch.clamp(torch.floor(w / s) + self.rounding() + z, self.scheme.qmin, self.scheme.qmax) - z) * s


def _expression_round_loss(self, beta):
    return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()


@contextlib.contextmanager
def expressions():
    """The earlier code path: autograd through the plain expressions."""
    saved = Quantizer._adaround, Quantizer.round_loss
    Quantizer._adaround, Quantizer.round_loss = _expression_adaround, _expression_round_loss
    try:
        yield
    finally:
        Quantizer._adaround, Quantizer.round_loss = saved


def time_parts(shapes, reps=20, rounds=5):
    torch.manual_seed(0)
    ws, qs = [], []
    for shape in shapes:
        w = torch.randn(shape) * 0.05
        q = Quantizer(QScheme(bits=4, symmetric=True, ch_axis=0), shape[0], "weight")
        q.calibrate_on(w)
        q.init_adaround(w)
        ws.append(w)
        qs.append(q)

    def step():
        loss = sum((q(w) * w).sum() + 0.01 * q.round_loss(12.0) for q, w in zip(qs, ws))
        loss.backward()

    def ms():
        step()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        return 1000 * (time.perf_counter() - t) / reps

    fused, expr = [], []
    for _ in range(rounds):
        fused.append(ms())
        with expressions():
            expr.append(ms())
    f, e = statistics.median(fused), statistics.median(expr)
    return dict(weights=sum(w.numel() for w in ws), closed_form_ms=round(f, 2), expressions_ms=round(e, 2), speedup=round(e / f, 2))


def time_minilm(iters):
    from qdrop.nlp_pipeline import run_nlp_quantize

    def ms_per_iter():
        m = run_nlp_quantize("hf:minilm", "sts", bits="w4a4", algo="qdrop", iters=iters, batch_size=8)
        units = m["report"]["reconstruction"]["unit_reports"]
        return statistics.mean(u["ms_per_iter"] for u in units), m["quant"]

    f, score_f = ms_per_iter()
    with expressions():
        e, score_e = ms_per_iter()
    return dict(iters=iters, closed_form_ms=round(f, 1), expressions_ms=round(e, 1), speedup=round(e / f, 2),
                spearman_closed_form=score_f, spearman_expressions=score_e)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minilm", action="store_true", help="also time whole MiniLM reconstruction iterations")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/rounding_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = dict(threads=args.threads, environment=environment(), parts={})
    for name, shapes in SHAPES.items():
        result["parts"][name] = r = time_parts(shapes)
        print(f"{name:15s} {r['weights']:>9,d} weights  closed form {r['closed_form_ms']:7.2f} ms  "
              f"expressions {r['expressions_ms']:7.2f} ms  x{r['speedup']}")
    if args.minilm:
        result["minilm"] = r = time_minilm(args.iters)
        print(f"MiniLM W4A4 qdrop, {args.iters} it/block: {r['closed_form_ms']} ms/iter closed form, "
              f"{r['expressions_ms']} ms/iter expressions (x{r['speedup']}); Spearman {r['spearman_closed_form']} / {r['spearman_expressions']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
