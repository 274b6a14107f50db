"""The public entry points, and the one place that chooses between qdrop's two paths.

  fx path           any module torch.fx can trace: graph capture, BN folding, quantizers placed
                    by a backend preset, units cut from the graph (qdrop.graph)
  transformer path  Hugging Face transformers: every nn.Linear swapped for a QuantLinear, units
                    by module scope (qdrop.nlp)

Both end in the same calibration observers, the same reconstruction engine (qdrop.recon) and the
same algorithms. Nothing else in qdrop decides which path a model takes.

    qmodel = qdrop.prepare(model, example_inputs, bits="w4a4")     # or prepare(hf_model, bits="w4a8")
    qdrop.calibrate(qmodel, batches)                               # tensors, or tokenized dicts
    qdrop.reconstruct(qmodel, None, calib, algo="qdrop", iters=2000)
    qdrop.export_onnx(qmodel, "model.onnx", example_inputs)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .errors import UsageError


def is_transformer(model: nn.Module) -> bool:
    """A Hugging Face transformers model (told by its classes, without importing transformers),
    or a model qdrop prepared on the transformer path."""
    if getattr(model, "qdrop_nlp", None) is not None:
        return True
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def is_transformer_spec(spec: str) -> bool:
    """A model named on the command line or in a sweep: 'hf:PATH_OR_NAME' takes the transformer path."""
    return str(spec or "").startswith("hf:")


def prepare(
    model: nn.Module,
    example_inputs=None,
    backend: str = "academic",
    bits: str = "w8a8",
    leaf_modules: Iterable = (),
    w_observer: str | None = None,
    a_observer: str | None = None,
    int32_bias: bool | None = None,
    target_cpu: str | None = None,
    layer_bits: dict | None = None,
    **transformer_options,
) -> nn.Module:
    """A quantization-ready copy of `model`, quantizers off (calibrate next).

    Traceable modules: see qdrop.graph.prepare (example_inputs needed). Hugging Face models: every
    nn.Linear becomes a QuantLinear (per-channel weights, per-tensor static inputs); leaf_modules
    are Linear-name patterns kept in FP; transformer_options go to qdrop.nlp.prepare_transformer
    (act_granularity, quantize_attention_matmuls, ...). Options of one path given to the other are
    refused, not ignored.
    """
    if is_transformer(model):
        from .nlp.prepare import prepare_transformer

        if backend != "academic":
            raise UsageError(f"backend {backend!r} places quantizers in an fx graph; Hugging Face models are prepared by "
                             "module swap with the academic scheme (per-channel weights, per-tensor activations)")
        for name, value in (("int32_bias", int32_bias), ("target_cpu", target_cpu), ("layer_bits", layer_bits)):
            if value:
                raise UsageError(f"{name} applies to the fx path (traceable vision models), not to Hugging Face models")
        return prepare_transformer(model, bits=bits, w_observer=w_observer or "mse", a_observer=a_observer or "minmax",
                                   skip=tuple(m for m in leaf_modules if isinstance(m, str)), **transformer_options)
    from .graph.prepare import prepare as prepare_graph

    if transformer_options:
        raise UsageError(f"{sorted(transformer_options)} apply to Hugging Face models, not to fx-traced ones")
    if example_inputs is None:
        raise UsageError("example_inputs is needed to trace the model: a tensor (or tuple) shaped like one input batch")
    return prepare_graph(model, example_inputs, backend=backend, bits=bits, leaf_modules=leaf_modules,
                         w_observer=w_observer, a_observer=a_observer, int32_bias=int32_bias, target_cpu=target_cpu,
                         layer_bits=layer_bits)


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable, device: str | torch.device | None = None) -> nn.Module:
    """Observe activations on `batches` and freeze every quantizer's range (naive PTQ).
    fx path: tensors or tuples of model inputs. Transformers: dicts of model inputs with
    attention_mask (padding never enters a range)."""
    if is_transformer(qmodel):
        from .nlp.prepare import calibrate_transformer

        batches = list(batches)
        if device is not None:
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        return calibrate_transformer(qmodel, batches)
    from .quant.calibration import calibrate_observers

    return calibrate_observers(qmodel, batches, device)


def reconstruct(qmodel: nn.Module, fp_model: nn.Module | None, calib_data, algo="qdrop", units: str | None = None,
                split_blocks: bool | None = False, **options) -> dict:
    """Reconstruct a calibrated model in place with adaround / brecq / qdrop (or an Algorithm).

    fx path: calib_data is a tensor of calibration inputs [N, ...]; units come from the graph.
    Transformers: calib_data is a list of tokenized batches (dicts with input_ids and
    attention_mask); one unit per repeated block, found structurally or named by `units`
    ("model.layers"), or with split_blocks=True one unit per part of a block (its attention, its
    MLP; qdrop.nlp.units). options: those of qdrop.recon.reconstruct (iters, batch_size, seed, ...).
    """
    from .recon.engine import reconstruct as run

    if is_transformer(qmodel):
        from .nlp.units import ScopePartition

        if fp_model is not None:
            raise UsageError("fp_model is not used for transformers: the FP reference is the prepared model with "
                             "quantizers off; pass None")
        return run(qmodel, None, calib_data, algo, partition=ScopePartition(qmodel, units, split=bool(split_blocks)), **options)
    if units is not None or split_blocks:
        raise UsageError("units= and split_blocks= set a transformer's units; fx-traced models are partitioned from "
                         "their graph")
    return run(qmodel, fp_model, calib_data, algo, **options)


def export_onnx(qmodel: nn.Module, path, example_inputs, **options):
    """Write a QDQ ONNX model. Traceable models: example_inputs is one input batch (see
    qdrop.export.export_onnx). Hugging Face models: the tokenizer's output (named [batch, seq]
    tensors; see qdrop.export.transformer)."""
    if is_transformer(qmodel):
        from .export.transformer import export_transformer_onnx

        return export_transformer_onnx(qmodel, path, example_inputs, **options)
    from .export.onnx_qdq import export_onnx as export

    return export(qmodel, path, example_inputs, **options)
