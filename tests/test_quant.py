"""Quantizers and observers: properties of the grid, LSQ gradients, AdaRound, observers."""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdrop.errors import UsageError
from qdrop.quant import QScheme, Quantizer, parse_bits, qparams_from_range
from qdrop.quant.observers import make_observer, mse_search, rows
from qdrop.quant.quantizer import GAMMA, ZETA, _fake_quant_per_tensor, bernoulli_mask

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

schemes = st.builds(
    QScheme,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    signed=st.sampled_from([None, True, False]),
    narrow_range=st.booleans(),
)


def quantizer_for(scheme, lo, hi):
    q = Quantizer(scheme)
    q.calibrate_on(torch.tensor([lo, hi]))
    return q


ranges = st.tuples(st.floats(-50, -1e-3), st.floats(1e-3, 50))
tensors = st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=64).map(torch.tensor)


@settings(max_examples=150, deadline=None)
@given(schemes, ranges, tensors)
def test_dequantized_values_lie_on_the_grid(scheme, rng, x):
    q = quantizer_for(scheme, *rng)
    code = q(x) / q.scale + q.zero_point
    assert torch.allclose(code, torch.round(code), atol=1e-3)
    assert code.min() >= scheme.qmin - 1e-3 and code.max() <= scheme.qmax + 1e-3


@settings(max_examples=150, deadline=None)
@given(schemes, ranges, tensors)
def test_quantizing_twice_changes_nothing(scheme, rng, x):
    q = quantizer_for(scheme, *rng)
    once = q(x)
    assert torch.allclose(q(once), once, atol=1e-5 * float(q.scale))


@settings(max_examples=150, deadline=None)
@given(schemes, ranges, tensors)
def test_error_at_most_half_a_step_inside_and_clipping_outside(scheme, rng, x):
    q = quantizer_for(scheme, *rng)
    s, z = float(q.scale), float(q.zero_point)
    lo, hi = (scheme.qmin - z) * s, (scheme.qmax - z) * s
    out = q(x)
    inside = (x >= lo) & (x <= hi)
    assert ((x - out).abs()[inside] <= s / 2 + 1e-5 * max(1.0, abs(hi), abs(lo))).all()
    assert torch.allclose(out[x < lo], torch.full_like(out[x < lo], lo), atol=1e-5 * abs(lo) + 1e-6)
    assert torch.allclose(out[x > hi], torch.full_like(out[x > hi], hi), atol=1e-5 * abs(hi) + 1e-6)


def test_range_includes_zero_and_symmetric_zero_point_is_zero():
    s, z = qparams_from_range(torch.tensor(0.5), torch.tensor(2.0), QScheme(bits=8))
    assert float(z) == 0.0  # range widened to include 0
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QScheme(bits=8, symmetric=True, narrow_range=True))
    assert float(z) == 0.0 and math.isclose(float(s), 3.0 / 127, rel_tol=1e-6)


@pytest.mark.parametrize("ch_axis", [None, 1])
@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_lsq_gradients_match_closed_form(ch_axis, prob):
    """d/dx: 1 inside (or dropped); d/ds: round(v)-v inside, qmin-z / qmax-z outside; d/dz: -s outside;
    parameter gradients scaled by 1/sqrt(N*qmax)."""
    torch.manual_seed(0)
    C = 16
    q = Quantizer(QScheme(bits=4, ch_axis=ch_axis), C if ch_axis else None)
    q.calibrate_on(torch.randn(8, C, 4, 4))
    q.learn_scale(zero_point=True)
    q.prob = prob
    q.train()
    x = (torch.randn(8, C, 4, 4) * 1.5).requires_grad_()
    torch.manual_seed(1)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(1)
    keep = bernoulli_mask(x, prob).bool() if prob < 1 else torch.ones_like(x, dtype=torch.bool)
    shape = [1, -1, 1, 1] if ch_axis else []
    s, z = q.scale.detach().reshape(shape), q.zero_point.detach().reshape(shape)
    v = x.detach() / s
    code = torch.round(v) + z
    inside = (code >= 0) & (code <= 15)
    dims = (0, 2, 3) if ch_axis else (0, 1, 2, 3)
    n = x.numel() if ch_axis is None else x.numel() // C
    gf = 1 / math.sqrt(n * 15)
    ds = torch.where(inside, torch.round(v) - v, code.clamp(0, 15) - z) * keep
    dz = torch.where(inside, torch.zeros_like(v), -s.expand_as(v)) * keep
    assert torch.equal(x.grad, g * (inside | ~keep))
    assert torch.allclose(q.scale.grad, (g * ds).sum(dims) * gf, atol=1e-5)
    assert torch.allclose(q.zero_point.grad, (g * dz).sum(dims) * gf, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.floats(1e-4, 10.0), st.integers(0, 2**31 - 1))
