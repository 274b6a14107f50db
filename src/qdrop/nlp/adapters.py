"""Where the norms are and what reads their output, per architecture family.

Equivalent transforms (gamma migration, SmoothQuant, OS+) rescale/shift a norm's output
channels and compensate in every consumer of that output. Without a traced graph the
consumers must be known per architecture:

  BERT family (post-LN: h = LN(x + sublayer(x))). A norm's output x feeds the next
  sublayer's Linears *and* that sublayer's residual shortcut:
    embeddings.LayerNorm        -> layer 0 query/key/value,   shortcut of layer 0 attention.output
    layer i attention.output.LN -> layer i intermediate.dense, shortcut of layer i output
    layer i output.LN           -> layer i+1 query/key/value,  shortcut of layer i+1 attention.output
  The last layer's output.LN is the model output: left alone.

  Llama family (pre-norm: the residual carries the norm's *input*, so no shortcut):
    input_layernorm -> q/k/v_proj,   post_attention_layernorm -> gate/up_proj,
    and (scaling only) up_proj -> down_proj, since down_proj reads act(gate) * up.
  The final norm feeds lm_head (when the model has one): a group too. lm_head's weight is usually
  tied to the embedding; the transforms give lm_head its own copy before rescaling its columns
  (a quantized lm_head is stored apart from the embedding anyway). Measured on SmolLM2-135M W8A8
  with OS+: lm_head's input quantizer alone cost 0.3 perplexity before this group existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import UnsupportedModelError


@dataclass
class NormGroup:
    norm: str  # module name of the LayerNorm / RMSNorm
    linears: list[str]  # the Linears reading the norm's output
    shortcut: str | None = None  # post-LN: module whose 2nd argument (the residual) is the norm's output


@dataclass
class LinearPair:
    prev: str  # output channel j of prev ...
    next: str  # ... is (up to an elementwise factor) input channel j of next


@dataclass
class Adapter:
    family: str
    groups: list[NormGroup] = field(default_factory=list)
    pairs: list[LinearPair] = field(default_factory=list)
    mlp_outputs: list[str] = field(default_factory=list)  # each MLP's second Linear (reads the inner activation)


def _has(m: nn.Module, *paths: str) -> bool:
    for p in paths:
        try:
            m.get_submodule(p)
        except AttributeError:
            return False
    return True


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_adapter(model: nn.Module) -> Adapter:
    bert = [(n, m) for n, m in model.named_modules()
            if _has(m, "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.LayerNorm",
                    "intermediate.dense", "output.dense", "output.LayerNorm")]
    if bert:
        emb = [n for n, m in model.named_modules() if _has(m, "word_embeddings", "LayerNorm")]
        ad = Adapter("bert")
        prev_norm = _join(emb[0], "LayerNorm") if emb else None
        for n, _ in bert:
            qkv = [_join(n, f"attention.self.{k}") for k in ("query", "key", "value")]
            if prev_norm is not None:
                ad.groups.append(NormGroup(prev_norm, qkv, _join(n, "attention.output")))
            ad.groups.append(NormGroup(_join(n, "attention.output.LayerNorm"), [_join(n, "intermediate.dense")], _join(n, "output")))
            ad.mlp_outputs.append(_join(n, "output.dense"))
            prev_norm = _join(n, "output.LayerNorm")
        return ad
    llama = [(n, m) for n, m in model.named_modules()
             if _has(m, "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if llama:
        ad = Adapter("llama")
        for n, _ in llama:
            ad.groups.append(NormGroup(_join(n, "input_layernorm"), [_join(n, f"self_attn.{k}_proj") for k in "qkv"]))
            ad.groups.append(NormGroup(_join(n, "post_attention_layernorm"), [_join(n, "mlp.gate_proj"), _join(n, "mlp.up_proj")]))
            ad.pairs.append(LinearPair(_join(n, "mlp.up_proj"), _join(n, "mlp.down_proj")))
            ad.mlp_outputs.append(_join(n, "mlp.down_proj"))
        stack = llama[-1][0].rpartition(".")[0]  # "model.layers"
        final_norm = _join(stack.rpartition(".")[0], "norm")  # "model.norm"
        # an lm_head kept in floating point (prepare's skip=) has no quantized input to smooth
        if _has(model, final_norm, "lm_head") and hasattr(model.get_submodule("lm_head"), "input_quant"):
            ad.groups.append(NormGroup(final_norm, ["lm_head"]))
        return ad
    raise UnsupportedModelError(
        f"{type(model).__name__}: no BERT-style (attention.self.query ... output.LayerNorm) or Llama-style "
        "(input_layernorm, self_attn.q_proj ... mlp.down_proj) layers found; the equivalent transforms "
        "(gamma migration, SmoothQuant, OS+) only know these two families")
