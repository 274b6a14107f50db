"""ONNX Runtime's integer arithmetic, op for op, in PyTorch: what the deployed model computes.

Why: fake quantization (the simulation reconstruction trains) computes each layer in float on
dequantized values and rounds x * (1/s). ONNX Runtime's integer graph instead accumulates exact
int32 sums and requantizes them with float32 arithmetic of its own (MLAS). Near a rounding tie the
two choose different codes, and a deep network amplifies those last-bit differences: EfficientNet-
Lite0 W8A8 changed 6 of 500 top-1 predictions on an AMD EPYC. This module replays the integer
graph's arithmetic instead, so that a user can score in PyTorch what the runtime will deliver.

The formulas (MLAS on x86; z = zero point, sat = clamp to the uint8 container, rne = round half to even):
  QuantizeLinear            q = sat(rne(float32(x / s)) + z)
  QLinearConv / QGemm       acc = sum (x_q - z_x) * w_q + b_q            exact int32
                            q = sat(rne(float32(acc) * m) + z_y),   m = float32(float32(s_x * s_w) / s_y)
  QGemm, float output       float32(float32(acc) * float32(s_x * s_w))   (a Linear without output quantizer: the logits)
  QLinearAdd (AVX2 kernel)  r_a = float32(s_a / s_c), r_b = float32(s_b / s_c)
                            k = float32(z_c - fma(r_a, z_a, float32(r_b * z_b)))   (the compiler's contraction)
                            q = sat(rne(fma(a, r_a, fma(b, r_b, k))))
  QLinearGlobalAveragePool  q = sat(rne(float32(sum - z_x * N) * float32(s_x / float32(s_y * N))) + z_y)
  MaxPool                   on the codes (ONNX Runtime moves the QuantizeLinear above it; max commutes with
                            the monotone requantisation)
A ReLU / ReLU6 between an op and its output quantizer folds into the kernel's saturation when the
quantizer's range lies inside the clip range (ONNX Runtime's Relu/Clip-QuantizeLinear fusion); otherwise
ONNX Runtime keeps it, and with it the op before, in float. Ops in float (no integer kernel, not fused,
or a conv without output quantizer) run as the simulation runs them, on dequantized values: equal to
ONNX Runtime's float kernels up to float32 summation order, not bit for bit.

Scope, stated where it is used: 8-bit activation grids, per-tensor activation quantizers, and kernels
that do not saturate (qdrop's avx2 target on any x86 CPU; the vnni target only on VNNI/AMX CPUs,
qdrop.export.x86). Sums are computed in float32 where every partial sum provably stays below 2**24,
else in float64, and rounded back to integers: exact either way.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph.prepare import ADD_FUNCTIONS
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer

_F32 = torch.float32
_EXACT_F32 = 2.0 ** 24  # integers below this are exact in float32, and so are sums that stay below it
_FLT_EPSILON = 1.1920929e-07  # ONNX Runtime's tolerance when it decides whether a Clip folds into a QuantizeLinear
_NO_CLAMP = (float("-inf"), float("inf"))

# the integer kernels this module emulates (ONNX Runtime op types)
KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool"})


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(_F32)


def _rne(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even, as cvtps2dq does


@dataclass
class Codes:
    """A quantized tensor: real value (q - zp) * scale; q holds integers (float32, exact)."""
    q: torch.Tensor
    scale: torch.Tensor  # 0-d float32
    zp: int
    qmin: int
    qmax: int

    def real(self) -> torch.Tensor:  # DequantizeLinear: float32((q - z) * s), one rounding
        return (self.q - self.zp) * self.scale

    def like(self, q: torch.Tensor) -> "Codes":
        return replace(self, q=q)


@dataclass
class _Acc:
    """A conv/linear's exact int32 accumulator (bias included), waiting for its output quantizer."""
    acc: torch.Tensor  # float64 holding integers
    s_xw: torch.Tensor  # float32(s_x * s_w) per output channel
    ch_axis: int
    kernel: str  # "QLinearConv" or "QGemm"
    in_float: Callable[[], torch.Tensor]  # the same layer on dequantized values (ONNX Runtime's float path)
    lo: float = _NO_CLAMP[0]
    hi: float = _NO_CLAMP[1]
    as_float: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # replace() drops it