def test_cpu_fake_quant_is_bit_identical_to_the_fused_kernel(bits, symmetric, scale, seed):
    """The CPU fast path must compute exactly PyTorch's kernel, ties and clamping included."""
    g = torch.Generator().manual_seed(seed)
    scheme = QScheme(bits=bits, symmetric=symmetric)
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(0 if symmetric else int(torch.randint(scheme.qmin, scheme.qmax + 1, (), generator=g)), dtype=torch.int32)
    k = torch.randint(-3 * 2**bits, 3 * 2**bits, (2000,), generator=g).float()
    x = torch.cat([torch.randn(2000, generator=g) * scale * 2**bits, (k + 0.5) * s, k * s, s * (k + 0.5).nextafter(k)])
    xq, inside = _fake_quant_per_tensor(x, s, z, scheme.qmin, scheme.qmax)
    ref, ref_inside = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        x, s, z, torch.ones((), dtype=torch.long), scheme.qmin, scheme.qmax)
    assert torch.equal(xq, ref)
    assert torch.equal(inside.bool(), ref_inside) and inside.dtype == x.dtype


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_bernoulli_mask_has_the_probability_in_every_lane(p):
    torch.manual_seed(0)
    like = torch.empty(4 * 50_001, dtype=torch.float16)
    m = bernoulli_mask(like, p)
    assert m.shape == like.shape and m.dtype == like.dtype and set(m.unique().tolist()) <= {0.0, 1.0}
    for lane in range(4):  # each 16-bit slice of the 64-bit words, the sign-free top one included
        frac = m[lane::4].float().mean().item()
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / 50_001) + 1e-9
    assert not torch.equal(bernoulli_mask(like, 0.5), bernoulli_mask(like, 0.5))  # resampled every call


def test_drop_probability_mixes_fp_and_quantized_values_only_in_training():
    q = Quantizer(QScheme(bits=2))
    q.calibrate_on(torch.randn(1000))
    x = torch.randn(20000)
    q.prob = 0.5
    q.train()
    out = q(x)
    frac_fp = (out == x).float().mean().item()
    assert 0.45 < frac_fp < 0.55  # about half keep their FP value (2-bit grid: FP values rarely on it)
    q.eval()
    assert torch.equal(q(x), q.__class__.forward(q, x))
    assert (q(x) == x).float().mean() < 0.05


def test_states_off_and_observe_pass_through():
    q = Quantizer(QScheme(bits=3))
    x = torch.randn(100)
    assert torch.equal(q(x), x)  # starts off
    q.observe()
    assert torch.equal(q(x), x)
    q.freeze()
    assert q.state == "quant" and not torch.equal(q(x), x)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 2**31 - 1))
