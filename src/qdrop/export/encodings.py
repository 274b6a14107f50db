"""Side files for runtimes that take the quantization ranges next to the model.

TensorRT (explicit quantization reads the QDQ ONNX itself; the JSON is for the implicit
`ITensor.setDynamicRange` path and for checking): tensor name -> symmetric range.
QNN / SNPE: AIMET's encodings layout, keyed by the FP32 ONNX's tensor and weight names.
"""
from __future__ import annotations

from ..graph.prepare import quantizers
from .onnx_qdq import ExportError, ExportReport

AIMET_VERSION = "0.6.1"


def tensorrt_ranges(qmodel, report: ExportReport) -> dict:
    """{tensor: {"min", "max", "amax", "scale"}} for every activation quantizer.

    TensorRT derives its scale as amax / 127, so amax is written as 127 * scale: TensorRT's
    scale is then exactly the simulation's. Needs symmetric signed 8-bit activations."""
    qs = dict(quantizers(qmodel))
    ranges = {}
    for qname, tensor in report.tensor_of.items():
        q = qs[qname]
        if not (q.bits == 8 and q.scheme.symmetric and q.scheme.qmin < 0):
            raise ExportError(f"TensorRT needs symmetric signed int8 activations; {qname} is {q.bits}-bit "
                              f"{'symmetric' if q.scheme.symmetric else 'asymmetric'} [{q.scheme.qmin}, {q.scheme.qmax}] "
                              "(quantize with --backend tensorrt)")
        scale = float(q.scale)
        ranges[tensor] = dict(min=-127.0 * scale, max=127.0 * scale, amax=127.0 * scale, scale=scale, quantizer=qname)
    return dict(format="tensorrt-dynamic-range", note="amax = 127 * scale; TensorRT's scale amax/127 equals qdrop's",
                ranges=ranges)


def _aimet_entries(q) -> list[dict]:
    """AIMET encodings for one quantizer: one entry per tensor (per-tensor) or per channel.

    AIMET writes grids as unsigned integers: x ~ scale * (code + offset), code in [0, 2^b - 1],
    so offset = -(zero point on the unsigned grid). Signed grids are shifted by 2^(b-1)."""
    b = q.bits
    shift = 2 ** (b - 1) if q.scheme.qmin < 0 else 0
    scales = q.scale.detach().cpu().double().reshape(-1).tolist()
    zps = q.zero_point.detach().cpu().double().reshape(-1).tolist()
    out = []
    for s, z in zip(scales, zps):
        out.append(dict(bitwidth=b, dtype="int", is_symmetric=str(bool(q.scheme.symmetric)),
                        min=(q.scheme.qmin - z) * s, max=(q.scheme.qmax - z) * s,
                        offset=int(-(z + shift)), scale=s))
    return out


def aimet_encodings(qmodel, report: ExportReport) -> dict:
    """AIMET's encodings file (activation_encodings / param_encodings), for the FP32 ONNX that
    export_onnx(fp32=True) wrote: activation keys are its tensor names, param keys its weight
    initializer names."""
    qs = dict(quantizers(qmodel))
    acts = {tensor: _aimet_entries(qs[qname]) for qname, tensor in report.tensor_of.items()}
    params = {tensor: _aimet_entries(qs[qname]) for qname, tensor in report.fp_weight_of.items()}
    return dict(version=AIMET_VERSION, activation_encodings=acts, param_encodings=params,
                excluded_layers=[], quantizer_args=dict(per_channel_quantization=True, quant_scheme="post_training_tf",
                                                        dtype="int"))
