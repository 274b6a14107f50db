"""GPTQ for a module-swapped transformer: the codes of every quantized Linear's weight chosen by GPTQ
(qdrop.quant.gptq) from the inputs the layer receives in the calibrated model.

Block after block, as in the paper: the hidden states entering a block come from the blocks before it
with their GPTQ codes already fixed (the partition of qdrop.nlp.units captures the first block's input
and every block's own arguments); while a block's input statistics are gathered its own weights are in
floating point, its input quantizers on, so each Linear's H = Σ xᵀx is taken over what its weight will
multiply in the deployed model: rotated, quantized, real tokens only. The Linears outside the blocks (an
LM head, a pooler) come last, from one pass of the whole model. The cost is about four passes of the model
over the calibration set (the capture runs up to the last block, every block runs twice, then the whole model
once), and the rounding: 897 s of a SmolLM2-135M W4A8 run on a 2-core AMD EPYC (README).

The weights themselves stay FP: each quantizer keeps its codes (Quantizer.fix_codes), so the model with
quantizers off is still the original, and the grids (scale, zero point) are the weight observer's.
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from ..quant.gptq import DAMP, gptq_codes
from .layers import QuantLinear
from .mask import real_tokens, token_mask
from .prepare import quant_linears
from .units import ScopePartition


def _input_moments(linears: list[QuantLinear], run) -> dict:
    """Σ xᵀx (float64) of each Linear's weight input while run() runs, with these Linears' weights in FP."""
    stats: dict = {}

    def hook(module, args):
        x = real_tokens(module.weight_input(args[0]))
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        stats[module] = xtx if module not in stats else stats[module].add_(xtx)

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    states = [m.weight_quant.state for m in linears]
    for m in linears:
        m.weight_quant.set_state("off")
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for m, state in zip(linears, states):
            m.weight_quant.set_state(state)
    return stats


def _round(linears: list[QuantLinear], stats: dict, damp: float) -> list[float]:
    """GPTQ codes into each Linear's weight quantizer; returns each one's proxy error tr(ΔW H ΔWᵀ)
    relative to nearest rounding's (below 1: GPTQ's codes fit the inputs better)."""
    ratios = []
    for m in linears:
        if m not in stats:  # never called on the calibration data: nearest rounding stays
            continue
        wq, w, h = m.weight_quant, m.layer.weight, stats[m]
        nearest = wq(w).detach()
        codes = gptq_codes(w, h, wq.scale, wq.zero_point, wq.scheme.qmin, wq.scheme.qmax, damp=damp)
        wq.fix_codes(w, codes)
        chosen = wq(w).detach()
        err = [float(torch.einsum("oi,ij,oj->", d, h, d)) for d in ((w - chosen).double(), (w - nearest).double())]
        ratios.append(err[0] / max(err[1], 1e-30))
    return ratios


@torch.no_grad()
def gptq_transformer(qmodel: nn.Module, batches: list, units: str | None = None, damp: float = DAMP,
                     progress: bool = False) -> dict:
    """GPTQ codes for every quantized Linear of a calibrated transformer (qdrop.nlp.calibrate_transformer has
    run: the weight grids and the input ranges exist). batches: the calibration batches (dicts of model inputs).
    Returns the count of Linears, the proxy errors relative to nearest rounding, and the seconds."""
    t0 = time.perf_counter()
    was_training = qmodel.training
    qmodel.eval()
    device = next(qmodel.parameters()).device
    part = ScopePartition(qmodel, units)
    xs, masks = part.start(batches, device)
    ratios, done = [], set()
    for k, unit in enumerate(part.blocks):
        linears = [m for m in (qmodel.get_submodule(n) for n in unit.layers) if isinstance(m, QuantLinear)]
        run_block = part.block_fn(k)

        def run(xs=xs, k=k, run_block=run_block):
            outs = []
            for x, (args, kwargs), mask in zip(xs, part.extras(k), masks):
                with token_mask(mask):
                    outs.append(run_block(x, *args, **kwargs))
            return outs
        ratios += _round(linears, _input_moments(linears, run), damp)
        done.update(linears)
        xs = run()  # the next block's input, through this block's codes
        if progress:
            print(f"gptq: block {k + 1}/{len(part.blocks)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rest = [m for _, m in quant_linears(qmodel) if m not in done]
    if rest:
        def run_model():
            for b in batches:
                qmodel(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
        ratios += _round(rest, _input_moments(rest, run_model), damp)
    qmodel.train(was_training)
    ratios.sort()
    return dict(layers=len(ratios), damp=damp, proxy_error_vs_nearest=dict(
        median=ratios[len(ratios) // 2] if ratios else None, worst=ratios[-1] if ratios else None),
        seconds=round(time.perf_counter() - t0, 1))
