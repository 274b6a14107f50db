"""Which tokens are real: padding must never enter a calibration range.

Observers see flattened activations, so they cannot tell padding from text. The prepared
model sets the current token mask ([batch, seq] bool) from its `attention_mask` argument
for the duration of each forward (see prepare.py); `token_mask()` sets it explicitly for
code that calls submodules or passes the mask positionally. Observers then take only
x[mask] for activations whose leading dimensions are (batch, seq).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

_STACK: list[torch.Tensor | None] = []


def current_mask() -> torch.Tensor | None:
    return _STACK[-1] if _STACK else None


def push_mask(mask: torch.Tensor | None) -> None:
    _STACK.append(None if mask is None else mask.bool())


def pop_mask() -> None:
    if _STACK:
        _STACK.pop()


@contextmanager
def token_mask(mask: torch.Tensor | None):
    """Within the block, observers only see tokens where mask is True (mask: [batch, seq])."""
    push_mask(mask)
    try:
        yield
    finally:
        pop_mask()


def real_tokens(x: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """x restricted to non-padding tokens: [N, ...] rows when a mask is set and x's
    (batch, token_dim) dimensions match it; x unchanged otherwise (e.g. the BERT pooler,
    which only sees the [CLS] token, never padding)."""
    mask = current_mask()
    if mask is None or x.dim() <= token_dim or (x.shape[0], x.shape[token_dim]) != tuple(mask.shape):
        return x
    if token_dim != 1:
        x = x.movedim(token_dim, 1)
    return x[mask.to(x.device)]
