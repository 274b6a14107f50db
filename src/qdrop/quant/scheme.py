"""Quantization schemes: what integer grid a tensor is mapped onto.

A scheme is plain data. The integer grid is [qmin, qmax]; a real value x maps to
clamp(round(x / scale) + zero_point, qmin, qmax) and back to (q - zero_point) * scale.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from ..errors import UsageError


@dataclass(frozen=True)
class QScheme:
    bits: int = 8
    symmetric: bool = False
    # Signed grid [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]. None: signed when
    # symmetric, unsigned when asymmetric (the usual int8 / uint8 convention).
    signed: bool | None = None
    # Drop the most negative code of a signed grid ([-127, 127] for int8), as
    # TensorRT and ONNX Runtime do for symmetric weights.
    narrow_range: bool = False
    # None: per-tensor. An int: one scale per index along that axis.
    ch_axis: int | None = None
    observer: str = "minmax"  # minmax | ema_minmax | percentile | mse

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UsageError(f"bit-width must be an integer in 2..8, got {self.bits!r}")

    @property
    def is_signed(self) -> bool:
        return self.symmetric if self.signed is None else self.signed

    @property
    def qmin(self) -> int:
        if not self.is_signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.is_signed else 2**self.bits - 1

    def with_(self, **kw) -> "QScheme":
        return replace(self, **kw)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme, eps: float = 1e-8):
    """Scale and zero point for a clipping range [lo, hi] (tensors of equal shape).

    The range is widened to include 0 so that zero (padding, ReLU output) is exact.
    Zero points are returned as float tensors holding integers.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        if scheme.is_signed:
            # -128..127 -> amax/127.5 (PyTorch's convention); narrow -127..127 -> amax/127
            denom = qmax if scheme.narrow_range else (qmax - qmin) / 2
        else:
            denom = qmax
        scale = torch.clamp(amax / denom, min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


_BITS = re.compile(r"^w(\d+)a(\d+)$")
_MIXED_BITS = re.compile(r"^w(\d+(?:\.\d+)?)a(\d+)$")


def is_average_bits(text: str) -> bool:
    """Weight bits written with a decimal point are an average over layers: w2.5a4, w3.0a4 (mixed
    precision); w3a4 is uniform."""
    return "." in str(text).lower().split("a")[0]


def parse_mixed_bits(text: str) -> tuple[float, int]:
    """'w2.5a4' -> (2.5, 4): a fractional weight bit-width is an average-bits budget for a
    mixed-precision search (qdrop.recon.mixed); 'w4a4' -> (4.0, 4)."""
    m = _MIXED_BITS.match(text.strip().lower()) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"bits must look like 'w4a4' or 'w2.5a4' (weights 2-8, activations 2-8), got {text!r}")
    w, a = float(m.group(1)), int(m.group(2))
    if not 2 <= w <= 8 or not 2 <= a <= 8:
        raise UsageError(f"bit-widths in {text!r} are outside 2..8")
    return w, a


def parse_bits(text: str) -> tuple[int, int]:
    """'w4a4' -> (4, 4). Weight and activation bit-widths must be in 2..8."""
    m = _BITS.match(text.strip().lower()) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"bits must look like 'w4a4' (weights 2-8, activations 2-8), got {text!r}")
    w, a = int(m.group(1)), int(m.group(2))
    for kind, b in (("weight", w), ("activation", a)):
        if not 2 <= b <= 8:
            raise UsageError(f"{kind} bit-width {b} in {text!r} is outside 2..8")
    return w, a
