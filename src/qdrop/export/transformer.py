"""ONNX export of a transformer quantized by module swap (qdrop.nlp), and ONNX Runtime as a model.

The QDQ pass is the one of onnx_qdq.export_onnx: every QuantLinear's weight and input quantizer
becomes a placeholder while torch's TorchScript exporter traces the model, then standard
QuantizeLinear/DequantizeLinear. What differs for a Hugging Face model:
  inputs    named tensors (input_ids, attention_mask, ...) in the order of the example dict;
            batch and sequence axes dynamic
  output    one tensor, "output": the first field of the model's output (encoders: the last
            hidden state; causal LMs: the logits; no KV cache)
  opset     17: the attention (scaled_dot_product_attention) needs >= 14
Per-token dynamic activations have no static QDQ form and are refused (onnx_qdq._check_exportable).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .onnx_qdq import ExportError, ExportReport, export_onnx

OPSET = 17


class _NamedInputs(nn.Module):
    """The model called with keyword tensors, returning its main output (what torch.onnx traces)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], causal_lm: bool):
        super().__init__()
        self.model, self.names, self.causal_lm = model, names, causal_lm

    def forward(self, *tensors):
        kw = dict(zip(self.names, tensors))
        if self.causal_lm:
            kw["use_cache"] = False
        return self.model(**kw, return_dict=False)[0]


def _is_causal_lm(model: nn.Module) -> bool:
    return any(c.__name__.endswith("ForCausalLM") for c in type(model).__mro__)


def export_transformer_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Mapping, *,
                            opset: int = OPSET, **options) -> ExportReport:
    """Write a quantized Hugging Face model (qdrop.prepare + calibrate [+ reconstruct]) as QDQ ONNX.
    example_inputs: a tokenizer's output (a mapping of name -> [batch, seq] tensor); its names become
    the graph's inputs. options: those of onnx_qdq.export_onnx (int4, fp32)."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ExportError("a transformer is exported from named example inputs: pass the tokenizer's output, "
                          "e.g. tokenizer(['a sentence'], return_tensors='pt')")
    names = tuple(example_inputs)
    tensors = tuple(example_inputs[n] for n in names)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in tensors):
        raise ExportError(f"example inputs {list(names)} must all be [batch, seq] tensors (return_tensors='pt')")
    axes = {0: "batch", 1: "sequence"}
    dyn = {n: axes for n in (*names, "output")}
    # the wrapper carries the model's mode: export_onnx restores the mode it finds (a new Module is in training
    # mode, which would leave the model with dropout on after the export)
    wrapped = _NamedInputs(qmodel, names, _is_causal_lm(qmodel)).train(qmodel.training)
    return export_onnx(wrapped, path, tensors, opset=opset, input_names=names, output_names=("output",),
                       dynamic_axes=dyn, **options)


class OrtTransformer:
    """An exported transformer in ONNX Runtime, called like the Hugging Face model it came from
    (keyword tensors in, the main output as a torch tensor out), so that the evaluation code
    (qdrop.eval.nlp_metrics) scores what the runtime computes."""

    def __init__(self, path, threads: int | None = None, level: str = "all"):
        from .check import ort_session

        self.session = ort_session(path, threads=threads, level=level)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def eval(self):
        return self

    def __call__(self, **batch):
        """batch: the tokenizer's tensors; other keywords of the HF call (use_cache=False) do not apply."""
        missing = [n for n in self.inputs if n not in batch]
        if missing:
            raise ExportError(f"the ONNX model needs inputs {missing}: tokenize as for the export")
        feed = {n: np.ascontiguousarray(batch[n].cpu().numpy().astype(np.int64)) for n in self.inputs}
        return torch.from_numpy(self.session.run(["output"], feed)[0])
