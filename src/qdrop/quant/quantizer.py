"""The fake quantizer: one module for weights and activations.

States
  observe  - pass values through unchanged and feed the observer (calibration)
  quant    - fake-quantize (the default after calibration)
  off      - pass through (the prepared model then computes the original function)

Learning
  LSQ / LSQ+  - `learn_scale()` makes the step size (and optionally the zero point) a
                trainable parameter with the LSQ gradient, scaled by 1/sqrt(N * qmax).
  AdaRound    - `init_adaround(w)` switches a weight quantizer to learned rounding:
                W_q = s * (clip(floor(W/s) + h(V) + z, qmin, qmax) - z).
  QDrop       - `prob` < 1: in training mode each element keeps its FP value with
                probability 1 - prob (resampled every call).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .observers import Observer, make_observer
from .scheme import QScheme, qparams_from_range
from ..errors import UsageError

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch
STATES = ("observe", "quant", "off")


def _bshape(x: torch.Tensor, ch_axis: int | None, t: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel qparam [C] so it broadcasts against x."""
    if ch_axis is None:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def bernoulli_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """0/1 in like's shape and dtype, each element 1 with probability p (rounded to a multiple of
    2**-15; 0.5 is exact). Four 15-bit lanes are cut from each 64-bit random word: PyTorch's CPU
    generator is serial, and this costs 0.78 ms for 524k elements where rand_like(x) < p costs 1.65
    (2-core Xeon). A float mask, not a bool one, because the callers then select with lerp and
    multiply, which are vectorised on CPU where torch.where and bool arithmetic are not (1.0 ms)."""
    threshold = round(p * 32768)
    if threshold >= 32768:  # (not representable against int16 lanes)
        return torch.ones_like(like)
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_()
    lanes = words.view(torch.int16)[:n].view(like.shape) & 0x7FFF
    return (lanes < threshold).to(like.dtype)


def _select(x: torch.Tensor, xq: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """xq where keep is 1, x where it is 0 (keep None: xq). Exact: lerp returns its end points
    unchanged at weights 0 and 1."""
    return xq if keep is None else torch.lerp(x, xq, keep)


def _fake_quant_per_tensor(x: torch.Tensor, scale: torch.Tensor, zp_int: torch.Tensor, qmin: int, qmax: int):
    """PyTorch's per-tensor fake quantization and its straight-through mask (as x's dtype).
    On CPU as plain vectorised tensor ops with the kernel's own arithmetic (x * (1/s), round half
    to even, + z, clamp; tested bit-identical): the fused CPU kernel takes 2.45 ms on 524k elements
    where these take 0.43 ms. CUDA keeps the fused kernel (one launch)."""
    if x.device.type != "cpu":
        xq, inside = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale.reshape(()), zp_int.reshape(()), _enabled(x.device), qmin, qmax)
        return xq, inside.to(x.dtype)
    z = zp_int.to(x.dtype).reshape(())
    code = torch.round(x * (1.0 / scale.reshape(()))).add_(z)
    clamped = code.clamp(qmin, qmax)
    inside = (code == clamped).to(x.dtype)
    return clamped.sub_(z).mul_(scale.reshape(())), inside


