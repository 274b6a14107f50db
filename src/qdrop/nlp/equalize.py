"""Function-preserving transforms that make Linear inputs easier to quantize.

All three act on a norm's output channels and compensate in its consumers (adapters.py).
With y the original norm output and y' the transformed one, every group keeps

    y = y' * S + B            (per channel; S = 1, B = 0 before any transform)

Consumers see y' and undo it: Linear W y + b = (W diag(S)) y' + (b + W B), and a post-LN
residual shortcut (BERT) is fed y' * S + B by a forward pre-hook. Two primitives:

    scale by s:  y' -> y'/s   norm weight and bias /= s,  W[:, j] *= s_j,  S *= s
    shift by z:  y' -> y'-z   norm bias -= z,              b += W z,        B += z * S

  gamma migration (Outlier Suppression): scale by gamma - the norm outputs x_hat + beta/gamma.
  SmoothQuant: scale by s_j = max|X_j|^a / max|W_j|^(1-a).
  OS+: shift by z_j = (max_j + min_j)/2, then scale by s_j = max(max'_j/t, min'_j/(-t), 1).

A norm without a bias (RMSNorm) gets one for the OS+ shift: a buffer `qdrop_bias` added to
its output by a forward hook. Linears without a bias (Llama) get a bias parameter for W z.
Hooks and buffers (not wrapper modules) keep every module name unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..quant.state import quant_mode
from ..quant.layers import QuantLayer
from ..quant.scheme import qparams_from_range
from .adapters import Adapter, LinearPair, NormGroup, find_adapter
from .layers import QuantLinear, per_token_fake_quant
from .mask import real_tokens, token_mask
from ..errors import DataError, UsageError
from .errors import UnsupportedModelError


# ---- primitives ------------------------------------------------------------------------
def _linear(model: nn.Module, name: str) -> nn.Linear:
    m = model.get_submodule(name)
    return m.layer if isinstance(m, QuantLayer) else m


def _untie(model: nn.Module, lin: nn.Linear) -> None:
    """A weight shared with another module (lm_head tied to the input embedding) becomes this
    Linear's own copy, so rescaling its columns leaves the embedding as it was."""
    holders = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is lin.weight)
    if holders > 1:
        lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False  # a later tie_weights() must not undo the copy


def _norm_bias_hook(module, args, output):
    return output + module.qdrop_bias


def _norm_bias(norm: nn.Module) -> torch.Tensor:
    """The tensor to edit for the norm's additive output term (creating one if needed)."""
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor):
        return b.data
    if not hasattr(norm, "qdrop_bias"):
        norm.register_buffer("qdrop_bias", torch.zeros_like(norm.weight.data))
        norm.register_forward_hook(_norm_bias_hook)
    return norm.qdrop_bias


def _shortcut_hook(module, args, kwargs):
    s, b = module.qdrop_shortcut_scale, module.qdrop_shortcut_shift
    if len(args) >= 2:
        args = (args[0], args[1] * s + b, *args[2:])
    elif "input_tensor" in kwargs:
        kwargs = {**kwargs, "input_tensor": kwargs["input_tensor"] * s + b}
    else:
        raise UnsupportedModelError(f"{type(module).__name__}: residual argument not found")
    return args, kwargs


def _shortcut(model: nn.Module, name: str, like: torch.Tensor) -> nn.Module:
    m = model.get_submodule(name)
    if not hasattr(m, "qdrop_shortcut_scale"):
        m.register_buffer("qdrop_shortcut_scale", torch.ones_like(like))
        m.register_buffer("qdrop_shortcut_shift", torch.zeros_like(like))
        m.register_forward_pre_hook(_shortcut_hook, with_kwargs=True)
    return m


@torch.no_grad()
def scale_group(model: nn.Module, g: NormGroup, s: torch.Tensor) -> None:
    """The norm outputs y'/s; its consumers compensate (exact in real arithmetic)."""
    norm = model.get_submodule(g.norm)
    s = s.to(norm.weight)
    norm.weight.data.div_(s)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.div_(s)
    if hasattr(norm, "qdrop_bias"):
        norm.qdrop_bias.div_(s)
    for n in g.linears:
        lin = _linear(model, n)
        _untie(model, lin)
        lin.weight.data.mul_(s)
    if g.shortcut:
        _shortcut(model, g.shortcut, s).qdrop_shortcut_scale.mul_(s)


