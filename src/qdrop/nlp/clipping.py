"""Outlier Suppression's Token-Wise Clipping (Wei et al., NeurIPS 2022).

Outliers in transformer activations come from a few tokens ([SEP], punctuation, the first
token). Clipping them costs little, so the range of each activation quantizer is chosen
over *tokens* rather than values:

  coarse  one ratio alpha for the whole model; every static input quantizer gets
          [quantile_{1-alpha}(per-token minima), quantile_alpha(per-token maxima)] over the
          real (non-padding) calibration tokens. alpha is searched from 1.0 downwards in
          steps of `step` over a span of 0.1 / 0.3 / 0.9 for 8 / 6 / 4-bit activations,
          keeping the alpha with the lowest MSE between the quantized and the FP model's
          final outputs (real tokens only).
  fine    LSQ+: the coarse scales and zero points become learnable (Quantizer.learn_scale)
          and are trained with Adam (lr 1e-2 here, 1e-5 in the paper; cosine decay) for a few epochs on the same loss.

Differences from the official code: the quantile is taken over all calibration tokens at
once (the official observer averages per-batch quantiles); the step is fixed (0.01) rather
than derived from batch size and sequence length.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..eval.nlp_metrics import mean_pool, model_output
from ..quant.state import quant_mode
from ..quant.scheme import qparams_from_range
from .layers import QuantLinear
from .mask import real_tokens, token_mask
from ..errors import UsageError

SPAN = {8: 0.1, 7: 0.2, 6: 0.3, 5: 0.6, 4: 0.9, 3: 0.9, 2: 0.9}


def _static_inputs(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and not m.per_token]


def _run(model, batch):
    with token_mask(batch.get("attention_mask")):
        return model_output(model(**batch))


LOSS_ON = ("tokens", "mean_pool")


def _masked(out: torch.Tensor, batch: dict, loss_on: str = "tokens") -> torch.Tensor:
    """What the loss compares: every real token's output, or (sentence embedders) the mean
    of the real tokens' outputs - the embedding the model is used for."""
    m = batch.get("attention_mask")
    if loss_on == "mean_pool":
        return mean_pool(out, m if m is not None else torch.ones(out.shape[:2], dtype=torch.long))
    return out if m is None else out[m.bool()]


@torch.no_grad()
def token_ranges(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token minima and maxima (real tokens only) of every static QuantLinear input, FP model."""
    mins, maxs, handles = {}, {}, []
    layers = _static_inputs(model)

    def hook(name):
        def f(m, args):
            x = real_tokens(args[0].detach()).reshape(-1, args[0].shape[-1]).float()
            mins.setdefault(name, []).append(x.amin(1))
            maxs.setdefault(name, []).append(x.amax(1))
        return f

    for n, m in layers:
        handles.append(m.register_forward_pre_hook(hook(n)))
    try:
        with quant_mode(model, weights=False, acts=False):
            for b in batches:
                _run(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat(mins[n]), torch.cat(maxs[n])) for n, _ in layers if n in mins}


@torch.no_grad()
def _set_ratio(model, ranges, alpha: float) -> None:
    for n, m in _static_inputs(model):
        if n not in ranges:
            continue
        tmin, tmax = ranges[n]
        q = m.input_quant
        lo = torch.quantile(tmin, 1 - alpha) if alpha < 1 else tmin.min()
        hi = torch.quantile(tmax, alpha) if alpha < 1 else tmax.max()
        scale, zp = qparams_from_range(lo, hi, q.scheme)
        q.set_range(scale, zp)


def output_loss(model, batches, targets, loss_on: str = "tokens") -> float:
    """Sum over batches of the MSE between the model's outputs and `targets` (real tokens only)."""
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(_masked(_run(model, b), b, loss_on), t).item() for b, t in zip(batches, targets))


