"""prepare_transformer: quantizers into a Hugging Face model by module swap.

torch.fx traces HF models poorly (data-dependent control flow, caches, kwargs), so
instead every nn.Linear is replaced in place by a QuantLinear (weight + input
quantizer). Norms, softmax, embeddings and the residual adds stay in floating point.
"""
from __future__ import annotations

import copy
import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.calibration import calibrate_observers
from ..quant.state import quantizers, set_quant_state
from ..quant.scheme import QScheme, parse_bits
from .errors import UnsupportedModelError
from .layers import DYNAMIC, AttnMatmulQuant, QuantLinear
from .mask import current_mask, pop_mask, push_mask
from ..errors import UsageError

GRANULARITIES = ("per_tensor", "per_token")
ATTN_IMPL = "qdrop_eager"


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _push_mask(module, args, kwargs):
    # The model's own attention_mask says which tokens are padding; nested calls without
    # one keep the mask of the enclosing block.
    mask = kwargs.get("attention_mask")
    push_mask(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else current_mask())


def _pop_mask(module, args, kwargs, output):
    pop_mask()


def skip_patterns(skip) -> tuple:
    """skip / keep_fp as a tuple of fnmatch patterns: one bare string (a sweep's yaml value, an API call) is one
    pattern, not one per character."""
    return (skip,) if isinstance(skip, str) else tuple(skip or ())


def prepare_transformer(
    model: nn.Module,
    bits: str = "w8a8",
    act_granularity: str = "per_tensor",
    quantize_attention_matmuls: bool = False,
    w_observer: str = "mse",
    a_observer: str = "minmax",
    a_symmetric: bool = False,
    skip: tuple = (),
    inplace: bool = False,
) -> nn.Module:
    """Return a copy of `model` (the model itself with inplace=True) whose nn.Linear layers
    are QuantLinear: per-channel asymmetric weights and an input quantizer, per-tensor
    static (calibrated, the default) or per-token dynamic. All quantizers start 'off', so
    the prepared model computes the original function until calibrate_transformer().

    skip: fnmatch patterns of Linear names to keep in floating point (e.g. "lm_head").
    quantize_attention_matmuls: also quantize query, key, value and the softmax output
    (switches the model to an eager attention implementation that calls the quantizers).
    """
    if act_granularity not in GRANULARITIES:
        raise UsageError(f"act_granularity must be one of {GRANULARITIES}, got {act_granularity!r}")
    w_bits, a_bits = parse_bits(bits)
    skip = skip_patterns(skip)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(fnmatch.fnmatch(n, p) for p in skip)]
    if not targets:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.Linear layers that qdrop.nlp can quantize "
            f"(module types found: {', '.join(kinds)}{', skip=' + repr(skip) if skip else ''})")
    if not inplace:
        model = copy.deepcopy(model)
    w_scheme = QScheme(bits=w_bits, ch_axis=0, observer=w_observer)
    a_scheme = QScheme(bits=a_bits, symmetric=a_symmetric, observer=a_observer)
    per_token = act_granularity == "per_token"
    for name in targets:
        _set_child(model, name, QuantLinear(model.get_submodule(name), w_scheme, a_scheme, per_token))
    if quantize_attention_matmuls:
        _quantize_attention(model, a_scheme)
    # always_call: an exception inside forward must not leave a stale mask behind
    model.register_forward_pre_hook(_push_mask, with_kwargs=True)
    model.register_forward_hook(_pop_mask, with_kwargs=True, always_call=True)
    set_quant_state(model, "off")
    model.qdrop_nlp = dict(bits=bits, act_granularity=act_granularity, quantize_attention_matmuls=quantize_attention_matmuls,
                           w_observer=w_observer, a_observer=a_observer, a_symmetric=a_symmetric, skip=list(skip),
                           transforms=[])
    return model


@torch.no_grad()
def calibrate_transformer(qmodel: nn.Module, batches, progress: bool = False) -> nn.Module:
    """Calibrate weights (on the current, possibly transformed, weights; each observed whole, so an
    MSE search sees every value of every row, lm_head's 49,152 rows included) and the static
    activation quantizers on `batches` (dicts of model inputs with attention_mask), then
    switch every quantizer on. Padding tokens are excluded by the mask hooks."""
    calibrate_observers(qmodel, batches, progress=progress)
    for _, q in quantizers(qmodel):
        if q.role == DYNAMIC:
            q.set_state("quant")
    return qmodel


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


# ---- attention matmuls -----------------------------------------------------------------
def _attention_modules(model: nn.Module):
    # HF attention modules are the ones that call the attention interface: they carry
    # the config and are named *Attention (BertSelfAttention, LlamaAttention, ...).
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def qdrop_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with quantizers in front of both matmuls (those of `module.qdrop_attn`)."""
    aq = getattr(module, "qdrop_attn", None)
    if aq is not None:
        query, key, value = aq.query(query), aq.key(key), aq.value(value)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if aq is not None:
        probs = aq.probs(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, qdrop_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _quantize_attention(model: nn.Module, a_scheme: QScheme) -> None:
    mods = _attention_modules(model)
    if not mods or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__}: no Hugging Face attention modules found; "
                                    "quantize_attention_matmuls needs a transformers model")
    _register_attention()
    for m in mods:
        m.qdrop_attn = AttnMatmulQuant(a_scheme)
    model.set_attn_implementation(ATTN_IMPL)