class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with the LSQ(+) gradients and optional QDrop dropping, fused.

    Forward: fake quantization with tensor qparams (no host sync) and its straight-through
    mask `inside` (the rounded code was not clamped), both as x's dtype. With `keep` (QDrop, a
    0/1 mask) an element takes its quantized value where keep is 1 and its FP value elsewhere.
    Backward, the closed form of LSQ with v = x/s:
      d out/d x = 1 where inside or dropped, else 0   (straight-through estimator)
      d out/d s = round(v) - v inside, (qmin - z) or (qmax - z) outside, 0 where dropped
      d out/d z = 0 inside, -s outside (LSQ+), 0 where dropped
    each scaled by grad_factor. The sums are written as dot products of full tensors
    (sum g*(out - x*inside)/s = (g.out - (g*inside).x)/s): no temporaries per term. Masks are
    0/1 floats, so every product is exact and the gradients are those of the bool formulation.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, keep):
        zp_int = torch.round(zero_point).to(torch.int32)
        if ch_axis is None:
            xq, inside = _fake_quant_per_tensor(x, scale, zp_int, qmin, qmax)
        else:
            xq, inside = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp_int, ch_axis % x.dim(), qmin, qmax)
            inside = inside.to(x.dtype)
        ctx.save_for_backward(x, xq, inside, keep, scale)
        ctx.qmin, ctx.qmax, ctx.ch_axis, ctx.grad_factor = qmin, qmax, ch_axis, grad_factor
        return _select(x, xq, keep)

    @staticmethod
    def backward(ctx, g):
        x, xq, inside, keep, scale = ctx.saved_tensors
        ch = ctx.ch_axis
        g = g.contiguous()
        gq = g if keep is None else g * keep  # gradient reaching the quantized values
        gin = gq * inside
        gx = gin if keep is None else (g - gq).add_(gin)  # 1 where inside or dropped
        grad_s = grad_z = None
        if ch is None:
            grad_s = (torch.dot(gq.reshape(-1), xq.reshape(-1)) - torch.dot(gin.reshape(-1), x.reshape(-1))) / scale
            grad_s = grad_s.reshape(scale.shape) * ctx.grad_factor
            if ctx.needs_input_grad[2]:
                grad_z = -scale * (gq.sum() - gin.sum()) * ctx.grad_factor
                grad_z = grad_z.reshape(scale.shape)
        else:
            axis = ch % x.dim()
            dims = tuple(d for d in range(x.dim()) if d != axis)
            s = _bshape(x, ch, scale)
            grad_s = ((gq * xq - gin * x) / s).sum(dims) * ctx.grad_factor
            if ctx.needs_input_grad[2]:
                grad_z = -scale * (gq.sum(dims) - gin.sum(dims)) * ctx.grad_factor
        return gx, grad_s, grad_z, None, None, None, None, None


_ENABLED: dict = {}


def _enabled(device) -> torch.Tensor:
    """The fused kernel's 'fake quant enabled' flag, kept on the data's device (no copies per call)."""
    if device not in _ENABLED:
        _ENABLED[device] = torch.ones((), dtype=torch.long, device=device)  # int64: the CUDA kernel requires it
    return _ENABLED[device]


def _soft_rounding(alpha: torch.Tensor):
    """sigmoid(V), h(V) = clamp(sigmoid(V)(zeta - gamma) + gamma, 0, 1) and where the clamp is inactive:
    what both closed-form Functions below need (the gradient of h is (zeta - gamma) sig (1 - sig) there)."""
    sig = torch.sigmoid(alpha)
    h = sig * (ZETA - GAMMA) + GAMMA
    inside = (h > 0) & (h < 1)
    return sig, h.clamp_(0, 1), inside


class _RoundLoss(torch.autograd.Function):
    """AdaRound's regulariser sum(1 - |2h(V) - 1|^beta), h(V) = clamp(sigmoid(V)(zeta - gamma) + gamma, 0, 1),
    with its gradient in closed form:
      dL/dV = -2 beta |2h - 1|^(beta - 1) sign(2h - 1) (zeta - gamma) sigmoid(V)(1 - sigmoid(V)),
    0 where the stretch is clamped. Autograd through abs/pow/clamp/sigmoid keeps ~12 full-size
    temporaries and pow's backward recomputes the power (24 ms for a 1536x384 weight on one Xeon
    core); this keeps one power and three products (the ratio is in benchmarks/rounding_speed.py).
    beta may be a number or a 0-d tensor (the CUDA-graph loop anneals it on the device)."""

    @staticmethod
    def forward(ctx, alpha, beta):
        sig, h, inside = _soft_rounding(alpha)
        c = h.mul_(2).sub_(1)  # 2h - 1
        u = c.abs()
        p = u.pow(beta - 1)
        ctx.save_for_backward(sig, inside, c, p, torch.as_tensor(beta, dtype=alpha.dtype, device=alpha.device))
        return (1 - p * u).sum()

    @staticmethod
    def backward(ctx, g):
        sig, inside, c, p, beta = ctx.saved_tensors
        # sig(1 - sig) * inside * sign(c) * p, scaled once by -2 beta (zeta - gamma) g
        d = sig * (1 - sig)
        d.mul_(p).mul_(torch.sign(c)).mul_(inside)
        return d.mul_(g * beta * (-2 * (ZETA - GAMMA))), None


