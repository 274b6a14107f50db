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
  QLinearAdd (AVX2 kernel)  r_a = float32(s_a / s_c), r_b = float32(s_b / s_c)
                            k = float32(z_c - float32(r_a * z_a + r_b * z_b))
                            q = sat(rne(fma(a, r_a, fma(b, r_b, k))))
  QLinearGlobalAveragePool  q = sat(rne(float32(sum - z_x * N) * float32(s_x / float32(s_y * N))) + z_y)
  Gemm/Conv without an output quantizer (the logits): float32(float32(acc) * float32(s_x * s_w))
A ReLU / ReLU6 between a layer and its output quantizer is a clamp of the codes (ONNX Runtime folds it
into the kernel's saturation). Anything else runs in float on dequantized values, as ONNX Runtime
runs ops it has no integer kernel for.

Scope, stated where it is used: 8-bit activation grids, per-tensor activation quantizers, and kernels
that do not saturate (qdrop's avx2 target on any x86 CPU; the vnni target only on VNNI/AMX CPUs,
qdrop.export.x86). Sums are computed in float32 where every partial sum provably stays below 2**24,
else in float64: either way exactly.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.layers import INT32_BIAS_MAX, INT32_BIAS_MIN, QuantLayer
from ..quant.quantizer import Quantizer

_F32 = torch.float32
_EXACT_F32 = 2.0 ** 24  # integers below this are exact in float32, and so are sums that stay below it


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
        return Codes(q, self.scale, self.zp, self.qmin, self.qmax)


@dataclass
class _Pending:
    """A value an integer kernel computes and its output quantizer requantizes: an accumulator
    (conv/linear), a QLinearAdd or a global average pool, with the ReLU-style clamps met on the way."""
    kind: str  # "acc", "add", "pool"
    parts: tuple
    lo: float = float("-inf")
    hi: float = float("inf")

    def clamped(self, lo: float, hi: float) -> "_Pending":
        return _Pending(self.kind, self.parts, max(self.lo, lo), min(self.hi, hi))


KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool"})
_RELU_FUNCTIONS = {F.relu, torch.relu}
_RELU6_FUNCTIONS = {F.relu6}
_ADD_FUNCTIONS = {operator.add, torch.add}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    operator.getitem}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "squeeze", "unsqueeze", "transpose"}
# Shape ops ONNX Runtime's QDQ propagation moves a QuantizeLinear across (Reshape, Transpose, (Un)Squeeze), so
# that a pool before them still meets its QuantizeLinear and fuses; it does not cross Flatten.
_CROSSED_FUNCTIONS = {torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose}
_CROSSED_METHODS = {"view", "reshape", "contiguous", "permute", "squeeze", "unsqueeze", "transpose"}


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
        if isinstance(v, _Pending):
            if v.kind == "acc":
                acc, s_xw, ch_axis = v.parts
                out = _f32(acc) * _bshape(s_xw, acc.dim(), ch_axis)
            elif v.kind == "add":
                out = v.parts[0].real() + v.parts[1].real()
            else:  # float GlobalAveragePool of the dequantized values (to float32 rounding)
                total, n, src, _ = v.parts
                out = _f32((total - src.zp * n) * src.scale.double() / n)
            return out.clamp(v.lo, v.hi) if (v.lo, v.hi) != (float("-inf"), float("inf")) else out
        if isinstance(v, (list, tuple)):
            return type(v)(self._float(a) for a in v)
        if isinstance(v, dict):
            return {k: self._float(a) for k, a in v.items()}
        return v

    def _floats(self, args, kwargs):
        return self._float(args), self._float(kwargs)

    # ---- requantization at an activation quantizer -----------------------------------
    def _quantize(self, v, q: Quantizer) -> Codes:
        s = q.scale.detach().reshape(()).to(_F32)
        zp = int(torch.round(q.zero_point.detach()).reshape(()).item())
        qmin, qmax = q.scheme.qmin, q.scheme.qmax
        if isinstance(v, _Pending) and not self._fused(v, s, zp, qmin, qmax):
            v = self._float(v)  # ONNX Runtime runs this op in float and quantizes its output
        if isinstance(v, _Pending) and v.kind == "acc":
            acc, s_xw, ch_axis = v.parts
            m = _bshape(_f32(s_xw) / s, acc.dim(), ch_axis)  # float32(float32(s_x s_w) / s_y)
            code = _rne(_f32(acc) * m) + zp
            self._count(self.exact_ops, "requantize (QLinearConv/QGemm)")
        elif isinstance(v, _Pending) and v.kind == "add":
            a, b = v.parts
            r_a, r_b = _f32(a.scale / s), _f32(b.scale / s)
            k = _f32(torch.tensor(float(zp), dtype=_F32) - _f32(r_a * a.zp + r_b * b.zp))
            code = _rne(_fma(a.q, r_a, _fma(b.q, r_b, k)))
            self._count(self.exact_ops, "QLinearAdd")
        elif isinstance(v, _Pending) and v.kind == "pool":
            total, n, src, _ = v.parts
            scale = _f32(src.scale / _f32(s * float(n)))
            code = _rne(_f32(total - src.zp * n) * scale) + zp
            self._count(self.exact_ops, "QLinearGlobalAveragePool")
        else:
            code = _rne(self._float(v).to(_F32) / s) + zp  # QuantizeLinear divides (fake-quant multiplies by 1/s)
            self._count(self.exact_ops, "QuantizeLinear")
        return Codes(code.clamp(qmin, qmax), s, zp, qmin, qmax)

    def _fused(self, v: _Pending, s: torch.Tensor, zp: int, qmin: int, qmax: int) -> bool:
        """Whether ONNX Runtime turns this op and its QuantizeLinear into one integer kernel."""
        if (qmin, qmax) != ((0, 255) if qmin >= 0 else (-128, 127)):
            return False  # a narrower grid: the export's Clip sits between the op and its QuantizeLinear
        kernel = {"acc": "QGemm" if v.kind == "acc" and v.parts[2] == -1 else "QLinearConv", "add": "QLinearAdd",
                  "pool": "QLinearGlobalAveragePool"}[v.kind]
        if kernel not in self.kernels:
            return False
        if v.kind == "pool" and not v.parts[3]:
            return False  # a Flatten/Reshape between the pool and its QuantizeLinear keeps the pool in float
        # a Relu/Clip folds into the kernel's saturation only where the quantizer's own range lies inside it
        lo = float((qmin - zp) * s) if v.lo != float("-inf") else v.lo
        hi = float((qmax - zp) * s) if v.hi != float("inf") else v.hi
        eps = 1e-6 * float(s)
        return lo >= v.lo - eps and hi <= v.hi + eps

    # ---- nodes ------------------------------------------------------------------------
    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(m, Quantizer):
            if m.state == "quant" and m.scheme.ch_axis is None and m.role == "act":
                return self._quantize(x, m)
            return m(self._float(x)) if m.state != "off" else x
        if isinstance(m, QuantLayer) and isinstance(x, Codes) and len(args) == 1 and not kwargs:
            out = self._layer(m, x)
            if out is not None:
                return out
        if isinstance(x, _Pending) and isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)) and len(args) == 1:
            lo, hi = (0.0, float("inf")) if isinstance(m, nn.ReLU) else (m.min_val, m.max_val)
            return x.clamped(lo, hi)
        if isinstance(x, Codes) and len(args) == 1 and _is_global_pool_module(m, x.q):
            return self._pool(x)
        if isinstance(m, (nn.Identity, nn.Dropout)) and not m.training and len(args) == 1:
            return x  # inference: ONNX Runtime removes them
        if isinstance(x, Codes) and isinstance(m, nn.Flatten):
            return x.like(m(x.q))
        self._count(self.float_ops, type(m).__name__)
        return m(*self._float(args), **self._float(kwargs))

    def call_function(self, target, args, kwargs):
        x = args[0] if args else None
        if isinstance(x, _Pending) and len(args) == 1 and not kwargs.get("inplace"):
            if target in _RELU_FUNCTIONS:
                return x.clamped(0.0, float("inf"))
            if target in _RELU6_FUNCTIONS:
                return x.clamped(0.0, 6.0)
        if (target in _ADD_FUNCTIONS and len(args) == 2 and not kwargs
                and isinstance(args[0], Codes) and isinstance(args[1], Codes)):
            return _Pending("add", (args[0], args[1]))
        if isinstance(x, _Pending) and x.kind == "pool" and target in _SHAPE_FUNCTIONS:
            total, n, src, direct = x.parts
            return _Pending("pool", (target(total, *args[1:], **kwargs), n, src, direct and target in _CROSSED_FUNCTIONS),
                            x.lo, x.hi)
        if isinstance(x, Codes):
            if target in _SHAPE_FUNCTIONS:
                return x.like(target(x.q, *args[1:], **kwargs))
            if target is F.pad and _zero_pad(args, kwargs):
                return x.like(F.pad(x.q, args[1] if len(args) > 1 else kwargs["pad"], value=float(x.zp)))
            if target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d) and _is_one(args[1] if len(args) > 1 else kwargs.get("output_size")):
                return self._pool(x)
        if target is getattr and isinstance(x, Codes):
            return getattr(x.q, args[1])
        self._count(self.float_ops, getattr(target, "__name__", str(target)))
        args, kwargs = self._floats(args, kwargs)
        return target(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        x = args[0]
        if isinstance(x, Codes):
            if target in _SHAPE_METHODS:
                return x.like(getattr(x.q, target)(*args[1:], **kwargs))
            if target in ("size", "dim"):
                return getattr(x.q, target)(*args[1:], **kwargs)
            if target == "mean" and _global_dims(args[1:], kwargs, x.q.dim()):
                return self._pool(x, keepdim=kwargs.get("keepdim", args[2] if len(args) > 2 else False))
        if isinstance(x, _Pending) and x.kind == "pool" and target in ("size", "dim"):
            return getattr(x.parts[0], target)(*args[1:], **kwargs)
        if isinstance(x, _Pending) and x.kind == "pool" and target in _SHAPE_METHODS:
            total, n, src, direct = x.parts
            return _Pending("pool", (getattr(total, target)(*args[1:], **kwargs), n, src,
                                     direct and target in _CROSSED_METHODS), x.lo, x.hi)
        if isinstance(x, _Pending) and target in ("relu", "relu_") and len(args) == 1:
            return x.clamped(0.0, float("inf"))
        if (target == "add" and len(args) == 2 and not kwargs and isinstance(x, Codes)
                and isinstance(args[1], Codes)):
            return _Pending("add", (x, args[1]))
        self._count(self.float_ops, f".{target}")
        args, kwargs = self._floats(args, kwargs)
        return getattr(args[0], target)(*args[1:], **kwargs)

    def output(self, target, args, kwargs):
        return self._float(args[0])

    # ---- integer kernels ------------------------------------------------------------------
    def _layer(self, m: QuantLayer, x: Codes):
        wq = m.weight_quant
        if wq.state != "quant" or not isinstance(m.layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return None
        if m.layer.bias is not None and m.bias_scale() is None:
            return None  # a float bias: not an integer kernel's arithmetic
        w = m.layer.weight.detach()
        ch = wq.scheme.ch_axis
        w_zp = torch.round(wq.zero_point.detach()).to(_F32)
        w_codes = wq.int_repr(w).to(_F32) - (_bshape(w_zp, w.dim(), ch) if ch is not None else w_zp)
        x_codes = x.q - x.zp
        k = w[0].numel()
        bound = k * float(max(abs(x.qmax - x.zp), abs(x.qmin - x.zp))) * float(w_codes.abs().max())
        dtype = _F32 if bound < _EXACT_F32 else torch.float64  # every partial sum exact either way
        params = {"weight": w_codes.to(dtype)}
        s_w = wq.scale.detach().to(_F32).reshape(-1)
        s_xw = _f32(x.scale * s_w)  # float32(s_x * s_w): the int32 bias's scale and the requant's numerator
        if m.layer.bias is not None:
            b = torch.round(m.layer.bias.detach() / m.bias_scale()).clamp(INT32_BIAS_MIN, INT32_BIAS_MAX)
            params["bias"] = b.to(dtype)
        acc = torch.func.functional_call(m.layer, params, (x_codes.to(dtype),))
        self._count(self.exact_ops, type(m.layer).__name__)
        return _Pending("acc", (acc.double(), s_xw, 1 if acc.dim() > 2 else -1))

    def _pool(self, x: Codes, keepdim: bool = True):
        dims = tuple(range(2, x.q.dim()))
        n = 1
        for d in dims:
            n *= x.q.shape[d]
        total = x.q.double().sum(dims, keepdim=keepdim)
        return _Pending("pool", (total, n, x, True))


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add: the exact a*b + c (float64 holds a*b of a uint8 and a float32
    exactly, and their sum with a float32 of similar magnitude), rounded once to float32."""
    return _f32(a.double() * b.double() + c.double())


def _bshape(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _is_one(size) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _is_global_pool_module(m: nn.Module, q: torch.Tensor) -> bool:
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return _is_one(m.output_size)
    return False


def _global_dims(args, kwargs, ndim: int) -> bool:
    dims = args[0] if args else kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return sorted(d % ndim for d in dims) == list(range(2, ndim))


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
    qmodel.eval()
    interp = _Integer(qmodel, kernels)
    out = interp.run(x.to(_F32))
    if report is not None:
        report.update(exact=dict(sorted(interp.exact_ops.items())), float=dict(sorted(interp.float_ops.items())))
    return out