def test_adaround_starts_at_the_weight_and_fixes_integer_weights(bits, seed):
    torch.manual_seed(seed)
    w = torch.randn(8, 4, 3, 3)
    q = Quantizer(QScheme(bits=bits, ch_axis=0, observer="minmax"), 8, "weight")
    q.calibrate_on(w)
    q.init_adaround(w)
    s4, z4 = q.scale.reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
    representable = (w / s4 + z4 >= q.scheme.qmin) & (w / s4 + z4 <= q.scheme.qmax)
    assert representable.float().mean() > 0.75  # only zero-point rounding pushes a range end out
    assert torch.allclose(q(w)[representable], w[representable], atol=1e-4)  # soft rounding at init reproduces w
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
    q.hard_round = True
    hard = q(w).detach()
    q.hard_round = False
    q.fix_rounding()
    assert q.alpha is None and q.round_up.dtype == torch.uint8
    assert torch.equal(q(w), hard)  # the fixed decisions reproduce the hard-rounded weights
    s, z = q.scale.reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
    codes = q.int_repr(w)
    assert torch.allclose((codes - z) * s, hard, atol=1e-6)  # integer weights = what the model computes
    assert ((codes - z - torch.floor(w / s)).abs() <= 1).all()  # each is floor or ceil of w/s (or clipped)
    # a checkpoint with learned rounding loads into a fresh quantizer
    fresh = Quantizer(QScheme(bits=bits, ch_axis=0, observer="minmax"), 8, "weight")
    fresh.calibrate_on(w)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), hard)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.floats(-0.7, 0.7), st.integers(1, 2**31 - 1))
def test_learned_weight_step_keeps_its_base_and_fixes_the_codes_it_trained(bits, log_ratio, seed):
    """init_adaround(learn_scale=True): at start the same soft weight as plain AdaRound; with the step moved,
    every code is floor(w / s0) + z + h on the new step (not re-floored on it); fix_rounding keeps exactly
    the hard-rounded weights the loop ended with, as integer codes on the learned step."""
    torch.manual_seed(seed)
    w = torch.randn(8, 4, 3, 3)
    q = Quantizer(QScheme(bits=bits, ch_axis=0, observer="minmax"), 8, "weight")
    q.calibrate_on(w)
    plain = Quantizer(QScheme(bits=bits, ch_axis=0, observer="minmax"), 8, "weight")
    plain.calibrate_on(w)
    plain.init_adaround(w)
    q.init_adaround(w, learn_scale=True)
    s0, z = q.scale.detach().clone().reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(q(w), plain(w), rtol=0, atol=1e-6)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
        q.log_step.fill_(log_ratio)
    s = s0 * math.exp(log_ratio)
    hard_codes = torch.clamp(torch.floor(w / s0) + (q.alpha >= 0).float() + z, q.scheme.qmin, q.scheme.qmax)
    q.harden()
    hard = q(w).detach()
    torch.testing.assert_close(hard, (hard_codes - z) * s, rtol=1e-6, atol=1e-7)
    g = torch.autograd.grad(q(w).sum(), q.log_step)[0]
    assert (g != 0).any()  # the step size learns through the hard or soft weight
    q.hard_round = False
    q.fix_rounding()
    assert q.alpha is None and q.log_step is None and q.round_up.dtype == torch.int16
    torch.testing.assert_close(q.scale.reshape(-1, 1, 1, 1), s, rtol=1e-6, atol=0)
    assert torch.equal(q(w), hard)
    assert torch.equal(q.int_repr(w), hard_codes.long())  # the exporter's codes are the trained ones
    q.init_adaround(w)  # a later stage re-opens them as held codes: it starts exactly at the trained ones
    q.harden()
    assert torch.equal(q.int_repr(w), hard_codes.long())