@torch.no_grad()
def shift_group(model: nn.Module, g: NormGroup, z: torch.Tensor) -> None:
    """The norm outputs y' - z; Linear biases gain W z, the shortcut adds z * S back."""
    norm = model.get_submodule(g.norm)
    z = z.to(norm.weight)
    _norm_bias(norm).sub_(z)
    for n in g.linears:
        lin = _linear(model, n)
        wz = lin.weight.data @ z
        if lin.bias is None:
            lin.bias = nn.Parameter(wz)
        else:
            lin.bias.data.add_(wz)
    if g.shortcut:
        m = _shortcut(model, g.shortcut, z)
        m.qdrop_shortcut_shift.add_(z * m.qdrop_shortcut_scale)


@torch.no_grad()
def scale_pair(model: nn.Module, p: LinearPair, s: torch.Tensor) -> None:
    """prev's output channel j is divided by s_j, next's input column j multiplied by it."""
    prev, nxt = _linear(model, p.prev), _linear(model, p.next)
    s = s.to(prev.weight)
    prev.weight.data.div_(s[:, None])
    if prev.bias is not None:
        prev.bias.data.div_(s)
    nxt.weight.data.mul_(s)


# ---- statistics ------------------------------------------------------------------------
class _Stats:
    """Per-channel min/max over real tokens, plus a random sample of token rows and, with
    `extremes`, the rows of largest L2 norm and of largest |value| (the rows that set a
    per-tensor range once the channels are mixed by a rotation)."""

    def __init__(self, keep: int, gen: torch.Generator, extremes: int = 0):
        self.min = self.max = None
        self.rows: list[torch.Tensor] = []
        self.keep, self.gen, self.extremes = keep, gen, extremes
        self.top: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = real_tokens(x.detach()).reshape(-1, x.shape[-1]).float()
        if x.numel() == 0:
            return
        lo, hi = x.amin(0), x.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.keep:
            idx = torch.randperm(x.shape[0], generator=self.gen)[: self.keep].to(x.device)
            self.rows.append(x[idx])
        if self.extremes:
            cand = x if self.top is None else torch.cat([self.top, x])
            k = min(self.extremes, cand.shape[0])
            by_norm = cand.norm(dim=1).topk(k).indices
            by_peak = cand.abs().amax(1).topk(k).indices
            self.top = cand[torch.unique(torch.cat([by_norm, by_peak]))]

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


