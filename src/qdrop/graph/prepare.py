"""qdrop.prepare: trace any model, fold BN, and insert quantizers as a backend preset says."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from ..quant.layers import QUANTIZABLE, QuantLayer
from ..quant.quantizer import Quantizer
from ..quant.scheme import QScheme, parse_bits
from ..quant.state import quant_mode, quantizers, set_quant_state  # noqa: F401 (re-exported: qdrop.graph API)
from .capture import record_values, trace
from .fold import fold_batchnorm
from ..errors import ModelError, UsageError


@dataclass(frozen=True)
class Preset:
    """Where quantizers go and what grids they use, for one target runtime."""

    weight: dict  # QScheme fields for weights (bits come from the request)
    act: dict  # QScheme fields for activations
    quantize_inputs_of: tuple = ("layer",)  # op kinds whose tensor inputs are quantized
    quantize_network_input: bool = False
    first_last_8bit: bool = False  # first layer's weights, last layer's weights and input
    int32_bias: bool = False  # the runtime adds layers' biases as int32 codes at s_x * s_w (any bit-width)
    # x86 CPUs the integer kernels must be exact on (TARGET_CPUS); the first is the default
    target_cpus: tuple = ()
    doc: str = ""


# What 8-bit weights become for each x86 target of a runtime whose integer kernels multiply
# uint8 activations by int8 weights (ONNX Runtime's MLAS). Without VNNI (AVX2, AVX-512F/BW) those
# kernels add each pair of adjacent products in int16 with saturation (vpmaddubsw): 255 * (127 + 127)
# = 64,770 > 32,767 gives silently wrong outputs. 7-bit weights (|w| <= 63: 255 * 126 = 32,130)
# cannot saturate; VNNI (vpdpbusd) and AMX accumulate in int32 and take the full int8 grid.
# avx2 is the default because the machine that exports is often not the one that deploys: it is
# exact on every x86-64 CPU with AVX2 or later, VNNI ones included.
TARGET_CPUS = {
    "avx2": dict(weight_bits=7, doc="7-bit weights: exact on every x86-64 CPU with AVX2 or later"),
    "vnni": dict(weight_bits=8, doc="full int8 weights: exact only on CPUs with AVX-512 VNNI, AVX-VNNI or AMX; "
                                    "saturates on AVX2 / AVX-512 without VNNI"),
}


PRESETS = {
    "academic": Preset(
        weight=dict(symmetric=False, ch_axis=0, observer="mse"),
        act=dict(symmetric=False, observer="mse"),
        quantize_inputs_of=("layer",),
        quantize_network_input=False,
        first_last_8bit=True,
        doc="QDrop/BRECQ papers: per-channel asymmetric weights, per-tensor asymmetric activations, "
        "first/last layer 8-bit, network input not quantized",
    ),
    "tensorrt": Preset(
        weight=dict(symmetric=True, narrow_range=True, ch_axis=0, observer="minmax"),
        act=dict(symmetric=True, signed=True, observer="mse"),
        quantize_inputs_of=("layer", "add", "pool"),
        quantize_network_input=True,
        doc="TensorRT explicit quantization: int8 symmetric per-channel weights, int8 symmetric activations "
        "(TensorRT adds the bias in float after the int32 accumulation)",
    ),
    "onnxruntime": Preset(
        weight=dict(symmetric=True, narrow_range=True, ch_axis=0, observer="minmax"),
        act=dict(symmetric=False, signed=False, observer="mse"),
        quantize_inputs_of=("layer", "add", "pool"),
        quantize_network_input=True,
        int32_bias=True,
        target_cpus=("avx2", "vnni"),
        doc="ONNX Runtime QDQ: int8 symmetric per-channel weights, uint8 asymmetric activations, int32 bias",
    ),
    "qnn": Preset(
        weight=dict(symmetric=True, narrow_range=False, ch_axis=0, observer="minmax"),
        act=dict(symmetric=False, signed=False, observer="mse"),
        quantize_inputs_of=("layer", "add", "pool"),
        quantize_network_input=True,
        int32_bias=True,
        doc="Qualcomm QNN/SNPE (AIMET encodings): int8 symmetric per-channel weights on the full "
        "[-128, 127] grid, uint8 asymmetric activations, int32 bias",
    ),
}

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_POOL_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
                   torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d}


def _is_pool(gm, n: fx.Node) -> bool:
    """Average pooling: quantizing its input lets a runtime fuse the layer before it into an
    integer kernel (a QDQ conv needs a QuantizeLinear on its output) and pool on integers."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _POOL_MODULES)
    return n.op == "call_function" and n.target in _POOL_FUNCTIONS