class _SoftRoundWeight(torch.autograd.Function):
    """AdaRound's soft-rounded weight s (clamp(floor(w/s) + z + h(V), qmin, qmax) - z) for a fixed w, s and
    z (the reconstruction stages learn V alone), with dW_q/dV = s (zeta - gamma) sigmoid(V)(1 - sigmoid(V))
    where neither clamp is active, 0 elsewhere. The same values as the expression (bit for bit) and its
    autograd gradient, with one saved mask and one saved sigmoid instead of its chain of temporaries
    (15 -> 6 ms forward + backward for a 1536x384 weight on one Xeon core)."""

    @staticmethod
    def forward(ctx, w, alpha, s, z, qmin, qmax, offset=None):
        sig, h, inside = _soft_rounding(alpha)
        q = torch.floor(w / s)
        if offset is not None:  # AdaRound from held codes (init_adaround): an integer, so exact
            q.add_(offset)
        q.add_(h).add_(z)  # the order of _adaround's sum: the same float values
        inside &= (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(sig, inside, s)
        return q.clamp_(qmin, qmax).sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, g):
        sig, inside, s = ctx.saved_tensors
        d = sig * (1 - sig)
        d.mul_(inside).mul_(g).mul_(s * (ZETA - GAMMA))
        return None, d, None, None, None, None, None