def _soft_round_by_autograd(q, w):
    """AdaRound's weight and regulariser written as plain expressions (what autograd differentiates)."""
    h = torch.clamp(torch.sigmoid(q.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    s = q.scale.reshape(-1, 1) if q.scheme.ch_axis == 0 else q.scale
    z = q.zero_point.reshape(-1, 1) if q.scheme.ch_axis == 0 else q.zero_point
    base = torch.floor(w / s) if q._offset is None else torch.floor(w / s) + q._offset  # from held codes
    wq = (torch.clamp(base + h + z, q.scheme.qmin, q.scheme.qmax) - z) * s
    return wq, lambda beta: (1 - (2 * h - 1).abs().pow(beta)).sum()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.booleans(), st.floats(1.5, 20), st.booleans(), st.integers(0, 2**31 - 1),
       st.booleans())
def test_closed_form_adaround_gradients_equal_autograd(bits, per_channel, symmetric, beta, beta_tensor, seed, from_codes):
    """The fused soft-rounding weight and rounding regulariser (quantizer._SoftRoundWeight/_RoundLoss)
    give the expressions' values and autograd's gradients, clamped elements and hard V included, also
    when AdaRound starts from codes another rounding fixed (from_codes)."""
    torch.manual_seed(seed)
    w = torch.randn(16, 9, dtype=torch.float64)
    q = Quantizer(QScheme(bits=bits, ch_axis=0 if per_channel else None, symmetric=symmetric), 16, "weight").double()
    q.calibrate_on(w * 0.8)  # some weights outside the range: the code clamp is active there
    if from_codes:
        q.fix_codes(w, q.int_repr(w) + torch.randint(-2, 3, w.shape))
    q.init_adaround(w)
    assert (q._offset is not None) == from_codes
    with torch.no_grad():
        q.alpha.mul_(0.25 if from_codes else 4)  # some h clamped at 0 or 1 (from codes h starts at 0.01 / 0.99: none then)
    b = torch.tensor(beta, dtype=torch.float64) if beta_tensor else beta
    g = torch.randn(16, 9, dtype=torch.float64)
    wq = q(w)
    fused = torch.autograd.grad((wq * g).sum() + 0.3 * q.round_loss(b), q.alpha)[0]
    ref_wq, ref_loss = _soft_round_by_autograd(q, w)
    ref = torch.autograd.grad((ref_wq * g).sum() + 0.3 * ref_loss(b), q.alpha)[0]
    assert torch.equal(wq.detach(), ref_wq.detach())
    assert torch.allclose(q.round_loss(b).detach(), ref_loss(b).detach(), rtol=1e-12, atol=1e-9)
    assert torch.allclose(fused, ref, rtol=1e-9, atol=1e-12)
    assert (fused != 0).any()


def test_round_loss_is_zero_for_hard_values_and_positive_otherwise():
    q = Quantizer(QScheme(bits=4, ch_axis=0), 2, "weight")
    q.calibrate_on(torch.randn(2, 5))
    q.init_adaround(torch.randn(2, 5))
    assert q.round_loss(2.0) > 0
    with torch.no_grad():
        q.alpha.copy_(torch.sign(torch.randn_like(q.alpha)) * 100)
    assert float(q.round_loss(2.0).detach()) == 0.0


@pytest.mark.parametrize("text", ["w1a4", "w9a8", "wxa4", "w4", "4a4", "w4a1", "w4a9"])
def test_parse_bits_rejects(text):
    with pytest.raises(ValueError):
        parse_bits(text)


def test_parse_bits_accepts():
    assert parse_bits("W2A4") == (2, 4)


def test_minmax_per_channel_and_ema():
    x = torch.arange(24.0).reshape(2, 3, 4) - 5
    obs = make_observer(QScheme(bits=8, ch_axis=1, observer="minmax"))
    obs.update(x)
    lo, hi = obs.compute_range()
    r = rows(x, 1)
    assert torch.equal(lo, r.amin(1)) and torch.equal(hi, r.amax(1))
    ema = make_observer(QScheme(bits=8, observer="ema_minmax"))
    ema.update(torch.tensor([0.0, 1.0]))
    ema.update(torch.tensor([0.0, 11.0]))
    assert math.isclose(float(ema.compute_range()[1]), 0.9 * 1 + 0.1 * 11, rel_tol=1e-6)


def test_percentile_clips_outliers():
    x = torch.cat([torch.randn(100000), torch.tensor([1000.0])])
    obs = make_observer(QScheme(bits=8, observer="percentile"))
    obs.update(x)
    lo, hi = obs.compute_range()
    assert 2 < float(hi) < 10 and -10 < float(lo) < -2


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_search_never_worse_than_minmax(symmetric, bits):
    torch.manual_seed(bits)
    x = torch.cat([torch.randn(4, 500), torch.randn(4, 5) * 6], 1)  # heavy tails
    scheme = QScheme(bits=bits, symmetric=symmetric, ch_axis=0)

    def err(lo, hi):
        s, z = qparams_from_range(lo, hi, scheme)
        xq = (torch.clamp(torch.round(x / s[:, None]) + z[:, None], scheme.qmin, scheme.qmax) - z[:, None]) * s[:, None]
        return (xq - x).abs().pow(2.4).mean(1)

    lo, hi = x.amin(1), x.amax(1)
    blo, bhi = mse_search(x, lo, hi, scheme)
    assert (err(blo, bhi) <= err(lo, hi) + 1e-7).all()
    if bits <= 4:
        assert (err(blo, bhi) < err(lo, hi)).all()  # clipping the tail pays at low bits


def _kernel_lp_error(x, lo, hi, scheme, p):
    """The search's error as first written: PyTorch's fused fake-quant kernel on an expanded copy of x."""
    m, C = lo.shape
    s, z = qparams_from_range(lo, hi, scheme)
    xs = x[None].expand(m, C, x.shape[1]).reshape(m * C, -1)
    xq = torch.fake_quantize_per_channel_affine(xs, s.reshape(-1), z.reshape(-1).to(torch.int32), 0, scheme.qmin,
                                                scheme.qmax)
    return (xq - xs).abs_().pow_(p).mean(-1).reshape(m, C)


@settings(max_examples=60, deadline=None)
@given(schemes, st.integers(1, 4), st.integers(1, 6), st.integers(1, 300), st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_search_error_is_the_fake_quant_kernels_bit_for_bit(scheme, C, m, K, zeros, seed):
    """The search's broadcast arithmetic computes the very values of PyTorch's fake-quant kernel, on any grid,
    signed or not, with zero points anywhere in the grid and candidate ranges that clip or exceed the data."""
    from qdrop.quant import observers

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(C, K, generator=g) * torch.rand(C, 1, generator=g) * 5 + torch.randn(C, 1, generator=g)
    x[torch.rand(C, K, generator=g) < zeros] = 0.0
    lo = -torch.rand(m, C, generator=g) * 4 + torch.randn(m, C, generator=g)  # some lo > 0, some hi < 0
    hi = lo + torch.rand(m, C, generator=g) * 6
    # a third of the values on the first candidate's rounding ties, where x / s and x * (1 / s) part ways
    s0, z0 = qparams_from_range(lo[0], hi[0], scheme)
    ties = (torch.randint(scheme.qmin, scheme.qmax, (C, K), generator=g) - z0[:, None] + 0.5) * s0[:, None]
    x = torch.where(torch.rand(C, K, generator=g) < 0.33, ties, x)
    assert torch.equal(observers._lp_error(x, lo, hi, scheme, 2.4), _kernel_lp_error(x, lo, hi, scheme, 2.4))


@pytest.mark.skipif(not (CIFAR / "test.npz").exists(), reason="needs ../shared/data/cifar10")
@pytest.mark.shared_data
def test_search_on_real_activations_picks_the_kernels_ranges(monkeypatch):
    """Zeros left out and the broadcast arithmetic (2.5-3x faster) pick exactly the ranges the kernel-based
    search over every value picks, on ResNet-20's real post-ReLU (half zeros) and pre-ReLU activations."""
    from qdrop.data import load_split
    from qdrop.models import load_model
    from qdrop.quant import observers

    model, _ = load_model("cifar10_resnet20", data=CIFAR.parent)
    x = load_split("cifar10", "calib", data=CIFAR.parent, limit=32).x
    acts = []
    for block in (model.layer1[0], model.layer2[1], model.layer3[2]):  # block outputs, and their signed bn2 outputs
        for mod in (block, block.bn2):
            mod.register_forward_hook(lambda mod, i, o: acts.append(o))
    with torch.no_grad():
        model(x)
    fast = {}
    for j, a in enumerate(acts):
        r = rows(a, None)[:, :: max(1, a.numel() // 40000)]
        if j % 2 == 1:  # hooks run inner first: bn2 (signed), then the block (post-ReLU, many exact zeros)
            assert (r == 0).float().mean() > 0.3
        else:
            assert r.min() < 0
        for scheme in (QScheme(bits=4), QScheme(bits=3, symmetric=True, signed=True), QScheme(bits=8)):
            fast[j, scheme.bits] = (r, scheme, mse_search(r, r.amin(1), r.amax(1), scheme))
    monkeypatch.setattr(observers, "_lp_error", _kernel_lp_error)
    monkeypatch.setattr(observers, "_without_zeros", lambda r: r)
    for r, scheme, (lo, hi) in fast.values():
        ref_lo, ref_hi = mse_search(r, r.amin(1), r.amax(1), scheme)
        assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@pytest.mark.parametrize("observer", ["mse", "percentile"])
def test_weight_ranges_search_every_value_of_every_row(observer):
    """A weight is observed whole: 1,280 rows of 320 (EfficientNet-Lite0's head conv) used to
    keep 51 sampled values per row, so a row's range came from a sixth of its values."""
    from qdrop.quant import Quantizer

    torch.manual_seed(0)
    w = torch.randn(1280, 320, 1, 1) * torch.rand(1280, 1, 1, 1)
    w[:, 7] *= 8  # an outlier in every row that sampling would usually miss
    scheme = QScheme(bits=4, ch_axis=0, observer=observer)
    q = Quantizer(scheme, num_channels=1280, role="weight")
    q.calibrate_on(w)
    r = rows(w, 0)
    if observer == "mse":
        lo, hi = mse_search(r, r.amin(1), r.amax(1), scheme)
    else:
        lo, hi = torch.quantile(r, 1 - 0.9999, dim=1), torch.quantile(r, 0.9999, dim=1)
    s, z = qparams_from_range(lo, hi, scheme)
    torch.testing.assert_close(q.scale.detach().reshape(-1), s.reshape(-1))
    torch.testing.assert_close(q.zero_point.detach().reshape(-1), z.reshape(-1).to(q.zero_point.dtype))


# ---- GPTQ ----------------------------------------------------------------------------------
def _weight_quantizer(w, bits, symmetric=False):
    q = Quantizer(QScheme(bits=bits, ch_axis=0, symmetric=symmetric, observer="minmax"), w.shape[0], "weight")
    q.calibrate_on(w)
    return q


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_gptq_with_uncorrelated_inputs_is_nearest_rounding(bits, symmetric, act_order, seed):
    """A diagonal H (inputs that never co-vary; some never seen at all) gives no column another's error
    to absorb: GPTQ's codes are nearest rounding's, in any column order."""
    from qdrop.quant.gptq import gptq_codes

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 20, generator=g) * torch.rand(12, 1, generator=g) * 3
    diag = torch.rand(20, generator=g) * 10
    diag[torch.rand(20, generator=g) < 0.2] = 0  # dead inputs
    q = _weight_quantizer(w, bits, symmetric)
    codes = gptq_codes(w, torch.diag(diag), q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax, act_order=act_order, block=7)
    assert torch.equal(codes, q.int_repr(w))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_gptq_fits_correlated_inputs_better_than_nearest(bits, seed):
    """With correlated inputs X (H = XᵀX) GPTQ's codes leave a smaller output error ||X (W - Ŵ)ᵀ||² than
    nearest rounding's on the same grid, and the codes stay on the grid."""
    from qdrop.quant.gptq import gptq_codes

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 16, generator=g) @ torch.randn(16, 48, generator=g) + 0.1 * torch.randn(2000, 48, generator=g)
    w = torch.randn(32, 48, generator=g)
    q = _weight_quantizer(w, bits)
    s, z = q.scale.reshape(-1, 1), q.zero_point.reshape(-1, 1)
    codes = gptq_codes(w, x.T @ x, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax, block=16)
    assert codes.min() >= q.scheme.qmin and codes.max() <= q.scheme.qmax
    err_gptq = (x @ (w - (codes - z) * s).T).pow(2).sum()
    err_nearest = (x @ (w - q(w)).T).pow(2).sum()
    assert err_gptq < 0.7 * err_nearest, (float(err_gptq), float(err_nearest))
    assert ((codes - q.int_repr(w)).abs() > 1).any()  # codes further than one step from nearest do occur


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.booleans(), st.integers(0, 2**31 - 1))
def test_gptq_search_lowers_every_rows_output_error_and_keeps_its_grid(bits, symmetric, seed):
    """gptq_search: each row's output error ‖X(w_i − ŵ_i)‖², measured here from X itself, is at most what GPTQ
    gives on the observer's grid alone (1.0 is a candidate and rows are independent), the row's step is the
    observer's times one of the factors, its zero point is kept, and factors=(1.0,) is plain gptq_codes."""
    from qdrop.quant.gptq import SEARCH_FACTORS, gptq_codes, gptq_search

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 8, generator=g) @ torch.randn(8, 24, generator=g) + 0.2 * torch.randn(600, 24, generator=g)
    w = torch.randn(10, 24, generator=g) * torch.rand(10, 1, generator=g) * 2
    w[0, 3] = 6.0  # an outlier: a row that may prefer a clipped grid
    q = _weight_quantizer(w, bits, symmetric)
    h = x.T @ x
    z = q.zero_point.reshape(-1, 1)
    base = gptq_codes(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax)
    scale, codes = gptq_search(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax)
    assert codes.min() >= q.scheme.qmin and codes.max() <= q.scheme.qmax

    def row_err(c, s):
        return (x.double() @ (w - (c - z) * s.reshape(-1, 1)).double().T).pow(2).sum(0)
    assert (row_err(codes, scale) <= row_err(base, q.scale) * (1 + 1e-9) + 1e-9).all()
    ratio = scale / q.scale
    assert all(min(abs(float(r) - f) for f in SEARCH_FACTORS) < 1e-5 for r in ratio)
    only_one = gptq_search(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax, factors=(1.0,))
    assert torch.equal(only_one[1], base) and torch.equal(only_one[0], q.scale.reshape(-1))
    with pytest.raises(ValueError, match="positive step-size factors"):
        gptq_search(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax, factors=(0.0, 1.0))


