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

    @property
    def weight(self):
        return self.layer.weight

    def forward(self, x):
        w = self.weight_quant(self.layer.weight)
        if self._plain:
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, self.layer.bias)
            return self.layer._conv_forward(x, w, self.layer.bias)
        # a subclass with its own forward (e.g. 'same' padding before the conv): run that
        # forward with the quantized weight in place of the parameter
        if torch.jit.is_tracing():  # ONNX export: the stateless API refuses jit tracing
            return self._swapped_weight_forward(x, w)
        return torch.func.functional_call(self.layer, {"weight": w}, (x,))

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