@dataclass
class PrepareConfig:
    backend: str = "academic"
    bits: str = "w8a8"
    leaf_modules: list = field(default_factory=list)
    w_observer: str | None = None
    a_observer: str | None = None
    int32_bias: bool | None = None  # None: the preset's choice
    target_cpu: str | None = None  # resolved: the preset's default when not asked for; None without targets
    layer_bits: dict | None = None  # mixed precision: weight bits per layer name (others follow `bits`)


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in ADD_FUNCTIONS:
        pass
    elif n.op == "call_method" and n.target in ("add", "add_"):
        pass
    else:
        return False
    return sum(isinstance(a, fx.Node) and a.meta.get("tensor", False) for a in n.args[:2]) == 2


def prepare(
    model: nn.Module,
    example_inputs,
    backend: str = "academic",
    bits: str = "w8a8",
    leaf_modules: Iterable = (),
    w_observer: str | None = None,
    a_observer: str | None = None,
    int32_bias: bool | None = None,
    target_cpu: str | None = None,
    layer_bits: dict | None = None,
) -> fx.GraphModule:
    """Return a quantization-ready copy of `model` (the original is not modified).

    Conv1d/Conv2d/Linear become QuantLayer (weight quantizer); an activation quantizer
    is inserted after every value that feeds an op kind in the preset's
    `quantize_inputs_of`. One quantizer per value: all users of the value see its
    quantized version. Quantizers start 'off': call qdrop.calibrate next.

    This is the torch.fx path; qdrop.prepare (qdrop.api) sends Hugging Face models to
    qdrop.nlp.prepare_transformer instead.

    int32_bias (default: the preset's choice - on for onnxruntime and qnn, off for academic, as
    in the papers' code, and tensorrt, which adds a float bias): layers fed directly by a per-tensor
    activation quantizer add their bias rounded to int32 codes at s_x * s_w, exactly as the integer
    kernels (and ONNX Runtime's optimiser, below 8 bits too) do. Without it ~0.6 % of CIFAR ResNet-20 predictions differ between the
    simulation and ONNX Runtime; with it ~0.2 %. This is the one place the rule is decided: each
    QuantLayer records the quantizer whose scale its int32 bias uses (QuantLayer.bias_input_quant),
    and both the simulation and the exporter read that.

    layer_bits: {layer name: weight bits} for mixed precision (qdrop.recon.mixed chooses them); the
    layers it names take these bits instead of `bits`' weight bits (the preset's 8-bit layers too).

    target_cpu (presets with x86 targets, i.e. onnxruntime): "avx2" (default) stores 8-bit weights on
    a 7-bit grid that ONNX Runtime's integer kernels compute exactly on every x86-64 CPU; "vnni" keeps
    the full int8 grid, exact only on CPUs with VNNI or AMX (see TARGET_CPUS).
    """
    if backend not in PRESETS:
        raise UsageError(f"unknown backend preset {backend!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[backend]
    target_cpu = resolve_target_cpu(backend, target_cpu)
    w_bits, a_bits = parse_bits(bits)
    unknown = set(layer_bits or {}) - {n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    if unknown:
        raise UsageError(f"layer_bits names layers that {type(model).__name__} does not have: {sorted(unknown)[:5]}")
    # bits of an "8-bit" weight on this target (7 where the kernels would saturate on full int8)
    full_w_bits = TARGET_CPUS[target_cpu]["weight_bits"] if target_cpu else 8
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    leaf_modules = list(leaf_modules)

    model = copy.deepcopy(model).eval()
    gm = trace(model, leaf_modules)
    record_values(gm, example_inputs)
    fold_batchnorm(gm)

    # weights
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QUANTIZABLE)]
    if not layer_nodes:
        raise ModelError(f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer outside leaf modules to quantize")
    seen = set()
    for i, n in enumerate(layer_nodes):
        if n.target in seen:  # a layer called twice shares one QuantLayer
            continue
        seen.add(n.target)
        edge = preset.first_last_8bit and (i == 0 or i == len(layer_nodes) - 1)
        b = (layer_bits or {}).get(n.target, 8 if edge else w_bits)
        b = full_w_bits if b == 8 else b
        w_scheme = QScheme(bits=b, **{**preset.weight, **({"observer": w_observer} if w_observer else {})})
        _set_module(gm, n.target, QuantLayer(gm.get_submodule(n.target), w_scheme))

    # activations: which values to quantize
    a_kw = {**preset.act, **({"observer": a_observer} if a_observer else {})}
    targets: dict[fx.Node, int] = {}  # value -> bits
    last_layer = layer_nodes[-1]
    for n in gm.graph.nodes:
        kinds = set()
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLayer):
            kinds.add("layer")
        if _is_add(n):
            kinds.add("add")
        if _is_pool(gm, n):
            kinds.add("pool")
        if not kinds & set(preset.quantize_inputs_of):
            continue
        for a in n.args[: (1 if "layer" in kinds else 2)]:
            if not isinstance(a, fx.Node) or not a.meta.get("tensor", False):
                continue
            if a.op == "placeholder" and not preset.quantize_network_input:
                continue
            b = 8 if preset.first_last_8bit and n is last_layer else a_bits
            targets[a] = max(b, targets.get(a, 0))

    for value, b in targets.items():
        name = f"act_quant_{value.name}"
        gm.add_submodule(name, Quantizer(QScheme(bits=b, **a_kw), role="act"))
        with gm.graph.inserting_after(value):
            q = gm.graph.call_module(name, (value,))
        q.meta = {**value.meta, "quantizer_of": value.name}
        value.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)

    gm.graph.lint()
    gm.recompile()
    if preset.int32_bias if int32_bias is None else int32_bias:
        # The int32-bias rule: a layer fed directly by one per-tensor activation quantizer, at any
        # bit-width. ONNX Runtime rounds the bias of every Conv/Gemm between a dequantized input and a
        # dequantized weight to int32 codes at s_x * s_w (its graph optimiser does it even where the
        # layer then runs in float, e.g. below 8 bits); measured: without it in the simulation, a W4A4
        # export agreed with ONNX Runtime on 90.6 % of CIFAR predictions.
        for name, q in layer_input_quantizers(gm).items():
            if q is not None and q.scheme.ch_axis is None:
                gm.get_submodule(name).set_bias_input_quant(q)
    gm.qdrop_config = PrepareConfig(backend, bits, [m for m in leaf_modules if isinstance(m, str)], w_observer,
                                    a_observer, int32_bias, target_cpu, dict(layer_bits) if layer_bits else None)
    return gm


