"""Observers: turn the values a quantizer sees during calibration into a clipping range.

Every observer reduces a tensor to rows, one per channel (a single row when per-tensor),
and returns (lo, hi) of shape [C] (or [] per-tensor). MinMax and EMA keep running
statistics; Percentile and MSE keep a bounded random sample of each row so that
memory stays flat however many batches are observed.
"""
from __future__ import annotations

import torch

from .scheme import QScheme, qparams_from_range

SAMPLE_PER_BATCH = 1 << 16  # values kept from each batch (per-tensor)
SAMPLE_TOTAL = 1 << 18  # values searched over at the end (per-tensor)


def rows(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """[C, K] view of x: one row per channel along ch_axis, or a single row."""
    x = x.detach().float()
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """Plain (non-differentiable-rounding) fake quantization with broadcasting qparams."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def mse_search(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scheme: QScheme,
    p: float = 2.4,
    num: int = 100,
    zp_steps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising the mean |x - q(x)|^p per row of x [C, K].

    Candidates: the range [lo, hi] shrunk to i/num of its width (i = 1..num). For an
    asymmetric scheme on a row with both signs, each width also slides across [lo, hi]
    at `zp_steps` positions (the zero-point search); the proportional shrink is always
    one of the positions, so the 2-D search never does worse than the 1-D one.
    """
    C = x.shape[0]
    frac = torch.arange(1, num + 1, dtype=x.dtype, device=x.device) / num  # [num]
    cand_lo = lo[None] * frac[:, None]  # [num, C]
    cand_hi = hi[None] * frac[:, None]
    two_sided = (lo < 0) & (hi > 0)
    if not scheme.symmetric and zp_steps > 1 and bool(two_sided.any()):
        width = (hi - lo)[None] * frac[:, None]  # [num, C]
        t = torch.linspace(0, 1, zp_steps, dtype=x.dtype, device=x.device)[:, None, None]
        slide_lo = lo[None, None] + t * ((hi - lo)[None, None] - width[None])  # [zp, num, C]
        # rows with a single sign keep the 1-D candidates only
        keep = two_sided[None, None].expand_as(slide_lo)
        slide_lo = torch.where(keep, slide_lo, cand_lo[None].expand_as(slide_lo))
        slide_hi = torch.where(keep, slide_lo + width[None], cand_hi[None].expand_as(slide_lo))
        cand_lo = torch.cat([cand_lo, slide_lo.reshape(-1, C)])
        cand_hi = torch.cat([cand_hi, slide_hi.reshape(-1, C)])
    n = cand_lo.shape[0]
    best = torch.full((C,), float("inf"), dtype=x.dtype, device=x.device)
    best_lo, best_hi = lo.clone(), hi.clone()
    chunk = max(1, (1 << 24) // max(1, x.numel()))
    for start in range(0, n, chunk):
        c_lo, c_hi = cand_lo[start : start + chunk], cand_hi[start : start + chunk]  # [m, C]
        scale, zp = qparams_from_range(c_lo, c_hi, scheme)
        xq = fake_quant(x[None], scale[..., None], zp[..., None], scheme.qmin, scheme.qmax)
        err = (xq - x[None]).abs().pow(p).mean(-1)  # [m, C]
        m_err, m_idx = err.min(0)
        better = m_err < best
        best = torch.where(better, m_err, best)
        ar = torch.arange(C, device=x.device)
        best_lo = torch.where(better, c_lo[m_idx, ar], best_lo)
        best_hi = torch.where(better, c_hi[m_idx, ar], best_hi)
    return best_lo, best_hi


class Observer:
    """Base observer: keeps exact running min/max per row."""

    def __init__(self, scheme: QScheme):
        self.scheme = scheme
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        r = rows(x, self.scheme.ch_axis)
        bmin, bmax = r.amin(1), r.amax(1)
        if self.min is None:
            self.min, self.max = bmin, bmax
        else:
            self.min, self.max = torch.minimum(self.min, bmin), torch.maximum(self.max, bmax)
        self.batches += 1
        self._update(r, bmin, bmax)

    def _update(self, r, bmin, bmax) -> None:
        pass

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("observer saw no data: run calibration batches first")
        return self._range()

    def _range(self):
        return self.min, self.max

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.scheme.ch_axis is None else t


class MinMaxObserver(Observer):
    def _range(self):
        return self._squeeze(self.min), self._squeeze(self.max)


class EMAMinMaxObserver(Observer):
    def __init__(self, scheme: QScheme, momentum: float = 0.9):
        super().__init__(scheme)
        self.momentum = momentum
        self.ema_min = self.ema_max = None

    def _update(self, r, bmin, bmax):
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            m = self.momentum
            self.ema_min = m * self.ema_min + (1 - m) * bmin
            self.ema_max = m * self.ema_max + (1 - m) * bmax

    def _range(self):
        return self._squeeze(self.ema_min), self._squeeze(self.ema_max)


class _SamplingObserver(Observer):
    """Keeps a bounded uniform sample of each row (all of it when small, e.g. weights)."""

    def __init__(self, scheme: QScheme, seed: int = 0):
        super().__init__(scheme)
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def _update(self, r, bmin, bmax):
        C, K = r.shape
        keep = max(1, SAMPLE_PER_BATCH // C)
        if K > keep:
            idx = torch.randint(0, K, (keep,), generator=self.gen).to(r.device)
            r = r[:, idx]
        self.samples.append(r)

    def sample(self) -> torch.Tensor:
        s = torch.cat(self.samples, 1)
        C, K = s.shape
        limit = max(1, SAMPLE_TOTAL // C)
        if K > limit:
            idx = torch.randint(0, K, (limit,), generator=self.gen).to(s.device)
            s = s[:, idx]
        return s


class PercentileObserver(_SamplingObserver):
    def __init__(self, scheme: QScheme, percentile: float = 99.99, seed: int = 0):
        super().__init__(scheme, seed)
        self.q = percentile / 100.0

    def _range(self):
        s = self.sample()
        lo = torch.quantile(s, 1 - self.q, dim=1)
        hi = torch.quantile(s, self.q, dim=1)
        return self._squeeze(lo), self._squeeze(hi)


class MSEObserver(_SamplingObserver):
    """Lp-norm (p = 2.4) clipping search over 100 candidates, plus a zero-point search."""

    def __init__(self, scheme: QScheme, p: float = 2.4, num: int = 100, zp_steps: int = 20, seed: int = 0):
        super().__init__(scheme, seed)
        self.p, self.num, self.zp_steps = p, num, zp_steps

    def _range(self):
        lo, hi = mse_search(self.sample(), self.min, self.max, self.scheme, self.p, self.num, self.zp_steps)
        return self._squeeze(lo), self._squeeze(hi)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema_minmax": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(scheme: QScheme) -> Observer:
    try:
        return OBSERVERS[scheme.observer](scheme)
    except KeyError:
        raise ValueError(f"unknown observer {scheme.observer!r}; choose from {sorted(OBSERVERS)}") from None