def test_gptq_search_chooses_a_clipped_grid_for_a_row_with_an_outlier():
    """A row whose range one large weight sets (and whose input is rare) wastes most of its grid: the search takes
    a finer step for it and lowers its output error, while the other rows' errors do not rise."""
    from qdrop.quant.gptq import gptq_codes, gptq_search

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g)
    x[:, 0] *= 0.01  # the outlier weight multiplies an input that is almost always near 0
    w = torch.randn(4, 32, generator=g)
    w[0, 0] = 12.0
    q = _weight_quantizer(w, 4)
    h = x.T @ x
    z = q.zero_point.reshape(-1, 1)
    scale, codes = gptq_search(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax)
    base = gptq_codes(w, h, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax)
    err = lambda c, s: (x.double() @ (w - (c - z) * s.reshape(-1, 1)).double().T).pow(2).sum(0)
    assert scale[0] < q.scale[0] * 0.99
    assert err(codes, scale)[0] < 0.9 * err(base, q.scale)[0]


def test_fixed_codes_quantize_the_weight_reload_and_start_adaround():
    """Quantizer.fix_codes: the quantizer's weight is (codes - z) s, its integer weights are the codes
    (what the export writes), a checkpoint reloads them, the FP weight is untouched, and AdaRound starts
    from them: its hard decisions at the start are the codes, and V's other choice is each code's
    neighbour towards w."""
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    before = w.clone()
    q = _weight_quantizer(w, 4)
    codes = torch.clamp(q.int_repr(w) + torch.randint(-3, 4, w.shape), q.scheme.qmin, q.scheme.qmax)
    q.fix_codes(w, codes)
    s, z = q.scale.reshape(-1, 1), q.zero_point.reshape(-1, 1)
    assert torch.equal(q.int_repr(w), codes)
    torch.testing.assert_close(q(w), (codes - z) * s, rtol=0, atol=1e-6)
    assert torch.equal(w, before)
    fresh = _weight_quantizer(w, 4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.int_repr(w), codes)
    q.init_adaround(w)
    q.harden()
    assert torch.equal(q.int_repr(w), codes)
    torch.testing.assert_close(q(w), (codes - z) * s, rtol=0, atol=1e-6)
    with torch.no_grad():
        q.alpha.neg_()  # every decision the other way: one step towards the weight (up where the code lies at or below w)
    towards = torch.clamp(codes + torch.where((codes - z) * s > w, -1, 1), q.scheme.qmin, q.scheme.qmax)
    assert torch.equal(q.int_repr(w), towards)
    q.fix_rounding()  # kept as fixed codes again, as fix_codes keeps them
    assert q.alpha is None and q.round_up.dtype == torch.int16
    assert torch.equal(q.int_repr(w), towards)
    with pytest.raises(UsageError, match="learned weight step size"):
        q.init_adaround(w, learn_scale=True)


