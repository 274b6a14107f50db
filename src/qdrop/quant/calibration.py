"""Calibration: run the observers over calibration batches and freeze the ranges (naive PTQ)."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .state import quantizers
from .layers import QuantLayer
from .. import distributed as qdist
from ..errors import DataError, UsageError


def _as_tuple(batch):
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)):
        return tuple(batch)
    if isinstance(batch, dict):
        return batch
    raise UsageError(f"a calibration batch must be a tensor, tuple or dict, got {type(batch).__name__}")


def check_finite(batch, index: int) -> None:
    values = batch.values() if isinstance(batch, dict) else batch
    for t in values:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"calibration batch {index} contains NaN or Inf values")


@torch.no_grad()
def calibrate_observers(qmodel: nn.Module, batches: Iterable, device: str | torch.device | None = None,
                        progress: bool = False) -> nn.Module:
    """Observe activations on `batches` (tensors, tuples or dicts of model inputs) and freeze
    every quantizer's scale and zero point; weights are observed directly. Any module holding
    qdrop quantizers (qdrop.calibrate in qdrop.api is the public entry).

    Observers see floating-point values everywhere (all quantizers pass through while
    observing), as in the official BRECQ/QDrop calibration.

    In a process group (torchrun, qdrop.distributed) each observer's min and max are reduced
    over the ranks, which makes min/max observers exact whatever batches each rank saw. MSE and
    percentile observers (every preset's activation default) need the values themselves, so
    data-parallel runs calibrate on the same batches on every rank (qdrop.pipeline does); the
    ranks' ranges are then compared, and if they differ anyway (different batches, or
    non-deterministic kernels) rank 0's are used everywhere, with a warning.

    progress: show the weight range searches, the pass over the batches and the activation range
    searches that follow it (an MSE observer searches when it is frozen, not while it observes)."""
    layers = [m for _, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    for m in tqdm(layers, disable=not progress, desc="weight ranges", leave=False):
        if not m.weight_quant.calibrated:
            m.weight_quant.calibrate_on(m.layer.weight)
    acts = [(n, q) for n, q in quantizers(qmodel) if q.role == "act"]
    for _, q in acts:
        q.observe()
    weights = [q for _, q in quantizers(qmodel) if q.role == "weight"]
    for q in weights:
        q.set_state("off")
    qmodel.eval()
    seen = 0
    for i, batch in enumerate(tqdm(batches, disable=not progress, desc="calibration", leave=False)):
        batch = _as_tuple(batch)
        check_finite(batch, i)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else tuple(t.to(device) for t in batch)
        qmodel(**batch) if isinstance(batch, dict) else qmodel(*batch)
        seen += 1
    if seen == 0:
        raise DataError("calibration got no batches")
    if qdist.active():
        _reduce_min_max(acts)
    for name, q in tqdm(acts, disable=not progress, desc="activation ranges", leave=False):
        if q.observer is None or q.observer.min is None:
            warnings.warn(f"activation quantizer {name} saw no data during calibration; it stays off")
            q.saw_nothing()
            continue
        q.freeze()
    for q in weights:
        q.set_state("quant")
    if qdist.active():
        _same_ranges(acts)
    return qmodel


def _reduce_min_max(acts) -> None:
    """Every rank's observers get the min and max over all ranks' data (two all-reduces in all)."""
    seen = torch.tensor([q.observer is not None and q.observer.min is not None for _, q in acts], dtype=torch.float)
    anywhere = qdist.all_reduce(seen.clone(), "max")
    if not torch.equal(qdist.all_reduce(seen.clone(), "min"), anywhere):
        names = [n for (n, _), a, s in zip(acts, anywhere, seen) if a != s]
        raise DataError(f"activation quantizers {names[:3]} saw data on some ranks only: give every rank the same "
                        "kind of calibration batches")
    obs = [q.observer for (_, q), s in zip(acts, seen) if s]
    if not obs:
        return
    lows = qdist.all_reduce_each([o.min for o in obs], "min")
    highs = qdist.all_reduce_each([o.max for o in obs], "max")
    for o, lo, hi in zip(obs, lows, highs):
        o.min, o.max = lo, hi


def _same_ranges(acts) -> None:
    """Check that every rank froze the same activation ranges; where they differ, rank 0's win."""
    qs = [q for _, q in acts if q.calibrated]
    if not qs:
        return
    dev = qs[0].scale.device
    mine = torch.cat([t.detach().reshape(-1).float().to(dev) for q in qs for t in (q.scale, q.zero_point)])
    if torch.equal(qdist.all_reduce(mine.clone(), "max"), qdist.all_reduce(mine.clone(), "min")):
        return
    ref = qdist.broadcast(mine.clone(), 0)
    worst = float(qdist.all_reduce((ref - mine).abs().max().reshape(1), "max"))
    if qdist.rank() == 0:
        warnings.warn(f"activation ranges differ across ranks (by up to {worst:.3g}): rank 0's are used on every rank. "
                      "Data-parallel calibration needs the same batches on every rank for the mse and percentile observers")
    i = 0
    for q in qs:
        n = q.scale.numel()
        q.set_range(ref[i : i + n], ref[i + n : i + 2 * n])
        i += 2 * n


def batched(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
