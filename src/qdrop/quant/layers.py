"""Quantized layers: the original conv/linear with a weight quantizer in front of its weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import Quantizer
from .scheme import QScheme

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
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
        # Integer runtimes add the bias as int32 codes on the grid s_x * s_w (ONNX Runtime's
        # QLinearConv/QGemm, QNN). prepare() links the activation quantizer that feeds this
        # layer (kept out of the module tree: it belongs to the graph) when the preset says so.
        self.__dict__["input_quant"] = None

    def link_input_quant(self, q: Quantizer | None) -> None:
        self.__dict__["input_quant"] = q

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the runtime adds: rounded to int32 codes at s_x * s_w when both the input and
        the weights are quantized to 8 bits (the layers the exporter gives an int32 bias), the
        float bias otherwise. Rounding is straight-through for the bias and constant for the
        scales. Not applied while tracing for export: the exporter rounds the float bias itself."""
        b, iq, wq = self.layer.bias, self.input_quant, self.weight_quant
        if (b is None or iq is None or torch.jit.is_tracing() or iq.state != "quant" or wq.state != "quant"
                or iq.bits != 8 or wq.bits != 8 or iq.scale.numel() != 1):
            return b
        s = iq.scale.detach().reshape(()) * wq.scale.detach().reshape(-1)
        return b + (torch.round(b / s) * s - b).detach()

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