def token_wise_clipping(qmodel: nn.Module, batches, step: float = 0.01, span: float | None = None,
                        fine_epochs: int = 3, lr: float = 1e-2, loss_on: str = "tokens", patience: int | None = None,
                        progress: bool = False) -> dict:
    """Coarse + fine token-wise clipping of every static QuantLinear input quantizer of a
    calibrated model (weights quantized as calibrated). Returns a report with the chosen
    alpha and the losses.

    loss_on: 'tokens' - MSE over every real token's final output (the model's output when
    it is used per token); 'mean_pool' - MSE of the mean-pooled output, for sentence
    embedders whose output *is* that mean (all-MiniLM-L6-v2).
    patience: stop the alpha search after this many successive alphas without a new best
    (None: search the whole span, as the paper)."""
    report = coarse_clipping(qmodel, batches, step, span, loss_on, patience, progress)
    if fine_epochs > 0:
        report.update(fine_clipping(qmodel, batches, fine_epochs, lr, loss_on, progress))
    return report


def _targets(qmodel, batches, loss_on):
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        return [_masked(_run(qmodel, b), b, loss_on) for b in batches]


def coarse_clipping(qmodel: nn.Module, batches, step: float = 0.01, span: float | None = None, loss_on: str = "tokens",
                    patience: int | None = None, progress: bool = False) -> dict:
    """The coarse stage alone: one alpha for all quantizers, the one with the lowest MSE."""
    if loss_on not in LOSS_ON:
        raise UsageError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    batches = list(batches)
    layers = _static_inputs(qmodel)
    if not layers:
        raise UsageError("token-wise clipping needs static (per-tensor) input quantizers; this model has none")
    bits = layers[0][1].input_quant.bits
    span = SPAN.get(bits, 0.9) if span is None else span
    qmodel.eval()
    ranges = token_ranges(qmodel, batches)
    targets = _targets(qmodel, batches, loss_on)
    n = int(round(span / step))
    trials, since_best = [], 0
    for i in tqdm(range(n + 1), disable=not progress, desc="token-wise clipping", leave=False):
        alpha = round(1.0 - i * step, 6)
        _set_ratio(qmodel, ranges, alpha)
        loss = output_loss(qmodel, batches, targets, loss_on)
        since_best = 0 if not trials or loss < min(trials)[0] else since_best + 1
        trials.append((loss, alpha))
        if patience is not None and since_best >= patience:
            break
    coarse_loss, alpha = min(trials)
    _set_ratio(qmodel, ranges, alpha)
    return dict(alpha=alpha, span=span, step=step, loss_on=loss_on, patience=patience, coarse_loss=coarse_loss,
                loss_alpha_1=trials[0][0], trials=[dict(alpha=a, loss=l) for l, a in trials])


def fine_clipping(qmodel: nn.Module, batches, epochs: int = 3, lr: float = 1e-2, loss_on: str = "tokens",
                  progress: bool = False) -> dict:
    """The fine stage alone (LSQ+ from the current ranges). If the trained ranges end with
    a higher loss than they started (it happens with tiny learning rates, by the zero-point
    rounding at the end), the starting ranges are kept."""
    batches = list(batches)
    quants = [m.input_quant for _, m in _static_inputs(qmodel)]
    targets = _targets(qmodel, batches, loss_on)
    start_loss = output_loss(qmodel, batches, targets, loss_on)
    start = [(q.scale.detach().clone(), q.zero_point.detach().clone()) for q in quants]
    fine_loss = _learn_scales(qmodel, quants, batches, targets, epochs, lr, loss_on, progress)
    kept = fine_loss <= start_loss
    if not kept:
        with torch.no_grad():
            for q, (sc, zp) in zip(quants, start):
                q.set_range(sc, zp)
    return dict(fine_epochs=epochs, fine_lr=lr, fine_start_loss=start_loss, fine_loss=fine_loss, fine_kept=kept)


def _learn_scales(model, quants, batches, targets, epochs, lr, loss_on, progress) -> float:
    """LSQ+ fine stage: only the activation step sizes and zero points train."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = []
    for q in quants:
        q.learn_scale(zero_point=not q.scheme.symmetric)
        params += [q.scale] + ([q.zero_point] if not q.scheme.symmetric else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(batches), eta_min=0.0)
    try:
        with torch.enable_grad():
            for _ in tqdm(range(epochs), disable=not progress, desc="LSQ+ fine stage", leave=False):
                for b, t in zip(batches, targets):
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.mse_loss(_masked(_run(model, b), b, loss_on), t)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        for q in quants:
            q.stop_learning()
        for p in frozen:
            p.requires_grad_(True)
    return output_loss(model, batches, targets, loss_on)