def test_scheme_rejects_bits():
    with pytest.raises(ValueError):
        QScheme(bits=1)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_learned_steps_keep_the_codes_and_fix_to_the_model_they_learned(bits, symmetric, held, seed):
    """Quantizer.learn_step: at the start the weight is the quantizer's (nearest or held codes), with any log_step
    it is (c - z) s exp(log_step) with the same integers c, a gradient reaches log_step, and fix_step keeps that
    weight and those codes (the export's integers) with the learned step as the scale; the FP weight is untouched."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 12, generator=g) * torch.rand(7, 1, generator=g) * 3
    before = w.clone()
    q = _weight_quantizer(w, bits, symmetric)
    if held:  # codes another rounding chose (GPTQ's may lie steps from w)
        q.fix_codes(w, torch.clamp(q.int_repr(w) + torch.randint(-2, 3, w.shape, generator=g), q.scheme.qmin, q.scheme.qmax))
    codes, start = q.int_repr(w), q(w).detach()
    q.learn_step(w)
    torch.testing.assert_close(q(w), start, rtol=0, atol=1e-6)
    u = torch.randn(q.scale.shape, generator=g) * 0.2
    with torch.no_grad():
        q.log_step.copy_(u)
    z, s = q.zero_point.reshape(-1, 1), q.scale.detach().clone().reshape(-1, 1)
    learned = q(w)
    torch.testing.assert_close(learned, (codes - z) * s * torch.exp(u).reshape(-1, 1), rtol=1e-6, atol=1e-7)
    learned.pow(2).sum().backward()
    assert q.log_step.grad is not None and q.log_step.grad.abs().sum() > 0
    q.fix_step()
    assert q.log_step is None and q.round_up.dtype == torch.int16
    assert torch.equal(q.int_repr(w), codes) and torch.equal(w, before)
    torch.testing.assert_close(q(w), learned.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.scale, (s * torch.exp(u).reshape(-1, 1)).reshape(-1), rtol=1e-6, atol=0)


def test_learn_step_needs_a_calibrated_quantizer_with_its_rounding_decided():
    w = torch.randn(4, 8)
    with pytest.raises(UsageError, match="learn_step needs a calibrated weight quantizer"):
        Quantizer(QScheme(bits=4, ch_axis=0), 4, "weight").learn_step(w)
    q = _weight_quantizer(w, 4)
    q.init_adaround(w)
    with pytest.raises(UsageError, match="rounding decided"):
        q.learn_step(w)
    q = _weight_quantizer(w, 4)
    with pytest.raises(UsageError, match="call learn_step first"):
        q.fix_step()
    q.learn_step(w)
    with pytest.raises(UsageError, match="no step already being learned"):
        q.learn_step(w)
    with pytest.raises(UsageError, match="end it with fix_step first"):
        q.fix_codes(w, q.int_repr(w))
    with pytest.raises(UsageError, match="end it with fix_step first"):
        q.init_adaround(w)
    start, codes = q.scale.detach().clone(), q.int_repr(w)
    with torch.no_grad():
        q.log_step[0] = float("nan")  # a diverged step keeps its starting value; the others are learned
        q.log_step[1:] = 0.1
    q.fix_step()
    assert q.scale[0] == start[0] and torch.allclose(q.scale[1:], start[1:] * math.exp(0.1))
    assert torch.equal(q.int_repr(w), codes)
    act = Quantizer(QScheme(bits=8), role="act")
    act.calibrate_on(torch.randn(100))
    with pytest.raises(UsageError, match="learn_step needs a calibrated weight quantizer"):
        act.learn_step(torch.randn(100))