@torch.no_grad()
def channel_stats(model: nn.Module, batches, adapter: Adapter, sample_tokens: int = 0, seed: int = 0,
                  pairs: bool = True, extremes: dict[str, int] | None = None, progress: bool = False) -> dict[str, _Stats]:
    """FP statistics of every group's norm output (key: norm name) and every pair's `next`
    input (key: next name), over the real tokens of `batches`; the keys in `extremes` also keep
    that many most extreme rows (_Stats). Quantizers are switched off for the pass and restored
    afterwards."""
    extremes = extremes or {}
    batches = list(batches)
    gen = torch.Generator().manual_seed(seed)
    keep = math.ceil(sample_tokens / max(1, len(batches))) if sample_tokens else 0
    stats, handles = {}, []

    def out_hook(key):
        return lambda m, a, out: stats[key].update(out)

    def in_hook(key):
        return lambda m, a: stats[key].update(a[0])

    for g in adapter.groups:
        stats[g.norm] = _Stats(keep, gen, extremes.get(g.norm, 0))
        handles.append(model.get_submodule(g.norm).register_forward_hook(out_hook(g.norm)))
    for p in adapter.pairs if pairs else []:
        stats[p.next] = _Stats(keep, gen, extremes.get(p.next, 0))
        handles.append(model.get_submodule(p.next).register_forward_pre_hook(in_hook(p.next)))
    was_training = model.training
    model.eval()
    try:
        with quant_mode(model, weights=False, acts=False):
            for b in tqdm(batches, disable=not progress, desc="channel statistics", leave=False):
                with token_mask(b.get("attention_mask")):
                    model(**b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [k for k, s in stats.items() if s.min is None]
    if empty:
        raise DataError(f"no activations reached {empty[:3]} during the statistics pass")
    return stats


def _record(model: nn.Module, entry: dict) -> None:
    if hasattr(model, "qdrop_nlp"):
        model.qdrop_nlp.setdefault("transforms", []).append(entry)


# ---- the three methods -----------------------------------------------------------------
@torch.no_grad()
def gamma_migration(model: nn.Module, eps: float = 1e-4) -> int:
    """Outlier Suppression's Gamma Migration: each norm computes x_hat + beta/gamma and gamma
    moves into the consumers (Linears and, post-LN, the residual shortcut). Channels with
    |gamma| < eps keep their gamma (beta/gamma would blow up). Returns the groups migrated."""
    ad = find_adapter(model)
    for g in ad.groups:
        gamma = model.get_submodule(g.norm).weight.detach().clone()
        scale_group(model, g, torch.where(gamma.abs() >= eps, gamma, torch.ones_like(gamma)))
    _record(model, dict(name="gamma_migration", groups=len(ad.groups)))
    return len(ad.groups)


@torch.no_grad()
def smoothquant(model: nn.Module, batches, alpha: float = 0.5, down_proj: bool = False) -> dict:
    """SmoothQuant: s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha) over the calibration tokens,
    X the norm output (or, with down_proj=True, also up_proj -> down_proj in Llama MLPs);
    the norm (or up_proj) is divided by s, the Linears' input columns multiplied by it."""
    ad = find_adapter(model)
    stats = channel_stats(model, batches, ad, pairs=down_proj)
    for g in ad.groups:
        st = stats[g.norm]
        xmax = torch.maximum(st.max.abs(), st.min.abs())
        wmax = torch.stack([_linear(model, n).weight.detach().abs().amax(0) for n in g.linears]).amax(0)
        scale_group(model, g, _sq_scale(xmax, wmax, alpha))
    for p in ad.pairs if down_proj else []:
        st = stats[p.next]
        xmax = torch.maximum(st.max.abs(), st.min.abs())
        scale_pair(model, p, _sq_scale(xmax, _linear(model, p.next).weight.detach().abs().amax(0), alpha))
    _record(model, dict(name="smoothquant", alpha=alpha, down_proj=down_proj))
    return dict(groups=len(ad.groups), pairs=len(ad.pairs) if down_proj else 0)


def _sq_scale(xmax, wmax, alpha):
    s = xmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _quant_linear(model, name) -> QuantLinear:
    m = model.get_submodule(name)
    if not isinstance(m, QuantLinear):
        raise UsageError(f"OS+ searches the scale against the quantizers of {name}: run prepare_transformer first "
                         f"(and do not skip that layer)")
    return m


def _qerror(x, lo, hi, weights, ql: QuantLinear, ref) -> float:
    """Squared error of the quantized Linear outputs against FP, for input rows x with
    per-tensor range [lo, hi] (per-token quantizers use each row's range)."""
    a = ql.input_quant.scheme
    if ql.per_token:
        xq = per_token_fake_quant(x, a)
    else:
        scale, zp = qparams_from_range(lo, hi, a)
        xq = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()), a.qmin, a.qmax)
    err = 0.0
    w_s = ql.weight_quant.scheme
    for w, r in zip(weights, ref):
        ws, wz = qparams_from_range(w.amin(1), w.amax(1), w_s)
        wq = torch.fake_quantize_per_channel_affine(w, ws, wz.to(torch.int32), 0, w_s.qmin, w_s.qmax)
        err += (xq @ wq.T - r).pow(2).sum().item()
    return err


TOP_EXTENTS = 32


def _search_scale(x, lo_c, hi_c, weights, ql, grid, rotation=None, range_rows=None) -> tuple[torch.Tensor, float, float]:
    """OS+ scale s_j = max(hi_j/t, lo_j/(-t), 1), t from a grid of the channels' own
    extents (t = the largest extent is 'no scaling'), minimising the quantized output error
    of the Linears reading x. Returns (s, t, relative error).

    rotation: the orthogonal R the Linear will multiply its input by (rotate_inputs), so the
    quantizer will see (x/s) R and the weight be (W s) R. The error is then scored in that basis,
    where the per-channel extents no longer give the per-tensor range: it is taken from
    `range_rows` (the calibration rows of largest norm and peak, _Stats.top) together with the sample x."""
    ext = torch.maximum(hi_c, -lo_c).clamp(min=1e-8)
    cands = torch.unique(torch.quantile(ext, torch.linspace(0, 1, grid + 1)))
    ref = [x @ w.T for w in weights]
    ref_norm = sum(r.pow(2).sum().item() for r in ref)
    if rotation is not None:
        rotation = rotation.to(x)
        span_rows = x if range_rows is None else torch.cat([x, range_rows])
        # rotated, the search scales few channels (0-384 of SmolLM2's 1,536): between 'none' and the top
        # 5 % the quantile grid has no candidate, so the TOP_EXTENTS largest extents are candidates too
        # (t = the k-th largest extent scales the k-1 largest channels)
        cands = torch.unique(torch.cat([cands, ext.topk(min(TOP_EXTENTS, ext.numel())).values]))
    best = (None, None, math.inf)
    for t in cands.flip(0):  # from 'no scaling' downwards: ties keep the milder scaling
        s = (ext / t).clamp(min=1.0)
        if rotation is None:
            err = _qerror(x / s, (lo_c / s).min(), (hi_c / s).max(), [w * s for w in weights], ql, ref)
        else:
            span = (span_rows / s) @ rotation
            err = _qerror((x / s) @ rotation, span.min(), span.max(), [(w * s) @ rotation for w in weights], ql, ref)
        if err < best[2]:
            best = (s, float(t), err)
    return best[0], best[1], best[2] / max(ref_norm, 1e-30)