class Quantizer(nn.Module):
    def __init__(self, scheme: QScheme, num_channels: int | None = None, role: str = "act"):
        super().__init__()
        self.scheme = scheme
        self.role = role  # "weight" or "act": only for reports and presets
        shape = () if scheme.ch_axis is None else (num_channels,)
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.state = "off"
        self.prob = 1.0  # QDrop: probability that an element is quantized (training mode)
        self.observer: Observer | None = None
        self.calibrated = False
        self.alpha: nn.Parameter | None = None  # AdaRound's V
        # Learned weight step size (init_adaround(learn_scale=True)): log(s / s0) per channel while V is
        # learned; the grid's base floor(w / s0) is held fixed (_adaround). None: the step stays s0.
        self.log_step: nn.Parameter | None = None
        self._base: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        # AdaRound started from held codes (init_adaround): the lower of V's two choices, as an offset from
        # floor(w / s). None: floor(w / s) itself, AdaRound's own choice between floor and ceil.
        self._offset: torch.Tensor | None = None
        # Step sizes learned on fixed integer codes (learn_step): the codes, while log_step is learned on them
        self._codes: torch.Tensor | None = None
        self.hard_round = False
        self.register_buffer("round_up", None)  # learned rounding decisions (uint8 0/1), once fixed

    # ---- configuration -------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.scheme.bits

    def set_scheme(self, scheme: QScheme) -> None:
        if self.calibrated:
            raise UsageError("cannot change the scheme of a calibrated quantizer")
        self.scheme = scheme

    def observe(self) -> None:
        self.observer = make_observer(self.scheme)
        self.state = "observe"

    # ---- state: other modules change a quantizer only through these methods ---------------
    def set_state(self, state: str) -> None:
        """observe / quant / off. 'quant' needs a range (calibrated or set)."""
        if state not in STATES:
            raise UsageError(f"unknown quantizer state {state!r}; choose from {STATES}")
        if state == "quant" and not self.calibrated:
            raise UsageError("model is not calibrated: run qdrop.calibrate first")
        if state == "observe" and self.observer is None:
            self.observer = make_observer(self.scheme)
        self.state = state

    def set_range(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Use this scale and zero point (reshaped to this quantizer's) and start quantizing."""
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale).reshape(self.scale.shape))
            self.zero_point.copy_(torch.as_tensor(zero_point).reshape(self.zero_point.shape))
        self.observer = None
        self.calibrated = True
        self.state = "quant"

    def mark_dynamic(self) -> None:
        """Ranges computed per call by the caller (per-token quantization): nothing to calibrate."""
        self.observer = None
        self.calibrated = True

    def saw_nothing(self) -> None:
        """Calibration ended without data for this quantizer: it stays off, uncalibrated."""
        self.observer = None
        self.state = "off"

    def set_drop(self, prob: float) -> None:
        """QDrop: in training mode each element is quantized with probability `prob` (1: always)."""
        if not 0.0 <= prob <= 1.0:
            raise UsageError(f"drop probability must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def set_calibrated(self, calibrated: bool) -> None:
        """For loading a checkpoint: whether the saved state holds a range for this quantizer
        (it quantizes when it does, else stays off)."""
        self.calibrated = bool(calibrated)
        self.state = "quant" if calibrated else "off"

    def freeze(self) -> None:
        """Turn what the observer saw into scale and zero point, and start quantizing."""
        lo, hi = self.observer.compute_range()
        self.set_range(*qparams_from_range(lo, hi, self.scheme))

    def calibrate_on(self, x: torch.Tensor) -> None:
        """Observe one tensor and freeze (weights: the tensor is the whole population)."""
        self.observe()
        self.observer.update(x, whole=True)
        self.freeze()

    def learn_scale(self, zero_point: bool = False) -> None:
        self.scale.requires_grad_(True)
        self.zero_point.requires_grad_(zero_point)

    def stop_learning(self) -> None:
        self.scale.requires_grad_(False)
        self.zero_point.requires_grad_(False)
        with torch.no_grad():
            self.scale.clamp_(min=1e-8)
            self.zero_point.copy_(torch.clamp(torch.round(self.zero_point), self.scheme.qmin, self.scheme.qmax))

    # ---- AdaRound --------------------------------------------------------------------
    def init_adaround(self, w: torch.Tensor, learn_scale: bool = False) -> None:
        """V from the weights' distance to the grid point below (AdaRound's initialisation), or, when the
        rounding was already decided (fix_rounding: a later stage re-opens it), from those decisions: h(V)
        starts at 0.01 / 0.99, off the clamp so that V has a gradient, and 0.01 of a step from the kept model.
        From codes another rounding fixed (fix_codes, e.g. GPTQ's, which may lie steps away from w), V chooses
        between each code and its neighbour towards w, starting at the code.

        learn_scale: the per-channel step size is learned with V (log_step, a log-ratio to the observer's s0,
        starting at 0), on a grid whose base floor(w / s0) stays where it started, so the weight is
        s (clamp(floor(w / s0) + z + h(V), qmin, qmax) - z): a step size change moves every code of the channel
        by the same factor instead of re-flooring them (Genie-M's joint step-size and rounding learning)."""
        if self._codes is not None:
            raise UsageError("init_adaround: a step size is being learned on held codes; end it with fix_step first")
        if learn_scale and self.round_up is not None:
            raise UsageError("a learned weight step size cannot re-open rounding decisions taken on another step "
                             "size; learn it in the first stage that learns the rounding")
        s = _bshape(w, self.scheme.ch_axis, self.scale.detach())
        self._offset = None
        if self.round_up is not None and self.round_up.dtype != torch.uint8:
            # fixed codes c of another rounding (GPTQ: possibly several steps from w): V chooses between c and its
            # neighbour towards w, starting at c (h = 0.99 above the neighbour, 0.01 below); _offset holds the
            # lower of the two as an offset from floor(w / s)
            offset = self.round_up.to(w.dtype)
            above = (torch.floor(w.detach() / s) + offset) * s > w.detach()  # c's value (c - z) s lies above w
            self._offset = offset - above.to(w.dtype)
            rest = 0.01 + 0.98 * above.to(w.dtype)
        elif self.round_up is not None:
            rest = 0.01 + 0.98 * self.round_up.to(w.dtype)
        else:
            rest = w.detach() / s - torch.floor(w.detach() / s)
            rest = rest.clamp(1e-6, 1 - 1e-6)  # finite V at exact grid points
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard_round = False
        self.round_up = None
        if learn_scale:
            self.log_step = nn.Parameter(torch.zeros_like(self.scale.detach()))
            self._base = torch.floor(w.detach() / s)
            self._weight = w.detach()

    def rounding(self) -> torch.Tensor:
        """h(V) in [0, 1]: soft while learning, {0, 1} once hard (or once fixed)."""
        if self.alpha is None:
            return self.round_up.to(self.scale.dtype)
        if self.hard_round:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def harden(self) -> None:
        """Use the hard decisions (V >= 0) from now on, V no longer learned (a hard tail)."""
        self.hard_round = True

    def round_loss(self, beta) -> torch.Tensor:
        """sum(1 - |2h(V) - 1|^beta): 0 once every h is 0 or 1 (V learning; hard or fixed: 0)."""
        if self.alpha is None or self.hard_round:
            return torch.zeros((), dtype=self.scale.dtype, device=self.scale.device)
        return _RoundLoss.apply(self.alpha, beta)

    def _adaround(self, w: torch.Tensor) -> torch.Tensor:
        z = _bshape(w, self.scheme.ch_axis, self.zero_point)
        if self.log_step is not None:  # learned step size on the fixed base (init_adaround)
            s = _bshape(w, self.scheme.ch_axis, self.scale.detach() * torch.exp(self.log_step))
            q = torch.clamp(self._base + self.rounding() + z, self.scheme.qmin, self.scheme.qmax)
            return (q - z) * s
        s = _bshape(w, self.scheme.ch_axis, self.scale)
        offset = self._offset
        if self.alpha is not None and not self.hard_round and not (w.requires_grad or s.requires_grad or z.requires_grad):
            return _SoftRoundWeight.apply(w, self.alpha, s, z, self.scheme.qmin, self.scheme.qmax, offset)
        base = torch.floor(w / s) if offset is None else torch.floor(w / s) + offset
        q = torch.clamp(base + self.rounding() + z, self.scheme.qmin, self.scheme.qmax)
        return (q - z) * s

    def fix_rounding(self) -> None:
        """End AdaRound: keep the hard decisions (round up or down, one bit per weight) as a
        buffer and drop V. The FP weight itself is never modified, so the FP model (all
        quantizers off) stays the original - needed by later stages and by resuming. With a learned
        step size, the step becomes the quantizer's scale and the codes are kept as fixed codes (fix_codes):
        their base is floor(w / s0), not floor(w / s)."""
        if self.log_step is not None:
            with torch.no_grad():
                z = _bshape(self._weight, self.scheme.ch_axis, self.zero_point.detach())
                codes = self._base + (self.alpha.detach() >= 0).to(self._base.dtype) + z  # fix_codes clamps them
                self.scale.copy_((self.scale * torch.exp(self.log_step)).clamp(min=1e-8))
            w = self._weight
            self.log_step, self._base, self._weight = None, None, None
            self.fix_codes(w, codes)
            return
        up = (self.alpha.detach() >= 0)
        if self._offset is not None:  # started from held codes: the chosen codes, as fix_codes keeps them
            self.round_up = (self._offset + up.to(self._offset.dtype)).round().to(torch.int16)
        else:
            self.round_up = up.to(torch.uint8)
        self.alpha, self._offset = None, None
        self.hard_round = False

    def fix_codes(self, w: torch.Tensor, codes: torch.Tensor) -> None:
        """Quantize the weight w to these integer codes (another rounding's, e.g. GPTQ's, which may lie
        further than one step from w). Kept like AdaRound's decisions, as an offset from floor(w / s) + z
        (int16), so the FP weight stays unmodified; AdaRound cannot start from them (init_adaround)."""
        if self._codes is not None:
            raise UsageError("fix_codes: a step size is being learned on held codes; end it with fix_step first")
        s = _bshape(w, self.scheme.ch_axis, self.scale.detach())
        z = _bshape(w, self.scheme.ch_axis, self.zero_point.detach())
        with torch.no_grad():
            codes = torch.clamp(codes.to(w.device), self.scheme.qmin, self.scheme.qmax)
            offset = codes.to(w.dtype) - torch.floor(w.detach() / s) - z
            if offset.abs().max() > torch.iinfo(torch.int16).max:  # a weight ~32k steps outside its range
                raise ValueError("fix_codes: a code lies more than 32767 steps from its weight")
            offset = offset.round().to(torch.int16)
            if self.round_up is not None and self.round_up.dtype == offset.dtype and self.round_up.shape == offset.shape:
                self.round_up.copy_(offset)  # in place: a new version, which cached weights (QuantLinear) see
            else:
                self.round_up = offset
        self.alpha, self._offset = None, None  # _offset only ever lives beside alpha
        self.hard_round = False

    # ---- step sizes on fixed codes ---------------------------------------------------
    def learn_step(self, w: torch.Tensor) -> None:
        """Learn the weight's per-channel step size with its integer codes held: the codes it has now (nearest
        rounding, GPTQ's, a fixed AdaRound's) stay, and the weight is (c - z) s0 exp(log_step), log_step starting
        at 0. Unlike init_adaround(learn_scale=True) nothing is re-floored: a step change only moves the spacing
        of the chosen integers (the end-to-end step-size training of EfficientQAT's E2E-QP and PEQA). fix_step
        ends it. A state_dict taken before fix_step holds log_step and not the codes: finish first, then save."""
        if self.role != "weight" or self.alpha is not None or self.state != "quant" or self.log_step is not None:
            raise UsageError("learn_step needs a calibrated weight quantizer with its rounding decided (fix_rounding) "
                             "and no step already being learned (fix_step ends that)")
        self._codes = self.int_repr(w).to(torch.int16 if self.scheme.qmax <= 32767 else torch.int32)  # (cast per call)
        self._weight = w.detach()
        self.log_step = nn.Parameter(torch.zeros_like(self.scale.detach()))

    def fix_step(self) -> None:
        """End learn_step: the learned step becomes the scale, and the same codes are kept (fix_codes). A step
        that is not finite (a diverged run) keeps its starting value."""
        if self._codes is None:
            raise UsageError("fix_step ends learn_step: call learn_step first")
        with torch.no_grad():
            u = torch.where(torch.isfinite(self.log_step), self.log_step, torch.zeros_like(self.log_step))
            self.scale.copy_((self.scale * torch.exp(u)).clamp(min=1e-8))
        w, codes = self._weight, self._codes
        self.log_step, self._codes, self._weight = None, None, None
        self.fix_codes(w, codes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "round_up"
        if key in state_dict and self.round_up is None:  # a checkpoint with learned rounding
            self.round_up = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x on this quantizer's grid (int64): nearest rounding, or the
        learned AdaRound decisions when this quantizer holds them (x is then the weight)."""
        if self._codes is not None:  # learn_step: the held codes
            return self._codes.long()
        if self.alpha is None and self.round_up is None:
            return self.nearest_codes(x)
        s = _bshape(x, self.scheme.ch_axis, self.scale.detach())
        z = _bshape(x, self.scheme.ch_axis, self.zero_point.detach())
        with torch.no_grad():
            q = torch.floor(x / s) + self.rounding().detach() + z
            if self._offset is not None:
                q = q + self._offset
        return torch.clamp(q, self.scheme.qmin, self.scheme.qmax).long()

    def nearest_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x by nearest rounding on this quantizer's grid (int64), whatever codes it holds."""
        s = _bshape(x, self.scheme.ch_axis, self.scale.detach())
        z = _bshape(x, self.scheme.ch_axis, self.zero_point.detach())
        with torch.no_grad():
            # x * (1/s), not x / s: the same float arithmetic as PyTorch's fake-quant kernels, so
            # that exact ties (a min/max weight at +-127.5 steps) round as in the simulation
            q = torch.round(x * (1.0 / s)) + z
        return torch.clamp(q, self.scheme.qmin, self.scheme.qmax).long()

    # ---- forward ---------------------------------------------------------------------
    def grad_factor(self, x: torch.Tensor) -> float:
        # LSQ's gradient scale, with N the number of elements quantized by one step size
        # (all of x per-tensor, as in the official QDrop/MQBench code)
        n = x.numel() if self.scheme.ch_axis is None else x.numel() // x.shape[self.scheme.ch_axis]
        return 1.0 / math.sqrt(n * self.scheme.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "off":
            return x
        if self.state == "observe":
            self.observer.update(x)
            return x
        if self._codes is not None:  # learn_step: the held codes on the learned step
            z = _bshape(x, self.scheme.ch_axis, self.zero_point.detach())
            return (self._codes.to(x.dtype) - z) * _bshape(x, self.scheme.ch_axis, self.scale.detach() * torch.exp(self.log_step))
        if self.alpha is not None or self.round_up is not None:
            out = self._adaround(x)
        else:
            return _LSQFakeQuant.apply(
                x, self.scale, self.zero_point, self.scheme.qmin, self.scheme.qmax,
                self.scheme.ch_axis, self.grad_factor(x), self._keep_mask(x),
            )
        return _select(x, out, self._keep_mask(x))

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """QDrop: which elements take their quantized value (None: all of them)."""
        if self.prob >= 1.0 or not self.training:
            return None
        return bernoulli_mask(x, self.prob)

    def extra_repr(self) -> str:
        s = self.scheme
        kind = "sym" if s.symmetric else "asym"
        gran = "per-tensor" if s.ch_axis is None else f"per-channel(axis={s.ch_axis})"
        return f"{self.role}, {s.bits}-bit {kind} [{s.qmin},{s.qmax}] {gran}, observer={s.observer}, state={self.state}"
