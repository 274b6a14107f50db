"""Calibration: run the observers over calibration batches and freeze the ranges (naive PTQ)."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .state import quantizers
from .layers import QuantLayer
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
def calibrate_observers(qmodel: nn.Module, batches: Iterable, device: str | torch.device | None = None) -> nn.Module:
    """Observe activations on `batches` (tensors, tuples or dicts of model inputs) and freeze
    every quantizer's scale and zero point; weights are observed directly. Any module holding
    qdrop quantizers (qdrop.calibrate in qdrop.api is the public entry).

    Observers see floating-point values everywhere (all quantizers pass through while
    observing), as in the official BRECQ/QDrop calibration."""
    for _, m in qmodel.named_modules():
        if isinstance(m, QuantLayer) and not m.weight_quant.calibrated:
            m.weight_quant.calibrate_on(m.layer.weight)
    acts = [(n, q) for n, q in quantizers(qmodel) if q.role == "act"]
    for _, q in acts:
        q.observe()
    weights = [q for _, q in quantizers(qmodel) if q.role == "weight"]
    for q in weights:
        q.set_state("off")
    qmodel.eval()
    seen = 0
    for i, batch in enumerate(batches):
        batch = _as_tuple(batch)
        check_finite(batch, i)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else tuple(t.to(device) for t in batch)
        qmodel(**batch) if isinstance(batch, dict) else qmodel(*batch)
        seen += 1
    if seen == 0:
        raise DataError("calibration got no batches")
    for name, q in acts:
        if q.observer is None or q.observer.min is None:
            warnings.warn(f"activation quantizer {name} saw no data during calibration; it stays off")
            q.saw_nothing()
            continue
        q.freeze()
    for q in weights:
        q.set_state("quant")
    return qmodel


def batched(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