@torch.no_grad()
def osplus(model: nn.Module, batches, grid: int = 20, sample_tokens: int = 512, down_proj: bool = False,
           seed: int = 0, rotation: Callable[[int], torch.Tensor] | None = None, rotated: Iterable[str] = (),
           extremes: int = 64, progress: bool = False) -> dict:
    """OS+ (Wei et al., EMNLP 2023) on a prepared (not yet calibrated) model:
    channel shift z = (max + min)/2 at every norm output, folded into the norm's bias and the
    next Linears' biases; then channel scale s = max(max'/t, min'/(-t), 1) with t searched
    to minimise the quantized-vs-FP output error of those Linears (minmax ranges, on
    `sample_tokens` calibration tokens). down_proj=True also scales up_proj -> down_proj
    (no shift there: down_proj reads act(gate) * up, which a shift of up cannot pass).

    rotation: width -> the R that rotate_inputs will apply afterwards to the Linears named in
    `rotated` (their input then is (x/s) R). A group or pair whose Linears are all rotated scores its
    candidates in the rotated basis, its range from the sample and the `extremes` most extreme
    calibration rows (largest norm, largest peak) of its input; scored unrotated, the search
    overstates what scaling gains once a rotation has spread the outlier channels.
    progress: show the statistics pass and the searches (one per group and pair)."""
    ad = find_adapter(model)
    rotated = set(rotated) if rotation is not None else set()
    group_rot = {g.norm: all(n in rotated for n in g.linears) for g in ad.groups}
    pair_rot = {p.next: p.next in rotated for p in (ad.pairs if down_proj else [])}
    keep_rows = {k: extremes for k, r in {**group_rot, **pair_rot}.items() if r}
    stats = channel_stats(model, batches, ad, sample_tokens=sample_tokens, seed=seed, pairs=down_proj,
                          extremes=keep_rows, progress=progress)
    bar = tqdm(total=len(ad.groups) + (len(ad.pairs) if down_proj else 0), disable=not progress,
               desc="OS+ scale search", leave=False)

    def search(st, z, weights, ql, key):
        rot = rotation(weights[0].shape[1]).float() if key in keep_rows else None
        top = st.top - z if rot is not None else None
        return _search_scale(st.sample() - z, st.min - z, st.max - z, weights, ql, grid, rotation=rot,
                             range_rows=top) + (rot is not None,)

    report = []
    for g in ad.groups:
        st = stats[g.norm]
        z = (st.max + st.min) / 2
        shift_group(model, g, z)
        weights = [_linear(model, n).weight.detach().float() for n in g.linears]
        s, t, err, rot = search(st, z, weights, _quant_linear(model, g.linears[0]), g.norm)
        scale_group(model, g, s)
        report.append(dict(norm=g.norm, t=t, scaled=int((s > 1).sum()), rel_err=err, rotated=rot))
        bar.update()
    for p in ad.pairs if down_proj else []:
        st = stats[p.next]
        w = _linear(model, p.next).weight.detach().float()
        s, t, err, rot = search(st, 0.0, [w], _quant_linear(model, p.next), p.next)
        scale_pair(model, p, s)
        report.append(dict(norm=p.next, t=t, scaled=int((s > 1).sum()), rel_err=err, rotated=rot))
        bar.update()
    bar.close()
    _record(model, dict(name="osplus", grid=grid, sample_tokens=sample_tokens, down_proj=down_proj,
                        rotation_aware=sorted(keep_rows)))
    return dict(groups=report)