@dataclass
class _Add:
    a: Codes
    b: Codes
    kernel: str = "QLinearAdd"
    lo: float = _NO_CLAMP[0]
    hi: float = _NO_CLAMP[1]
    as_float: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # replace() drops it


@dataclass
class _Pool:
    total: torch.Tensor  # float64 sum of the codes over the spatial dims
    n: int
    src: Codes
    direct: bool  # no op between the pool and its quantizer that ONNX Runtime does not move the quantizer across
    kernel: str = "QLinearGlobalAveragePool"
    lo: float = _NO_CLAMP[0]
    hi: float = _NO_CLAMP[1]
    as_float: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # replace() drops it


_Pending = (_Acc, _Add, _Pool)  # values an integer kernel computes if its output quantizer lets it fuse

_RELU_FUNCTIONS = {F.relu, torch.relu}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    operator.getitem}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "squeeze", "unsqueeze", "transpose"}
# Shape ops ONNX Runtime's QDQ propagation moves a QuantizeLinear across (Reshape, Transpose, (Un)Squeeze), so
# that a pool before them still meets its QuantizeLinear and fuses; it does not cross Flatten.
_CROSSED_FUNCTIONS = {torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose}
_CROSSED_METHODS = {"view", "reshape", "contiguous", "permute", "squeeze", "unsqueeze", "transpose"}


def _has_values(*items) -> bool:
    """Whether tensors (or emulated values) are among these arguments: only such calls count as float ops."""
    for v in items:
        if isinstance(v, (torch.Tensor, Codes, *_Pending)):
            return True
        if isinstance(v, (list, tuple)) and _has_values(*v):
            return True
        if isinstance(v, dict) and _has_values(*v.values()):
            return True
    return False


