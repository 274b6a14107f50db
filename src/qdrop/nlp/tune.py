"""End-to-end step-size tuning of a quantized transformer: every weight quantizer's per-channel step size
learned against the FP model's output, with the integer codes held (Quantizer.learn_step).

Why after GPTQ: GPTQ chooses each Linear's codes against that Linear's own output error, block by
block, so the error each layer leaves still adds up through the 30 blocks and lm_head. Measured where
SmolLM2-135M W4A8 loses (README, #12; benchmarks/transformer_parts.py): the 4-bit weights cost 1.75
perplexity, the 8-bit activations 0.07, and lm_head alone 0.3-0.46 - lm_head belongs to no block, so
block reconstruction never sees it. Here the objective is the model's prediction itself: the KL
divergence from the FP model's next-token distribution (a model with logits), or the squared error of
the last hidden state (an encoder), over real tokens only. The parameters are the step sizes alone,
one per output channel (205k on SmolLM2 against 135M weights), so a few hundred calibration segments
can set them without fitting the calibration text: EfficientQAT's E2E-QP (Chen et al., 2024) and PEQA
(Kim et al., 2023) train the same parameters, on training data, after their codes are fixed.

The FP target is the same model with its quantizers off (the transforms and rotations are exact), run
without gradients on each step's batch: about a third more time per step, and no cache of the
calibration set's logits (6.4 GB of float32 for SmolLM2's 49k-token vocabulary over 256 x 128 tokens).
Activation ranges stay as calibrated (SmolLM2's 8-bit activations cost 0.07). Adam on log(s / s0),
cosine schedule, one calibration batch per step in a seeded order. The run is not resumable after a kill;
it is minutes long and the pipeline before it is not resumable either.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import UsageError
from ..quant.state import quant_mode
from .prepare import quant_linears

E2E_LR = 1e-2  # Adam's step on log(s / s0): the best of 1e-3, 5e-3, 1e-2, 2e-2 on SmolLM2 W4A8 (docs/nlp.md)


def prediction(out) -> tuple[torch.Tensor, bool]:
    """The model's per-token prediction, [batch, tokens, features], and whether it is logits (a causal LM's, a token
    classifier's) or hidden states (an encoder's last layer)."""
    logits = getattr(out, "logits", None)
    y, is_logits = (logits, True) if logits is not None else (getattr(out, "last_hidden_state", None), False)
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or (is_logits and y.shape[-1] < 2):
        raise UsageError("e2e step-size tuning needs per-token outputs: token logits [batch, tokens, vocab] or a "
                         "last_hidden_state; a sequence classifier's or regressor's head has neither (tune its encoder)")
    return y, is_logits


def prediction_loss(y_q: torch.Tensor, y_fp: torch.Tensor, real: torch.Tensor | None, logits: bool) -> torch.Tensor:
    """Mean over real tokens of KL(p_fp || p_q) (logits) or of the squared error summed over features."""
    if logits:
        lp_fp = F.log_softmax(y_fp.float(), -1)
        per_token = (lp_fp.exp() * (lp_fp - F.log_softmax(y_q.float(), -1))).sum(-1)
    else:
        per_token = (y_q.float() - y_fp.float()).pow(2).sum(-1)
    if real is None:
        return per_token.mean()
    real = real.to(per_token.dtype)
    return (per_token * real).sum() / real.sum().clamp(min=1)


def tune_step_sizes(qmodel: nn.Module, batches: list, steps: int, lr: float = E2E_LR, seed: int = 0,
                    progress: bool = False) -> dict:
    """Learn every quantized Linear's weight step sizes end to end (module docstring), in place; returns a report
    (the loss over the first and the last pass through the batches, how far the steps moved, seconds)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"e2e steps must be a positive integer (optimizer steps, one calibration batch each), got {steps!r}")
    if not lr > 0:
        raise UsageError(f"e2e lr must be positive (Adam's step on log(s / s0), e.g. {E2E_LR}), got {lr!r}")
    if not batches:
        raise UsageError("e2e step-size tuning needs calibration batches")
    layers = [m for _, m in quant_linears(qmodel) if m.weight_quant.state == "quant"]
    if not layers:
        raise UsageError("e2e step-size tuning found no weight quantizer on (state 'quant'): calibrate the model, "
                         "and call it outside quant_mode(weights=False)")
    if any(m.weight_quant.alpha is not None or m.weight_quant.log_step is not None for m in layers):
        raise UsageError("e2e step-size tuning needs every weight's rounding decided: finish the reconstruction "
                         "(fix_rounding) first")
    device = next(qmodel.parameters()).device
    use_cache = {"use_cache": False} if hasattr(getattr(qmodel, "config", None), "use_cache") else {}
    t0 = time.perf_counter()
    was_training = qmodel.training
    qmodel.eval()
    grads = [p.requires_grad for p in qmodel.parameters()]
    for p in qmodel.parameters():
        p.requires_grad_(False)
    s0 = [m.weight_quant.scale.detach().clone() for m in layers]
    g = torch.Generator().manual_seed(seed)
    losses, order = [], []
    bar = tqdm(total=steps, desc="e2e step sizes", unit="step", disable=not progress, dynamic_ncols=True)
    try:  # whatever stops it, every quantizer ends with its codes fixed on the steps learned so far
        for m in layers:
            m.weight_quant.learn_step(m.layer.weight)
        opt = torch.optim.Adam([m.weight_quant.log_step for m in layers], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[order.pop()].items()}
            with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
                y_fp, _ = prediction(qmodel(**batch, **use_cache))
            y_q, logits = prediction(qmodel(**batch, **use_cache))
            loss = prediction_loss(y_q, y_fp, batch.get("attention_mask"), logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"e2e step-size tuning: the loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        for m in layers:
            if m.weight_quant.log_step is not None:
                m.weight_quant.fix_step()
        for p, r in zip(qmodel.parameters(), grads):
            p.requires_grad_(r)
        qmodel.train(was_training)
    moved = torch.cat([(m.weight_quant.scale.detach() / s).log().abs().flatten() for m, s in zip(layers, s0)])
    n = min(len(batches), steps)  # a pass: one step per batch
    return dict(steps=steps, lr=lr, batches=len(batches), quantizers=len(layers), step_sizes=int(moved.numel()),
                loss_first_pass=round(sum(losses[:n]) / n, 6), loss_last_pass=round(sum(losses[-n:]) / n, 6),
                step_change_median=round(float(moved.median()), 5), step_change_max=round(float(moved.max()), 5),
                seconds=round(time.perf_counter() - t0, 1))
