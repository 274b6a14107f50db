"""quantize_transformer: prepare -> equivalent transform -> calibrate -> clipping, the observer-based
algorithms for transformers (the job that evaluates and writes files is qdrop.nlp_pipeline)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .clipping import token_wise_clipping
from .equalize import gamma_migration, osplus, smoothquant
from .gptq import gptq_transformer
from .prepare import calibrate_transformer, prepare_transformer
from .rotation import rotate_inputs, rotation_matrix, rotation_targets
from ..errors import UsageError
from ..quant.gptq import DAMP, SEARCH_FACTORS

NLP_ALGOS = ("naive", "smoothquant", "osplus", "os")
W_ROUNDINGS = ("nearest", "gptq")


# Fine stage of token-wise clipping: Adam on the quantizers' scale/offset. The OS paper's lr 1e-5
# moves a scale of ~0.1 by ~2e-4 in the 24 steps of 3 epochs over 256 samples (Adam steps are ~lr
# whatever the gradient): on MiniLM W6A6 it left OS at the coarse result (85.50, FP 86.72) where
# 1e-2 reaches 86.26; at W8A8 both keep the coarse ranges (the fine stage is undone when its loss
# is not lower). benchmarks/results/nlp.json has both.
FINE_LR = 1e-2

def quantize_transformer(model: nn.Module, calib_batches: list, bits: str = "w8a8", algo: str = "naive",
                         act_granularity: str = "per_tensor", w_observer: str = "mse", a_observer: str = "minmax",
                         quantize_attention_matmuls: bool = False, skip=(), down_proj: bool = False,
                         rotate: str | None = None, w_rounding: str = "nearest", gptq_batches: list | None = None,
                         gptq_damp: float = DAMP, gptq_search: bool = False, alpha: float = 0.5, fine_epochs: int = 3, fine_lr: float = FINE_LR, loss_on: str = "tokens",
                         patience: int | None = None, seed: int = 0, inplace: bool = False, progress: bool = False) -> tuple[nn.Module, dict]:
    """prepare -> (transform) -> calibrate -> (token-wise clipping). Returns (qmodel, report).

    naive        observers only
    smoothquant  SmoothQuant scales (alpha) folded into norms and Linears, then observers
    osplus       OS+ shift + searched scale, then observers
    os           Outlier Suppression: gamma migration, observers, token-wise clipping (coarse + LSQ+ fine);
                 loss_on='mean_pool' makes its loss the mean-pooled output (sentence embedders)
    rotate: after the transform, rotate Linear inputs online (qdrop.nlp.rotation): "mlp" every MLP's inner
                 activation, "all" every quantized Linear's input; OS+ then scores those scales in the rotated basis
    w_rounding: how weights take their codes on the observer's grid: "nearest", or "gptq" (qdrop.nlp.gptq: chosen
                 block by block against each Linear's calibration inputs, after the activation ranges are set)
    gptq_batches: the batches GPTQ gathers its input statistics H on (None: calib_batches; more tokens make H a
                 better estimate without moving the transform's scales or the ranges); gptq_damp: GPTQ's λ as a
                 fraction of H's mean diagonal (qdrop.quant.gptq.DAMP, the paper's 1 %); gptq_search: each weight
                 row's step chosen among the observer's x qdrop.quant.gptq.SEARCH_FACTORS by its GPTQ output error
    """
    if algo not in NLP_ALGOS:
        raise UsageError(f"algo must be one of {NLP_ALGOS}, got {algo!r}")
    if w_rounding not in W_ROUNDINGS:
        raise UsageError(f"w_rounding must be one of {W_ROUNDINGS}, got {w_rounding!r}")
    if gptq_search and w_rounding != "gptq":
        raise UsageError("gptq_search chooses the grid GPTQ rounds on: give it with w_rounding='gptq' (--w-rounding gptq)")
    if not gptq_damp > 0:
        raise UsageError(f"gptq_damp must be a positive fraction of H's mean diagonal (e.g. {DAMP}), got {gptq_damp!r}")
    torch.manual_seed(seed)
    qmodel = prepare_transformer(model, bits, act_granularity, quantize_attention_matmuls, w_observer, a_observer,
                                 skip=skip, inplace=inplace)
    report: dict = {}
    if algo == "smoothquant":
        report["smoothquant"] = smoothquant(qmodel, calib_batches, alpha=alpha, down_proj=down_proj)
    elif algo == "osplus":
        # with the rotation to come, OS+ scores the scales of the rotated Linears in the rotated basis
        rotation = functools.cache(lambda n: rotation_matrix(n, seed)) if rotate else None  # one R per width
        report["osplus"] = osplus(qmodel, calib_batches, down_proj=down_proj, seed=seed, rotation=rotation,
                                  rotated=rotation_targets(qmodel, rotate) if rotate else (), progress=progress)
    elif algo == "os":
        report["gamma_migration"] = gamma_migration(qmodel)
    if rotate:
        report["rotate"] = rotate_inputs(qmodel, rotate, seed=seed)
    calibrate_transformer(qmodel, calib_batches, progress)
    if w_rounding == "gptq":
        report["gptq"] = gptq_transformer(qmodel, calib_batches if gptq_batches is None else gptq_batches,
                                          damp=gptq_damp, search=SEARCH_FACTORS if gptq_search else None,
                                          progress=progress)
    if algo == "os":
        # causal LMs: the loss is taken on the decoder's last hidden state, not on 50k-wide
        # logits (memory); lm_head's input keeps its observer range
        target = qmodel.model if hasattr(qmodel, "lm_head") and hasattr(qmodel, "model") else qmodel
        report["token_wise_clipping"] = token_wise_clipping(target, calib_batches, fine_epochs=fine_epochs, lr=fine_lr,
                                                            loss_on=loss_on, patience=patience, progress=progress)
    return qmodel, report
