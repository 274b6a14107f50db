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

sequential=True is the authors' "true sequential" variant: inside a block the Linears go in the order the
block calls them, in groups of those that read the same input (q/k/v, o_proj, gate/up, down_proj), and a
group's statistics are gathered with the groups before it already on their GPTQ codes (each pass stops
when the block calls a later group). It is not the default because it did not pay on the one model measured:
SmolLM2-135M W4A8 perplexity 19.68 against 19.63, its GPTQ part 1,410 s against 897 s (README, stop 24).

The weights themselves stay FP: each quantizer keeps its codes (Quantizer.fix_codes), so the model with
quantizers off is still the original, and the grids (scale, zero point) are the weight observer's.
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from ..quant.gptq import DAMP, gptq_codes, gptq_search, row_errors
from .layers import QuantLinear
from .mask import real_tokens, token_mask
from .prepare import quant_linears
from .units import ScopePartition


class _Stopped(Exception):
    """Raised by a hook when the pass has given what it was run for."""


def _input_moments(linears: list[QuantLinear], run, stop=(), fp: bool = True) -> dict:
    """Σ xᵀx (float64) of each Linear's weight input while run() runs, with these Linears' weights in FP
    when fp. A call of a module in stop raises _Stopped (run() catches it: the pass has what it needs)."""
    stats: dict = {}

    def hook(module, args):
        x = real_tokens(module.weight_input(args[0]))
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        stats[module] = xtx if module not in stats else stats[module].add_(xtx)

    def stop_hook(module, args):
        raise _Stopped

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    handles += [m.register_forward_pre_hook(stop_hook) for m in stop]
    states = [m.weight_quant.state for m in linears]
    if fp:
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


def _call_groups(linears: list[QuantLinear], run_once) -> list[list[QuantLinear]]:
    """The Linears in the order run_once() first calls them, consecutive ones that read the same input tensor
    in one group (they do not depend on each other). Linears it does not call form a last group."""
    calls: list = []

    def hook(module, args):
        calls.append((module, args[0]))
    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        run_once()
    finally:
        for h in handles:
            h.remove()
    groups: list = []
    seen: set = set()
    for m, x in calls:
        if m in seen:
            continue
        seen.add(m)
        if groups and groups[-1][1] is x:
            groups[-1][0].append(m)
        else:
            groups.append(([m], x))
    groups = [g for g, _ in groups]
    uncalled = [m for m in linears if m not in seen]
    return groups + [uncalled] if uncalled else groups


def _round(linears: list[QuantLinear], stats: dict, damp: float, search: tuple | None = None,
           factors_chosen: dict | None = None) -> list[float]:
    """GPTQ codes into each Linear's weight quantizer; returns each one's proxy error tr(ΔW H ΔWᵀ)
    relative to nearest rounding's on the observer's grid (below 1: GPTQ's codes fit the inputs better).
    search: step-size factors for qdrop.quant.gptq.gptq_search (each row's grid chosen by its GPTQ error;
    factors_chosen counts the rows that took each factor), or None: the observer's grid."""
    ratios = []
    for m in linears:
        if m not in stats:  # never called on the calibration data: nearest rounding stays
            continue
        wq, w, h = m.weight_quant, m.layer.weight, stats[m]
        s, z = wq.scale.reshape(-1, 1), wq.zero_point.reshape(-1, 1)
        nearest = (wq.nearest_codes(w) - z) * s  # the baseline, whatever codes wq holds now
        if search:
            scale, codes = gptq_search(w, h, wq.scale, wq.zero_point, wq.scheme.qmin, wq.scheme.qmax,
                                       factors=search, damp=damp)
            if factors_chosen is not None:
                ratio = scale / wq.scale.detach().reshape(-1)
                for f in search:
                    factors_chosen[f] = factors_chosen.get(f, 0) + int(((ratio - f).abs() < 1e-4).sum())
            wq.set_range(scale, wq.zero_point.detach().clone())
        else:
            codes = gptq_codes(w, h, wq.scale, wq.zero_point, wq.scheme.qmin, wq.scheme.qmax, damp=damp)
        wq.fix_codes(w, codes)
        chosen = wq(w).detach()
        err = [float(row_errors(w, q, h).sum()) for q in (chosen, nearest)]
        ratios.append(err[0] / max(err[1], 1e-30))
    return ratios


@torch.no_grad()
def gptq_transformer(qmodel: nn.Module, batches: list, units: str | None = None, damp: float = DAMP,
                     sequential: bool = False, search: tuple | None = None, progress: bool = False) -> dict:
    """GPTQ codes for every quantized Linear of a calibrated transformer (qdrop.nlp.calibrate_transformer has
    run: the weight grids and the input ranges exist). batches: the calibration batches (dicts of model inputs).
    sequential: False (the default): one pass per block gathers every Linear's statistics with the block's weights
    in FP; True: a block's Linears in call order, each group's statistics after the codes of the groups before it.
    search: step-size factors (qdrop.quant.gptq.SEARCH_FACTORS): each weight row's grid is the observer's step
    times the factor whose GPTQ codes give that row the least output error on the calibration inputs; None: the
    observer's grid. Returns the count of Linears, the damping, the count of batches, the proxy errors relative to nearest rounding, and the seconds."""
    t0 = time.perf_counter()
    was_training = qmodel.training
    qmodel.eval()
    device = next(qmodel.parameters()).device
    part = ScopePartition(qmodel, units)
    xs, masks = part.start(batches, device)
    ratios, done, chosen = [], set(), {}
    for k, unit in enumerate(part.blocks):
        linears = [m for m in (qmodel.get_submodule(n) for n in unit.layers) if isinstance(m, QuantLinear)]
        run_block = part.block_fn(k)

        def run(xs=xs, k=k, run_block=run_block, first_only=False):
            outs = []
            for x, (args, kwargs), mask in zip(xs, part.extras(k), masks):
                with token_mask(mask):
                    try:
                        outs.append(run_block(x, *args, **kwargs))
                    except _Stopped:
                        pass
                if first_only:
                    break
            return outs
        if sequential:
            groups = _call_groups(linears, lambda: run(first_only=True))
            for i, group in enumerate(groups):
                later = [m for g in groups[i + 1:] for m in g]
                ratios += _round(group, _input_moments(group, run, stop=later, fp=False), damp, search, chosen)
        else:
            ratios += _round(linears, _input_moments(linears, run), damp, search, chosen)
        done.update(linears)
        xs = run()  # the next block's input, through this block's codes
        if progress:
            print(f"gptq: block {k + 1}/{len(part.blocks)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rest = [m for _, m in quant_linears(qmodel) if m not in done]
    if rest:
        def run_model():
            for b in batches:
                qmodel(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
        ratios += _round(rest, _input_moments(rest, run_model), damp, search, chosen)
    qmodel.train(was_training)
    ratios.sort()
    rows = sum(chosen.values())
    return dict(layers=len(ratios), damp=damp, sequential=sequential, batches=len(batches),
                search=dict(factors=list(search), rows_per_factor={str(f): round(n / rows, 4) for f, n in chosen.items()})
                if search else None, proxy_error_vs_nearest=dict(
        median=ratios[len(ratios) // 2] if ratios else None, worst=ratios[-1] if ratios else None),
        seconds=round(time.perf_counter() - t0, 1))
