"""Quantized building blocks for transformers (eager module swap, no fx).

QuantLinear is qdrop's QuantLayer (per-channel weight quantizer) plus a quantizer on its
input. Static per-tensor inputs use the ordinary Quantizer (observe -> freeze -> quant);
per-token dynamic inputs compute one range per token at run time from the same scheme,
so they need no calibration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer
from ..quant.scheme import QScheme, qparams_from_range
from .mask import real_tokens

DYNAMIC = "act_dynamic"  # role of per-token quantizers: qdrop.calibrate leaves them alone


def per_token_fake_quant(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Fake-quantize each token (last dimension = features) with its own min/max range.
    The range is data, not a parameter: gradients pass straight through to x."""
    rows = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        scale, zp = qparams_from_range(rows.amin(1).float(), rows.amax(1).float(), scheme)
    out = torch.fake_quantize_per_channel_affine(rows, scale, zp.to(torch.int32), 0, scheme.qmin, scheme.qmax)
    return out.reshape(x.shape)


class QuantLinear(QuantLayer):
    """nn.Linear with a per-channel weight quantizer and an input quantizer."""

    def __init__(self, layer: nn.Linear, w_scheme: QScheme, a_scheme: QScheme, per_token: bool = False):
        super().__init__(layer, w_scheme)
        self.per_token = per_token
        self.input_quant = Quantizer(a_scheme, role=DYNAMIC if per_token else "act")
        if per_token:
            self.input_quant.mark_dynamic()  # nothing to calibrate: ranges are computed per call
        # an orthogonal R set by qdrop.nlp.rotation: the layer reads x @ R and its weight is W @ R
        # (exact: x Wᵀ = (x R)(W R)ᵀ); the product is computed online, in floating point, also in ONNX
        self.register_buffer("input_rotation", None)

    def forward(self, x):
        return F.linear(self.weight_input(x), self._weight(), self.layer.bias)

    def weight_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight multiplies: x rotated (when set) and quantized (as the input quantizer's state says)."""
        if self.input_rotation is not None:
            x = x @ self.input_rotation
        q = self.input_quant
        if not isinstance(q, Quantizer):  # ONNX export's stand-in (qdrop.export.onnx_qdq): QDQ in the graph
            return q(x)
        if q.state == "observe":
            if not self.per_token:
                q.observer.update(real_tokens(x))  # padding never enters the range
        elif q.state == "quant":
            x = per_token_fake_quant(x, q.scheme) if self.per_token else q(x)
        return x

    def _weight(self) -> torch.Tensor:
        """The (fake-)quantized weight. Evaluation re-quantized every weight on every call
        (a quarter of the CPU time of a MiniLM forward), so the result is cached while
        nothing it depends on can change: no gradient wanted, same tensors, same versions
        (in-place edits such as the equivalent transforms or freeze() bump a version)."""
        wq, w = self.weight_quant, self.layer.weight
        if not isinstance(wq, Quantizer):  # ONNX export's stand-in
            return wq(w)
        if wq.state != "quant" or wq.alpha is not None or wq.log_step is not None or (wq.prob < 1 and self.training):
            self._cache = None
            return wq(w)
        if torch.is_grad_enabled() and (w.requires_grad or wq.scale.requires_grad or wq.zero_point.requires_grad):
            return wq(w)
        r = wq.round_up  # fixed codes: a new tensor (other dtype) or the same one edited in place (a new version)
        key = (w.data_ptr(), w._version, wq.scale._version, wq.zero_point._version,
               None if r is None else (r.dtype, r.data_ptr(), r._version))
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, wq(w))
            self._cache = cache
        return cache[1]

    def extra_repr(self) -> str:
        return f"{self.layer.in_features}->{self.layer.out_features}, input={'per-token dynamic' if self.per_token else 'per-tensor static'}"


class MaskedActQuant(nn.Module):
    """A static activation quantizer for a tensor whose token axis is `token_dim`
    (attention q/k/v are [batch, heads, seq, head_dim]: token_dim=2)."""

    def __init__(self, scheme: QScheme, token_dim: int):
        super().__init__()
        self.quant = Quantizer(scheme, role="act")
        self.token_dim = token_dim

    def forward(self, x):
        q = self.quant
        if isinstance(q, Quantizer) and q.state == "observe":
            q.observer.update(real_tokens(x, self.token_dim))
            return x
        return q(x)


class AttnMatmulQuant(nn.Module):
    """Quantizers for the two attention matmuls: Q·Kᵀ (query, key after RoPE) and P·V
    (softmax probabilities, value). Probabilities are in [0, 1]: an unsigned grid."""

    def __init__(self, a_scheme: QScheme):
        super().__init__()
        self.query = MaskedActQuant(a_scheme, 2)
        self.key = MaskedActQuant(a_scheme, 2)
        self.value = MaskedActQuant(a_scheme, 2)
        self.probs = MaskedActQuant(a_scheme.with_(symmetric=False, signed=False), 2)
