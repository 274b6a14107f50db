"""Export a quantized model to ONNX in QDQ form.

How: the model is exported with torch's TorchScript-based ONNX exporter, with every enabled
quantizer replaced by a placeholder op (`qdrop::ActQDQ` / `qdrop::WeightQDQ`) that carries
only the quantizer's name. A pass over the ONNX graph then materialises each placeholder
from the quantizer itself:

  activation  x -> [Clip] -> QuantizeLinear -> DequantizeLinear      (per-tensor scale, zero point)
  weight      integer initializer -> DequantizeLinear(axis)          (codes from Quantizer.int_repr,
                                                                      i.e. the learned AdaRound rounding)
  bias        int32 initializer -> DequantizeLinear(scale_x * scale_w) for the layers qdrop.prepare
              gave an int32 bias (QuantLayer.bias_input_quant: the rule is decided there, once);
              float otherwise (TensorRT's preset, the papers' academic preset)

Why placeholders rather than torch.fake_quantize_*: the exporter only maps the 8-bit
(0, 255) / (-128, 127) grids, rounds scales through float64 Python numbers, and gives no
stable way to find which ONNX node belongs to which quantizer; the placeholders make every
value come straight from the quantizer and give each Q/DQ node a readable name.

Bit-widths below 8: by default the 8-bit container holds the narrower grid; a Clip in
front of QuantizeLinear restricts activations to [qmin, qmax] (weights' codes already lie
there). This keeps opset 13 and lets ONNX Runtime fuse the integer kernels (it has none
for int4 convolutions). `int4=True` writes INT4/UINT4 Q/DQ (opset 21) for grids of <= 4 bits
instead: smaller weights and exact grids, but ONNX Runtime then runs those layers in float
after DequantizeLinear.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..graph.prepare import quantizers
from ..io import atomic_write
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer


DOMAIN = "qdrop"


class _ActPlaceholder(torch.autograd.Function):
    # The quantizer travels by name (the tracer accepts strings, not modules, as arguments).
    # The traced values only need the right shapes: the real numbers are filled in from the
    # quantizer when the placeholder is materialised (and a nested autograd.Function would
    # break the TorchScript tracer).
    @staticmethod
    def forward(ctx, x, name: str):
        return x.clone()

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{DOMAIN}::ActQDQ", x, name_s=name)
        out.setType(x.type())
        return out


class _WeightPlaceholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, name: str):
        return w.clone()

    @staticmethod
    def symbolic(g, w, name):
        out = g.op(f"{DOMAIN}::WeightQDQ", w, name_s=name)
        out.setType(w.type())
        return out


class _Tagged(nn.Module):
    """Stands in for a Quantizer during export: same values, plus an ONNX placeholder."""

    def __init__(self, name: str, fn):
        super().__init__()
        self.name, self.fn = name, fn

    def forward(self, x):
        return self.fn.apply(x, self.name)


@dataclass
class ExportReport:
    path: str
    opset: int
    act_quantizers: int
    weight_quantizers: int
    low_bit_container: str  # "int8" (clipped 8-bit container) or "int4"
    tensor_of: dict  # quantizer name -> name of the ONNX tensor it quantizes (its input)
    weight_tensor_of: dict  # weight quantizer name -> name of the integer weight initializer
    fp_weight_of: dict  # weight quantizer name -> name of the float weight tensor in the graph
    int32_biases: int = 0  # layers whose bias was written as int32 codes


def _check_exportable(qmodel: nn.Module) -> list[tuple[str, Quantizer]]:
    qs = quantizers(qmodel)
    if not qs:
        raise ExportError("the model has no qdrop quantizers: prepare it with qdrop.prepare first")
    if not any(q.calibrated for _, q in qs):
        raise ExportError("the model is not calibrated: run qdrop.calibrate (or qdrop quantize) before exporting")
    enabled = []
    for name, q in qs:
        if q.state == "observe":
            raise ExportError(f"quantizer {name} is still observing: finish calibration (qdrop.calibrate) before exporting")
        if q.state == "off":
            continue
        if q.role not in ("act", "weight"):
            raise ExportError(f"quantizer {name} computes its range on every call ({q.role}): ONNX QDQ needs static "
                              "ranges; prepare with act_granularity='per_tensor' to export")
        if not q.calibrated:
            raise ExportError(f"quantizer {name} has no calibrated range: run qdrop.calibrate before exporting")
        if q.alpha is not None:
            raise ExportError(f"quantizer {name} is in the middle of AdaRound (soft rounding): finish reconstruction first")
        if q.bits > 8:
            raise ExportError(f"quantizer {name} has {q.bits} bits: ONNX QDQ holds at most 8")
        zp = q.zero_point.detach()
        if not torch.equal(zp, torch.round(zp)):
            raise ExportError(f"quantizer {name} has a non-integer zero point: ONNX QDQ needs integer zero points")
        if q.role == "act" and q.scheme.ch_axis is not None:
            raise ExportError(f"activation quantizer {name} is per-channel: only per-tensor activations are exported")
        enabled.append((name, q))
    if not enabled:
        raise ExportError("every quantizer is off: nothing to export in QDQ form (export the FP model with torch.onnx)")
    return enabled


def _container(q: Quantizer, int4: bool):
    """ONNX element type and its integer range for a quantizer's grid."""
    from onnx import TensorProto

    signed = q.scheme.qmin < 0
    if int4 and q.bits <= 4:
        return (TensorProto.INT4, -8, 7, np.int8) if signed else (TensorProto.UINT4, 0, 15, np.uint8)
    return (TensorProto.INT8, -128, 127, np.int8) if signed else (TensorProto.UINT8, 0, 255, np.uint8)