def resolve_target_cpu(backend: str, target_cpu: str | None) -> str | None:
    """The x86 target a preset quantizes for: the asked one, else the preset's default (None for
    presets without x86 integer kernels)."""
    targets = PRESETS[backend].target_cpus
    if target_cpu is None:
        return targets[0] if targets else None
    if not targets:
        raise UsageError(f"target_cpu={target_cpu!r} applies to x86 integer kernels (backend 'onnxruntime'); "
                         f"backend {backend!r} has no CPU targets: drop --target-cpu")
    if target_cpu not in targets:
        raise UsageError(f"unknown target_cpu {target_cpu!r} for backend {backend!r}; choose from {list(targets)}")
    return target_cpu


def layer_input_quantizers(gm: fx.GraphModule) -> dict[str, Quantizer | None]:
    """QuantLayer name -> the activation quantizer that directly feeds it (None when its input is
    not quantized, or when it is called on differently quantized inputs)."""
    inputs: dict[str, set] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLayer):
            a = n.args[0] if n.args else None
            q = gm.get_submodule(a.target) if isinstance(a, fx.Node) and a.op == "call_module" else None
            inputs.setdefault(n.target, set()).add(q if isinstance(q, Quantizer) else None)
    return {name: next(iter(qs)) if len(qs) == 1 else None for name, qs in inputs.items()}


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def describe(gm: fx.GraphModule) -> dict:
    """What was quantized: layers with their weight schemes, activation quantizers with positions."""
    layers, acts = [], []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        if isinstance(m, QuantLayer):
            s = m.weight_quant.scheme
            layers.append(dict(name=n.target, type=type(m.layer).__name__, shape=list(m.layer.weight.shape),
                               bits=s.bits, symmetric=s.symmetric, grid=[s.qmin, s.qmax],
                               granularity="per-tensor" if s.ch_axis is None else f"per-channel(axis {s.ch_axis})",
                               observer=s.observer))
        elif isinstance(m, Quantizer):
            s = m.scheme
            src = n.args[0]
            acts.append(dict(name=n.target, after=_describe_node(gm, src),
                             feeds=[_describe_node(gm, u) for u in n.users],
                             bits=s.bits, symmetric=s.symmetric, grid=[s.qmin, s.qmax], observer=s.observer))
    return dict(layers=layers, activations=acts)


def _describe_node(gm, n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    if n.op == "placeholder":
        return f"input '{n.name}'"
    if n.op == "output":
        return "output"
    t = getattr(n.target, "__name__", str(n.target))
    return f"{n.name} ({t})"
