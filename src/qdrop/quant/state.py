"""Quantizer states over a whole model: set them, or switch them for the length of a block.

Every function here goes through the Quantizer's own methods (set_state); nothing outside
quant/ writes a quantizer's fields.
"""
from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn

from ..errors import UsageError
from .quantizer import STATES, Quantizer


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


def set_quant_state(model: nn.Module, state: str, role: str | None = None) -> None:
    """Set every quantizer (or those of one role: 'weight'/'act') to observe/quant/off."""
    if state not in STATES:
        raise UsageError(f"unknown quantizer state {state!r}")
    for _, q in quantizers(model):
        if role is None or q.role == role:
            q.set_state(state)


@contextlib.contextmanager
def switched(model: nn.Module, on: Callable[[str, Quantizer], bool]):
    """Calibrated quantizers quantize where on(name, quantizer) is true and are off elsewhere,
    until the block ends; the previous states come back afterwards (also on errors)."""
    saved = [(q, q.state) for _, q in quantizers(model)]
    for name, q in quantizers(model):
        if q.calibrated:
            q.set_state("quant" if on(name, q) else "off")
    try:
        yield
    finally:
        for q, s in saved:
            q.set_state(s)


def quant_mode(model: nn.Module, weights: bool, acts: bool):
    """Temporarily set calibrated quantizers on/off by role ('weight' vs any activation role)."""
    return switched(model, lambda _, q: weights if q.role == "weight" else acts)