@contextlib.contextmanager
def _placeholders(qmodel: nn.Module, enabled):
    """Temporarily swap the enabled quantizers for tagged stand-ins."""
    swapped = []
    by_id = {id(q): n for n, q in enabled}
    for mod_name, mod in list(qmodel.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Quantizer) and id(child) in by_id:
                fn = _WeightPlaceholder if child.role == "weight" else _ActPlaceholder
                setattr(mod, child_name, _Tagged(by_id[id(child)], fn))
                swapped.append((mod, child_name, child))
    try:
        yield
    finally:
        for mod, child_name, child in swapped:
            setattr(mod, child_name, child)


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs, *, int4: bool = False,
                opset: int | None = None, fp32: bool = False, input_names=("input",),
                output_names=("output",), dynamic_batch: bool = True, dynamic_axes: dict | None = None) -> ExportReport:
    """Write `qmodel` (prepared, calibrated, optionally reconstructed) as a QDQ ONNX model.

    fp32=True writes the same graph without Q/DQ nodes instead (for runtimes that take the
    quantization as a side file, e.g. QNN/SNPE encodings): activation tensors keep the names the
    report lists, and each weight holds its dequantized values s*(q - z), so that re-quantizing it
    with the encodings gives back exactly the integer codes (AdaRound's rounding included).
    Biases: a layer that qdrop.prepare gave an int32 bias (runtime presets onnxruntime and qnn,
    or prepare(int32_bias=True)) gets int32 codes at s_x * s_w - what the simulation adds and what
    ONNX Runtime needs to fuse QGemm; every other layer keeps its float bias, as simulated.
    The file appears only when complete (temp file + rename); onnx.checker must pass.
    """
    import onnx

    path = Path(path)
    if not path.parent.exists():
        raise ExportError(f"output directory {str(path.parent)!r} does not exist")
    enabled = _check_exportable(qmodel)
    opset = opset or (21 if int4 else 13)
    if int4 and opset < 21:
        raise ExportError(f"int4 QDQ needs opset >= 21, got {opset}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    device = next(qmodel.parameters()).device
    example_inputs = tuple(t.to(device) for t in example_inputs)

    was_training = qmodel.training
    qmodel.eval()
    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    if dynamic_axes is not None:  # e.g. batch and sequence for a transformer (qdrop.export.transformer)
        dyn = dynamic_axes
    try:
        with _placeholders(qmodel, enabled), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(qmodel, example_inputs, buf, dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dyn, do_constant_folding=True,
                              custom_opsets={DOMAIN: 1})
    except ExportError:
        raise
    except Exception as e:  # an op with no ONNX mapping, untraceable control flow, ...
        raise ExportError(f"torch.onnx could not export the model: {type(e).__name__}: {e}") from e
    finally:
        qmodel.train(was_training)

    model = onnx.load_from_string(buf.getvalue())
    report = _materialise(model, dict(enabled), qmodel, int4, fp32)
    for imp in list(model.opset_import):
        if imp.domain == DOMAIN:
            model.opset_import.remove(imp)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails onnx.checker: {e}") from e
    atomic_write(path, lambda f: f.write(model.SerializeToString()), binary=True)
    report.path, report.opset, report.low_bit_container = str(path), opset, "int4" if int4 else "int8"
    return report


def _materialise(model, enabled: dict, qmodel, int4: bool, fp32: bool = False) -> ExportReport:
    """Replace the placeholder nodes by standard QuantizeLinear/DequantizeLinear (or, with
    fp32, remove them: activations pass through, weights become their dequantized values)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def add_init(name, array, dtype=None):
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            t = helper.make_tensor(name, dtype, list(array.shape), array.flatten().tolist())
        else:
            t = numpy_helper.from_array(array, name)
        g.initializer.append(t)
        return name

    new_nodes, tensor_of, weight_tensor_of, fp_weight_of = [], {}, {}, {}
    bias_scale_of = {}  # dequantized weight tensor -> its layer's int32 bias scale s_x * s_w
    n_act = n_w = 0
    used_names = set()
    rename = {}  # fp32: placeholder output -> the tensor it stands for

    def unique(base):
        name, i = base, 1
        while name in used_names or name in inits:
            name, i = f"{base}_{i}", i + 1
        used_names.add(name)
        return name

    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        qname = next(a.s.decode() for a in node.attribute if a.name == "name")
        q = enabled[qname]
        elem, cmin, cmax, np_dtype = _container(q, int4)
        scale = q.scale.detach().cpu().float().numpy().astype(np.float32)
        zp = q.zero_point.detach().cpu().round().numpy().astype(np.int64)
        x_in, y_out = node.input[0], node.output[0]
        if node.op_type == "ActQDQ" and fp32:
            n_act += 1
            rename[y_out] = x_in
            tensor_of[qname] = x_in
        elif node.op_type == "WeightQDQ" and fp32:
            n_w += 1
            layer = _layer_of(qmodel, q)
            w = layer.layer.weight.detach()
            codes = q.int_repr(w).cpu().numpy().astype(np.float32)
            ax = q.scheme.ch_axis
            shape = [1] * codes.ndim
            if ax is not None:
                shape[ax] = -1
            deq = ((codes - zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
            w_name = add_init(unique(f"{qname}.dequantized_weight"), deq)
            rename[y_out] = w_name
            fp_weight_of[qname] = w_name
        elif node.op_type == "ActQDQ":
            n_act += 1
            s_name = add_init(unique(f"{qname}.scale"), scale.reshape(()))
            z_name = add_init(unique(f"{qname}.zero_point"), zp.reshape(()).astype(np_dtype), elem)
            src = x_in
            if (q.scheme.qmin, q.scheme.qmax) != (cmin, cmax):  # narrower grid in a wider container
                lo = np.float32((q.scheme.qmin - zp.item()) * scale.item())
                hi = np.float32((q.scheme.qmax - zp.item()) * scale.item())
                lo_n = add_init(unique(f"{qname}.clip_min"), np.array(lo, dtype=np.float32))
                hi_n = add_init(unique(f"{qname}.clip_max"), np.array(hi, dtype=np.float32))
                src = unique(f"{qname}.clipped")
                new_nodes.append(helper.make_node("Clip", [x_in, lo_n, hi_n], [src], name=f"{qname}/Clip"))
            q_out = unique(f"{qname}.quantized")
            new_nodes.append(helper.make_node("QuantizeLinear", [src, s_name, z_name], [q_out], name=f"{qname}/QuantizeLinear"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [y_out], name=f"{qname}/DequantizeLinear"))
            tensor_of[qname] = x_in
        elif node.op_type == "WeightQDQ":
            n_w += 1
            layer = _layer_of(qmodel, q)
            codes = q.int_repr(layer.layer.weight.detach()).cpu().numpy()
            w_name = add_init(unique(f"{qname}.int_weight"), codes.astype(np_dtype), elem)
            ax = q.scheme.ch_axis
            per_channel = ax is not None
            s_name = add_init(unique(f"{qname}.scale"), scale if per_channel else scale.reshape(()))
            z_arr = zp.astype(np_dtype) if per_channel else zp.reshape(()).astype(np_dtype)
            z_name = add_init(unique(f"{qname}.zero_point"), z_arr, elem)
            attrs = {"axis": ax} if per_channel else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [w_name, s_name, z_name], [y_out],
                                              name=f"{qname}/DequantizeLinear", **attrs))
            weight_tensor_of[qname] = w_name
            fp_weight_of[qname] = x_in
            s_b, b_codes = layer.bias_scale(), layer.bias_codes()
            if s_b is not None:  # the codes the simulation adds, rounded in one place (QuantLayer.bias_codes)
                bias_scale_of[y_out] = (s_b.cpu().float().numpy().astype(np.float32),
                                        b_codes.cpu().numpy().astype(np.int32))
        else:
            raise ExportError(f"unknown placeholder {node.op_type}")

    if rename:
        for node in new_nodes:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        for o in g.output:  # a graph output that was quantized: keep its name with an Identity
            if o.name in rename:
                new_nodes.append(helper.make_node("Identity", [rename[o.name]], [o.name], name=f"{o.name}/Identity"))
    del g.node[:]
    g.node.extend(new_nodes)
    n_bias = _quantize_biases(model, bias_scale_of)
    _drop_unused_initializers(model)
    return ExportReport("", 0, n_act, n_w, "", tensor_of, weight_tensor_of, fp_weight_of, n_bias)


def _layer_of(qmodel, q: Quantizer) -> QuantLayer:
    for m in qmodel.modules():
        if isinstance(m, QuantLayer) and m.weight_quant is q:
            return m
    raise ExportError("a weight quantizer is not attached to a QuantLayer")


def _quantize_biases(model, bias_scale_of: dict) -> int:
    """Conv/Gemm biases of the layers with an int32 bias -> the int32 codes QuantLayer.bias_codes()
    gives the simulation, at scale s_x * s_w (per output channel)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, n = [], 0
    for node in g.node:
        if (node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in inits
                and node.input[1] in bias_scale_of):
            bias = numpy_helper.to_array(inits[node.input[2]])
            scale, codes = bias_scale_of[node.input[1]]
            s_b = (scale * np.ones_like(bias, dtype=np.float32)).astype(np.float32)
            if bias.shape != s_b.shape or codes.shape != bias.shape:
                raise ExportError(f"{node.name}: bias of shape {list(bias.shape)} does not match its "
                                  f"{s_b.size} int32-bias scales")
            base = node.input[2]
            b_int = numpy_helper.from_array(codes, f"{base}.int32")
            b_s = numpy_helper.from_array(s_b, f"{base}.scale")
            b_z = numpy_helper.from_array(np.zeros_like(codes), f"{base}.zero_point")
            g.initializer.extend([b_int, b_s, b_z])
            out = f"{base}.dequantized"
            new_nodes.append(helper.make_node("DequantizeLinear", [b_int.name, b_s.name, b_z.name], [out],
                                              name=f"{base}/DequantizeLinear", axis=0))
            node.input[2] = out
            n += 1
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return n


def _drop_unused_initializers(model) -> None:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = [n for n in g.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del g.node[:]
    g.node.extend(nodes)
