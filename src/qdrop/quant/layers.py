"""Quantized layers: the original conv/linear with a weight quantizer in front of its weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import Quantizer
from .scheme import QScheme

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
# The int32 bias codes' range, as float32 can hold it: 2**31 - 1 rounds up to 2**31 in float32, whose cast to
# int32 overflows (to -2**31 on x86), so the largest code is the float32 just below, 2**31 - 128. A channel
# whose weights are ~0 (a dead channel after BN folding; EfficientNet-Lite0 has dozens, weight scale at its
# 1e-8 floor) needs |b| / (s_x * s_w) > 2**31: the exported codes must be clamped, so the simulation clamps alike.
INT32_BIAS_MIN, INT32_BIAS_MAX = -(2.0**31), 2.0**31 - 128
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}


class QuantLayer(nn.Module):
    """Wraps a Conv1d/Conv2d (grouped, depthwise) or Linear. Its parameters stay in
    `self.layer` so that state dicts and names remain recognisable."""

    def __init__(self, layer: nn.Module, w_scheme: QScheme):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        self.layer = layer
        self.weight_quant = Quantizer(w_scheme, layer.weight.shape[0], role="weight")
        # The int32-bias rule's result for this layer, decided once by qdrop.prepare from the preset:
        # None = the bias is added in float; a Quantizer = integer runtimes add the bias as int32 codes
        # on the grid s_x * s_w, s_x being that quantizer's scale (ONNX Runtime's QLinearConv/QGemm,
        # QNN). The simulation (effective_bias) and the exporter both read it. Stored outside the
        # module tree: the quantizer belongs to the graph, and registering it here too would put it
        # in the state dict twice.
        self.__dict__["bias_input_quant"] = None

    def set_bias_input_quant(self, q: Quantizer | None) -> None:
        self.__dict__["bias_input_quant"] = q

    def bias_scale(self) -> torch.Tensor | None:
        """Per-output-channel scale of the int32 bias codes, s_x * s_w, while the layer runs as an
        integer kernel (its input and weight quantizers both on); None: the bias is added in float.
        The one predicate both the simulation (effective_bias) and the exporter read."""
        iq = self.bias_input_quant
        if iq is None or self.layer.bias is None or iq.state != "quant" or self.weight_quant.state != "quant":
            return None
        return iq.scale.detach().reshape(()) * self.weight_quant.scale.detach().reshape(-1)

    def bias_codes(self) -> torch.Tensor | None:
        """The int32 bias codes round(b / (s_x * s_w)), clamped to what float32 and int32 both hold (as
        float values, detached); None while the bias is added in float (bias_scale() is None)."""
        s = self.bias_scale()
        if s is None:
            return None
        return torch.round(self.layer.bias.detach() / s).clamp(INT32_BIAS_MIN, INT32_BIAS_MAX)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the runtime adds: rounded to int32 codes at s_x * s_w for layers prepare gave an
        int32 bias (while both quantizers are on), the float bias otherwise. Rounding is
        straight-through for the bias and constant for the scales. Not applied while tracing for
        export: the exporter writes the codes from bias_scale() itself."""
        b = self.layer.bias
        if torch.jit.is_tracing():  # exporting: the quantizers are placeholders, the exporter writes the codes
            return b
        codes = self.bias_codes()
        if codes is None:
            return b
        # the value is exactly codes * s (b + (v - b) is not, once the clamp moves v far from b);
        # the gradient reaches b straight through
        return codes * self.bias_scale() + (b - b.detach())

    @property
    def weight(self):
        return self.layer.weight

    def forward(self, x):
        w = self.weight_quant(self.layer.weight)
        b = self.effective_bias()
        if self._plain:
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, b)
            return self.layer._conv_forward(x, w, b)
        # a subclass with its own forward (e.g. 'same' padding before the conv): run that
        # forward with the quantized weight in place of the parameter
        if torch.jit.is_tracing():  # ONNX export: the stateless API refuses jit tracing
            return self._swapped_weight_forward(x, w)
        params = {"weight": w} if b is None or b is self.layer.bias else {"weight": w, "bias": b}
        return torch.func.functional_call(self.layer, params, (x,))

    def _swapped_weight_forward(self, x, w):
        params = self.layer._parameters
        saved = dict(params)
        del params["weight"]
        try:
            self.layer.weight = w
            return self.layer(x)
        finally:
            del self.layer.weight
            # same order as before: the ONNX exporter pairs parameter names and values by it
            params.clear()
            params.update(saved)

    @property
    def _plain(self) -> bool:
        return type(self.layer).forward in _PLAIN_FORWARDS

    def extra_repr(self) -> str:
        return type(self.layer).__name__
