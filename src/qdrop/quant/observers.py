"""Observers: turn the values a quantizer sees during calibration into a clipping range.

Every observer reduces a tensor to rows, one per channel (a single row when per-tensor),
and returns (lo, hi) of shape [C] (or [] per-tensor). MinMax and EMA keep running
statistics; Percentile and MSE keep a bounded random sample of each row so that
memory stays flat however many batches are observed, except for a tensor observed whole
(a weight, Quantizer.calibrate_on), which they search in full.
"""
from __future__ import annotations

import torch

from .scheme import QScheme, qparams_from_range
from ..errors import UsageError

SAMPLE_PER_BATCH = 1 << 16  # values kept from each batch (per-tensor)
SAMPLE_TOTAL = 1 << 18  # values searched over at the end (per-tensor)


def rows(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """[C, K] view of x: one row per channel along ch_axis, or a single row."""
    x = x.detach().float()
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def _lp_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme, p: float) -> torch.Tensor:
    """Mean |x - q(x)|^p per row for candidate ranges lo, hi of shape [m, C]; x is [C, K].

    q(x) is PyTorch's fake-quantization, element for element (fake_quantize_per_channel_affine's
    (clamp(round(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale, bit for bit), written as broadcast
    in-place steps: one [m, C, K] buffer instead of an expanded copy of x plus the kernel's output.
    """
    scale, zp = qparams_from_range(lo, hi, scheme)
    scale, zp = scale[..., None], zp[..., None]  # [m, C, 1]
    err = (x[None] * (1.0 / scale)).round_().add_(zp).clamp_(scheme.qmin, scheme.qmax).sub_(zp).mul_(scale)
    return err.sub_(x[None]).abs_().pow_(p).mean(-1)


def _without_zeros(x: torch.Tensor) -> torch.Tensor:
    """A single row x [1, K] without its exact zeros, which every candidate range quantizes exactly
    (qparams_from_range widens each range to hold 0): each candidate's mean error is scaled by the
    same factor K / K', so the search picks the same range (up to the order of a float sum: the same
    bits on ResNet-20's activations, tests/test_quant.py) from half the values after a ReLU."""
    if x.shape[0] != 1:
        return x
    nz = x[x != 0]
    return nz[None] if nz.numel() else x[:, :1]


def _best(x, cand_lo, cand_hi, scheme, p):
    """Best candidate per row: returns (lo, hi, index) each [C]."""
    n, C = cand_lo.shape
    chunk = max(1, (1 << 23) // max(1, x.numel()))
    errs = torch.cat([_lp_error(x, cand_lo[i : i + chunk], cand_hi[i : i + chunk], scheme, p) for i in range(0, n, chunk)])
    idx = errs.argmin(0)
    ar = torch.arange(C, device=x.device)
    return cand_lo[idx, ar], cand_hi[idx, ar], idx


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

    Stage 1 (all schemes): the range [lo, hi] shrunk to i/num of its width, i = 1..num.
    Stage 2 (asymmetric schemes, rows with both signs): the zero-point search - each
    width near the stage-1 optimum (+-2 steps) slides across [lo, hi] at `zp_steps`
    positions. The stage-1 winner stays a candidate, so stage 2 never does worse.
    Searching all num x zp_steps pairs costs 20x more for a difference we did not
    measure to matter.
    """
    x = _without_zeros(x)
    frac = torch.arange(1, num + 1, dtype=x.dtype, device=x.device) / num  # [num]
    best_lo, best_hi, idx = _best(x, lo[None] * frac[:, None], hi[None] * frac[:, None], scheme, p)
    two_sided = (lo < 0) & (hi > 0)
    if scheme.symmetric or zp_steps < 2 or not bool(two_sided.any()):
        return best_lo, best_hi
    steps = torch.arange(-2, 3, device=x.device)
    width_frac = frac[(idx[None] + steps[:, None]).clamp(0, num - 1)]  # [5, C]
    width = (hi - lo)[None] * width_frac  # [5, C]
    t = torch.linspace(0, 1, zp_steps, dtype=x.dtype, device=x.device)[:, None, None]
    slide_lo = (lo[None, None] + t * ((hi - lo)[None, None] - width[None])).reshape(-1, lo.shape[0])
    slide_hi = slide_lo + width[None].expand(zp_steps, -1, -1).reshape(-1, lo.shape[0])
    cand_lo = torch.cat([best_lo[None], torch.where(two_sided[None], slide_lo, best_lo[None])])
    cand_hi = torch.cat([best_hi[None], torch.where(two_sided[None], slide_hi, best_hi[None])])
    best_lo, best_hi, _ = _best(x, cand_lo, cand_hi, scheme, p)
    return best_lo, best_hi


class Observer:
    """Base observer: keeps exact running min/max per row."""

    def __init__(self, scheme: QScheme):
        self.scheme = scheme
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor, whole: bool = False) -> None:
        """Observe a batch. whole: x is the entire population (a weight, seen once), which
        sampling observers then search in full instead of sampling."""
        r = rows(x, self.scheme.ch_axis)
        bmin, bmax = r.amin(1), r.amax(1)
        if self.min is None:
            self.min, self.max = bmin, bmax
        else:
            self.min, self.max = torch.minimum(self.min, bmin), torch.maximum(self.max, bmax)
        self.batches += 1
        self._update(r, bmin, bmax, whole)

    def _update(self, r, bmin, bmax, whole) -> None:
        pass

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise UsageError("observer saw no data: run calibration batches first")
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

    def _update(self, r, bmin, bmax, whole):
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            m = self.momentum
            self.ema_min = m * self.ema_min + (1 - m) * bmin
            self.ema_max = m * self.ema_max + (1 - m) * bmax

    def _range(self):
        return self._squeeze(self.ema_min), self._squeeze(self.ema_max)


class _SamplingObserver(Observer):
    """Keeps a bounded uniform sample of each row, or every value of a tensor observed whole.

    The bound is per tensor, so a per-channel scheme keeps SAMPLE_PER_BATCH // rows values
    of each row: for a weight that would be 42 of each of MiniLM's 384-value rows, one of
    each of SmolLM2's lm_head rows, 51 of EfficientNet-Lite0's 320. Weights are therefore
    observed whole (Quantizer.calibrate_on), and are small enough to search in full."""

    def __init__(self, scheme: QScheme, seed: int = 0):
        super().__init__(scheme)
        self.samples: list[torch.Tensor] = []
        self.whole = False
        self.gen = torch.Generator().manual_seed(seed)

    def _update(self, r, bmin, bmax, whole):
        if whole:
            self.whole = True
            self.samples.append(r.clone())
            return
        C, K = r.shape
        keep = max(1, SAMPLE_PER_BATCH // C)
        if K > keep:
            idx = torch.randint(0, K, (keep,), generator=self.gen).to(r.device)
            r = r[:, idx]
        self.samples.append(r)

    def sample(self) -> torch.Tensor:
        s = torch.cat(self.samples, 1)
        if self.whole:
            return s
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
        raise UsageError(f"unknown observer {scheme.observer!r}; choose from {sorted(OBSERVERS)}") from None