class _Integer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, kernels):
        super().__init__(gm)
        self.kernels = set(kernels)
        self.exact_ops: dict[str, int] = {}
        self.float_ops: dict[str, int] = {}

    def _count(self, table: dict, name: str) -> None:
        table[name] = table.get(name, 0) + 1

    # ---- values --------------------------------------------------------------------
    def _float(self, v):
        if isinstance(v, Codes):
            return v.real()
        if isinstance(v, _Pending):  # read in float by several users: computed (and counted) once
            if v.as_float is None:
                v.as_float = self._pending_in_float(v)
            return v.as_float
        if isinstance(v, (list, tuple)):
            return type(v)(self._float(a) for a in v)
        if isinstance(v, dict):
            return {k: self._float(a) for k, a in v.items()}
        return v

    def _pending_in_float(self, v):
        if isinstance(v, _Acc):
            if v.kernel == "QGemm" and "QGemm" in self.kernels:  # QGemm with a float output
                self._count(self.exact_ops, "QGemm (float output)")
                out = _f32(_f32(v.acc) * _bshape(v.s_xw, v.acc.dim(), v.ch_axis))
            else:
                out = v.in_float()
        elif isinstance(v, _Add):
            out = v.a.real() + v.b.real()  # float Add of the dequantized inputs
        elif isinstance(v, _Pool):  # float GlobalAveragePool of the dequantized values (to float32 rounding)
            out = _f32((v.total - v.src.zp * v.n) * v.src.scale.double() / v.n)
        return out.clamp(v.lo, v.hi) if (v.lo, v.hi) != _NO_CLAMP else out

    def _floats(self, args, kwargs):
        return self._float(args), self._float(kwargs)

    def _in_float(self, name: str, fn, args, kwargs):
        if _has_values(args, kwargs):
            self._count(self.float_ops, name)
        args, kwargs = self._floats(args, kwargs)
        return fn(*args, **kwargs)

    # ---- requantization at an activation quantizer -----------------------------------
    def _quantize(self, v, q: Quantizer) -> Codes:
        s = q.scale.detach().reshape(()).to(_F32)
        zp = int(torch.round(q.zero_point.detach()).reshape(()).item())
        qmin, qmax = q.scheme.qmin, q.scheme.qmax
        if isinstance(v, _Pending) and not self._fuses(v, s, zp, qmin, qmax):
            self._count(self.float_ops, f"{v.kernel[len('QLinear'):] if v.kernel.startswith('QLinear') else 'Gemm'} (not fused)")
            v = self._float(v)  # ONNX Runtime runs this op in float and quantizes its output
        if isinstance(v, _Acc):
            m = _bshape(_f32(v.s_xw) / s, v.acc.dim(), v.ch_axis)  # float32(float32(s_x s_w) / s_y)
            code = _rne(_f32(v.acc) * m) + zp
        elif isinstance(v, _Add):
            code = qlinear_add(v.a, v.b, s, zp)
        elif isinstance(v, _Pool):
            scale = _f32(v.src.scale / _f32(s * float(v.n)))
            code = _rne(_f32(v.total - v.src.zp * v.n) * scale) + zp
        else:
            code = _rne(self._float(v).to(_F32) / s) + zp  # QuantizeLinear divides (fake-quant multiplies by 1/s)
        self._count(self.exact_ops, v.kernel if isinstance(v, _Pending) else "QuantizeLinear")
        return Codes(code.clamp(qmin, qmax), s, zp, qmin, qmax)

    def _fuses(self, v, s: torch.Tensor, zp: int, qmin: int, qmax: int) -> bool:
        """Whether ONNX Runtime turns this op and its QuantizeLinear into one integer kernel."""
        if (qmin, qmax) != ((0, 255) if qmin >= 0 else (-128, 127)):
            return False  # a narrower grid: the export's Clip sits between the op and its QuantizeLinear
        if v.kernel not in self.kernels or (isinstance(v, _Pool) and not v.direct):
            return False
        # a Relu/Clip folds only where the quantizer's own range lies inside it (ONNX Runtime's absolute tolerance)
        q_lo, q_hi = float((qmin - zp) * s), float((qmax - zp) * s)
        return v.lo - q_lo <= _FLT_EPSILON and q_hi - v.hi <= _FLT_EPSILON

    # ---- nodes ------------------------------------------------------------------------
    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        single = len(args) == 1 and not kwargs
        if isinstance(m, Quantizer):
            if m.state == "quant" and m.scheme.ch_axis is None and m.role == "act":
                return self._quantize(x, m)
            return m(self._float(x)) if m.state != "off" else x
        if isinstance(m, QuantLayer) and isinstance(x, Codes) and single:
            out = self._layer(m, x)
            if out is not None:
                return out
        if isinstance(x, _Pending) and single and isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, float("inf")) if isinstance(m, nn.ReLU) else (float(m.min_val), float(m.max_val))
            return _clamped(x, lo, hi)
        if isinstance(x, Codes) and single and isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) \
                and _is_one(m.output_size):
            return self._pool(x)
        if single and isinstance(m, _MAX_POOLS) and not m.return_indices:
            pooled = self._max_pool(x, m)
            if pooled is not None:
                return pooled
        if single and isinstance(m, (nn.Identity, nn.Dropout)) and not m.training:
            return x  # inference: ONNX Runtime removes them
        if isinstance(x, Codes) and single and isinstance(m, nn.Flatten):
            return x.like(m(x.q))
        return self._in_float(type(m).__name__, m, args, kwargs)

    def call_function(self, target, args, kwargs):
        x = args[0] if args else None
        if isinstance(x, _Pending) and len(args) == 1 and set(kwargs) <= {"inplace"}:
            if target in _RELU_FUNCTIONS:
                return _clamped(x, 0.0, float("inf"))
            if target is F.relu6:
                return _clamped(x, 0.0, 6.0)
        if target in ADD_FUNCTIONS and len(args) == 2 and not kwargs and all(isinstance(a, Codes) for a in args):
            return _Add(args[0], args[1])
        if target in _MAX_POOL_FUNCTIONS and not kwargs.get("return_indices"):
            pooled = self._max_pool(x, lambda t: target(t, *args[1:], **kwargs))
            if pooled is not None:
                return pooled
        if isinstance(x, _Pool) and target in _SHAPE_FUNCTIONS:
            return replace(x, total=target(x.total, *args[1:], **kwargs), direct=x.direct and target in _CROSSED_FUNCTIONS)
        if isinstance(x, Codes):
            if target in _SHAPE_FUNCTIONS:
                return x.like(target(x.q, *args[1:], **kwargs))
            if target is F.pad and _zero_pad(args, kwargs):
                return x.like(F.pad(x.q, args[1] if len(args) > 1 else kwargs["pad"], value=float(x.zp)))
            if target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d) and \
                    _is_one(args[1] if len(args) > 1 else kwargs.get("output_size")):
                return self._pool(x)
            if target is getattr:
                return getattr(x.q, args[1])
        return self._in_float(getattr(target, "__name__", str(target)), target, args, kwargs)

    def call_method(self, target, args, kwargs):
        x = args[0]
        if isinstance(x, Codes):
            if target in _SHAPE_METHODS:
                return x.like(getattr(x.q, target)(*args[1:], **kwargs))
            if target in ("size", "dim"):
                return getattr(x.q, target)(*args[1:], **kwargs)
        if isinstance(x, _Pool):
            if target in ("size", "dim"):
                return getattr(x.total, target)(*args[1:], **kwargs)
            if target in _SHAPE_METHODS:
                return replace(x, total=getattr(x.total, target)(*args[1:], **kwargs),
                               direct=x.direct and target in _CROSSED_METHODS)
        if isinstance(x, _Pending) and target in ("relu", "relu_") and len(args) == 1:
            return _clamped(x, 0.0, float("inf"))
        if target in ("add", "add_") and len(args) == 2 and not kwargs and isinstance(x, Codes) \
                and isinstance(args[1], Codes):
            return _Add(x, args[1])
        return self._in_float(f".{target}", lambda *a, **k: getattr(a[0], target)(*a[1:], **k), args, kwargs)

    def output(self, target, args, kwargs):
        return self._float(args[0])

    # ---- integer kernels ------------------------------------------------------------------
    def _layer(self, m: QuantLayer, x: Codes) -> _Acc | None:
        wq = m.weight_quant
        is_linear = isinstance(m.layer, nn.Linear)
        if wq.state != "quant" or not isinstance(m.layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return None
        if is_linear and x.q.dim() != 2:
            return None  # a Linear on [B, T, C] exports as MatMul + Add, not QGemm
        if m.layer.bias is not None and m.bias_scale() is None:
            return None  # a float bias: not an integer kernel's arithmetic
        w = m.layer.weight.detach()
        ch = wq.scheme.ch_axis
        w_zp = torch.round(wq.zero_point.detach()).to(_F32)
        w_codes = wq.int_repr(w).to(_F32) - (_bshape(w_zp, w.dim(), ch) if ch is not None else w_zp)
        b_codes = m.bias_codes()
        bound = w[0].numel() * float(max(abs(x.qmax - x.zp), abs(x.qmin - x.zp))) * float(w_codes.abs().max())
        bound += 0.0 if b_codes is None else float(b_codes.abs().max())
        # float32 where every partial sum provably stays exact on CPU; float64 otherwise, and on accelerators,
        # whose convolution algorithms (Winograd, FFT, TF32) are not exact: the result is rounded back to integers
        exact32 = bound < _EXACT_F32 and x.q.device.type == "cpu"
        dtype = _F32 if exact32 else torch.float64
        params = {"weight": w_codes.to(dtype)}
        if b_codes is not None:
            params["bias"] = b_codes.to(dtype)
        acc = torch.func.functional_call(m.layer, params, (x.q.to(dtype) - x.zp,)).double()
        if not exact32:
            acc = torch.round(acc)
        s_xw = _f32(x.scale * wq.scale.detach().to(_F32).reshape(-1))  # float32(s_x * s_w): the bias grid, too
        return _Acc(acc, s_xw, -1 if is_linear else 1, "QGemm" if is_linear else "QLinearConv",
                    in_float=lambda: m(x.real()))

    def _pool(self, x: Codes) -> _Pool:
        dims = tuple(range(2, x.q.dim()))
        n = 1
        for d in dims:
            n *= x.q.shape[d]
        return _Pool(x.q.double().sum(dims, keepdim=True), n, x, direct=True)

    def _max_pool(self, x, pool):
        """MaxPool on codes or on an accumulator: ONNX Runtime moves the QuantizeLinear above a MaxPool, and
        the max commutes with the monotone requantisation (m > 0), so pooling first is exact."""
        if isinstance(x, Codes):
            return x.like(pool(x.q))
        if isinstance(x, _Acc):
            return replace(x, acc=pool(x.acc), in_float=lambda: pool(x.in_float()))
        return None


def _clamped(v, lo: float, hi: float):
    return replace(v, lo=max(v.lo, lo), hi=min(v.hi, hi))


def qlinear_add(a: Codes, b: Codes, scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    """ONNX Runtime's QLinearAdd (MLAS's AVX2 kernel, which every x86 CPU with AVX2 runs, AVX-512 ones
    included): the output codes before saturation. Its constant k is a C++ expression,
    z_c - (r_a * z_a + r_b * z_b), that the compiler of ONNX Runtime's Linux x86-64 wheels contracts into
    fma(r_a, z_a, r_b * z_b); without the contraction 1 to 2 of 65,536 code pairs land on the other side of
    a rounding tie (tests/test_emulate.py compares every pair with the installed ONNX Runtime, so a build
    that does not contract fails there)."""
    r_a, r_b = _f32(a.scale / scale), _f32(b.scale / scale)
    z_a, z_b = torch.tensor(float(a.zp), dtype=_F32), torch.tensor(float(b.zp), dtype=_F32)
    k = _f32(torch.tensor(float(zero_point), dtype=_F32) - _fma(r_a, z_a, _f32(r_b * z_b)))
    return _rne(_fma(a.q, r_a, _fma(b.q, r_b, k)))


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, a * b + c rounded once to float32. float64 holds a * b (an 8-bit code
    times a float32) exactly, and its sum with c exactly unless their exponents are ~29 binary orders
    apart, where the float64 rounding could (rarely) differ from the single rounding of an fma."""
    return _f32(a.double() * b.double() + c.double())


def _bshape(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel [C] tensor shaped to broadcast along `axis` of an ndim tensor (0-d when C is 1)."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _is_one(size) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _zero_pad(args, kwargs) -> bool:
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode == "constant" and not value


@torch.no_grad()
def integer_forward(qmodel: fx.GraphModule, x: torch.Tensor, report: dict | None = None,
                    kernels=KERNELS) -> torch.Tensor:
    """The model's output as ONNX Runtime's integer kernels compute it (see the module docstring for the
    scope). report, if given, receives which ops ran with integer arithmetic and which in float.
    kernels: the integer op types ONNX Runtime's optimised graph has (check.optimized_op_counts); an
    op kind missing there runs in float, as it does in the runtime."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError("integer_forward takes a model made by qdrop.prepare (a torch.fx GraphModule)")
    was_training = qmodel.training
    qmodel.eval()
    try:
        interp = _Integer(qmodel, kernels)
        out = interp.run(x.to(_F32))
    finally:
        qmodel.train(was_training)
    if report is not None:
        report.update(exact=dict(sorted(interp.exact_ops.items())), float=dict(sorted(interp.float_ops.items())))
    return out


class IntegerModel(nn.Module):
    """qmodel as ONNX Runtime's integer kernels compute it (integer_forward), as a module: anything that
    evaluates a model (qdrop.eval.top1, a data-parallel evaluation) scores the deployed arithmetic with it.
    It assumes ONNX Runtime fuses every op it can (KERNELS); `qdrop export --check` reads the fused ops from
    the runtime's optimised graph instead."""

    def __init__(self, qmodel: fx.GraphModule, kernels=KERNELS):
        super().__init__()
        self.qmodel, self.kernels = qmodel, frozenset(kernels)
        self.report: dict = {}  # integer_forward's report of the last call: the ops run exactly and in float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return integer_forward(self.qmodel, x, self.report, kernels=self.kernels)
