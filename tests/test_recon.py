"""Reconstruction: algorithms reduce the error, resume is exact, bad input is refused."""
import os

import pytest
import torch

import qdrop
from qdrop.graph import quantizers
from qdrop.models import SmallResNet
from qdrop.quant.layers import QuantLayer
from qdrop.recon import ReconstructionError, default_lambda, quant_mode, reconstruct
from qdrop.recon.engine import DiskTensor, _Cache
from qdrop.errors import UsageError


def small_setup(bits="w2a4", seed=0, n=64, a_observer=None, calib=None):
    """A small CNN (BN with statistics), n random inputs; calibrated on `calib(x)` (default x[:32])."""
    torch.manual_seed(seed)
    model = SmallResNet().eval()
    # give BN some statistics so that folding matters
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(n, 1, 28, 28)
    qmodel = qdrop.prepare(model, (x[:2],), bits=bits, a_observer=a_observer)
    qdrop.calibrate(qmodel, [x[:32] if calib is None else calib(x)])
    return model, qmodel, x


def output_error(qmodel, model, x):
    with torch.no_grad():
        return (qmodel(x) - model(x)).pow(2).sum(1).mean().item()


def int_state(qmodel):
    """Integer weights and activation step sizes: what a resumed run must reproduce."""
    out = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            out[name] = m.weight_quant.int_repr(m.layer.weight)
    for name, q in quantizers(qmodel):
        if q.role == "act":
            out[name + ".scale"] = q.scale.detach().clone()
    return out


@pytest.mark.parametrize("algo", ["adaround", "brecq", "qdrop"])
def test_reconstruction_reduces_output_error(algo):
    model, qmodel, x = small_setup()
    before = output_error(qmodel, model, x)
    report = reconstruct(qmodel, model, x, algo=algo, iters=200, batch_size=16, progress=False)
    after = output_error(qmodel, model, x)
    assert after < 0.8 * before, (before, after)
    kinds = {r["kind"] for r in report["unit_reports"]}
    assert kinds == ({"layer"} if algo == "adaround" else {"block"})
    # rounding is fixed (one bit per weight), FP weights untouched; probabilities are back to 1
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            wq = m.weight_quant
            assert wq.alpha is None and (wq.round_up is not None) == (algo != "naive")
            s = wq.scale.reshape(-1, *[1] * (m.layer.weight.dim() - 1))
            z = wq.zero_point.reshape(s.shape)
            assert torch.allclose(wq(m.layer.weight), (wq.int_repr(m.layer.weight) - z) * s, atol=1e-6)
    with quant_mode(qmodel, weights=False, acts=False), torch.no_grad():
        assert torch.allclose(qmodel(x), model(x), atol=1e-4)  # the FP model is still the original
    assert all(q.prob == 1.0 and q.state == "quant" for _, q in quantizers(qmodel))


def test_qdrop_learns_activation_steps_and_brecq_stage_two_too():
    for algo in ("qdrop", "brecq"):
        _, qmodel, x = small_setup()
        before = {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}
        reconstruct(qmodel, None, x, algo=algo, iters=50, batch_size=16, progress=False)
        after = {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}
        assert any(abs(before[n] - after[n]) > 0 for n in before), algo


def test_adaround_keeps_activation_steps():
    _, qmodel, x = small_setup()
    before = {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}
    reconstruct(qmodel, None, x, algo="adaround", iters=30, batch_size=16, progress=False)
    assert before == {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}


@pytest.mark.parametrize("algo", ["qdrop", "brecq"])
def test_killed_run_resumes_to_the_same_model(tmp_path, algo):
    _, ref_model, x = small_setup()
    reconstruct(ref_model, None, x, algo=algo, iters=30, batch_size=16, seed=3, progress=False)
    expected = int_state(ref_model)

    state = tmp_path / "state.pt"
    _, qmodel, x = small_setup()

    class Killed(Exception):
        pass

    def kill_after_third(step, name):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        reconstruct(qmodel, None, x, algo=algo, iters=30, batch_size=16, seed=3, progress=False,
                    state_path=str(state), on_unit_done=kill_after_third)
    assert state.exists()
    _, resumed, x = small_setup()  # a fresh process: prepare + calibrate again
    done = []
    reconstruct(resumed, None, x, algo=algo, iters=30, batch_size=16, seed=3, progress=False,
                state_path=str(state), on_unit_done=lambda step, name: done.append(step))
    assert done[0] == 3  # started at the first unfinished unit
    got = int_state(resumed)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_state_from_another_run_is_refused(tmp_path):
    state = tmp_path / "state.pt"
    _, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="qdrop", iters=10, batch_size=16, progress=False, state_path=str(state))
    _, qmodel, x = small_setup()
    with pytest.raises(ReconstructionError, match="different run"):
        reconstruct(qmodel, None, x, algo="qdrop", iters=11, batch_size=16, progress=False, state_path=str(state))


def test_bad_input_is_refused():
    model = SmallResNet().eval()
    x = torch.randn(40, 1, 28, 28)
    qmodel = qdrop.prepare(model, (x[:2],), bits="w4a4")
    with pytest.raises(ReconstructionError, match="not calibrated"):
        reconstruct(qmodel, None, x, iters=5, progress=False)
    qdrop.calibrate(qmodel, [x])
    with pytest.raises(ValueError, match="iters"):
        reconstruct(qmodel, None, x, iters=0, progress=False)
    with pytest.raises(ValueError, match="fewer than the batch size"):
        reconstruct(qmodel, None, x[:8], iters=5, batch_size=32, progress=False)
    with pytest.raises(ValueError, match="algorithm"):
        reconstruct(qmodel, None, x, algo="magic", iters=5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        reconstruct(qmodel, None, torch.full_like(x, float("nan")), iters=5, progress=False)
    with pytest.raises(ReconstructionError, match="memory cap"):
        reconstruct(qmodel, None, x, iters=5, batch_size=16, max_cache_bytes=1000, progress=False)


def test_nan_during_optimisation_names_unit_and_iteration():
    _, qmodel, x = small_setup()
    with torch.no_grad():
        qmodel.get_submodule("layer2.conv1").layer.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ReconstructionError, match=r"unit layer2: loss became NaN/Inf at iteration 0"):
        reconstruct(qmodel, None, x, algo="qdrop", iters=20, batch_size=16, progress=False)


def test_cache_falls_back_to_half_precision_then_disk_under_a_cap():
    cpu = torch.device("cpu")
    # 3 tensors of 100 rows x 10: 12,000 bytes in fp32, 6,000 in fp16, one batch of 10 rows 1,200 in fp32
    assert _Cache(cpu, None).tier(10 * 100) == "cpu-fp32"
    assert _Cache(cpu, max_bytes=12_000, rows=100, batch=10).tier(10 * 100) == "cpu-fp32"
    assert _Cache(cpu, max_bytes=11_999, rows=100, batch=10).tier(10 * 100) == "cpu-fp16"
    assert _Cache(cpu, max_bytes=5_999, rows=100, batch=10).tier(10 * 100) == "disk-fp16"
    assert _Cache(cpu, max_bytes=1_200, rows=100, batch=10).tier(10 * 100) == "disk-fp16"
    with pytest.raises(ReconstructionError, match="memory cap 1199 bytes is too small") as err:
        _Cache(cpu, max_bytes=1_199, rows=100, batch=10).tier(10 * 100)
    assert "\n" not in str(err.value)


def test_disk_tensor_reads_and_writes_rows(tmp_path):
    ref = torch.randn(10, 3, 4).half()
    t = DiskTensor(ref.shape, torch.float16, tmp_path)
    t[0:6] = ref[0:6].float()  # written in chunks, cast as a tensor's rows would be
    t[6:10] = ref[6:10]
    idx = torch.tensor([9, 0, 3, 3, -1])
    assert torch.equal(t[2:7], ref[2:7]) and torch.equal(t[idx], ref[idx]) and torch.equal(t[:], ref)
    assert (t.shape, t.dtype, t.device, t.numel(), len(t)) == (ref.shape, torch.float16, torch.device("cpu"), 120, 10)
    with pytest.raises(IndexError):
        t[torch.tensor([10])]
    with pytest.raises(ValueError):
        t[0:2] = ref[0:3]
    assert list(tmp_path.iterdir()) == []  # the file has no name


def _fds_under(path) -> list:
    """This process's open files under `path` (deleted or not)."""
    fd_dir = "/proc/self/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


# 3 MB: the first units' tensors in fp32, conv1's output (64 x 16x28x28: 4.8 MB for three in fp16) on disk
DISK_CAP = 3_000_000


def test_disk_cache_gives_the_same_model_as_half_precision_in_memory(tmp_path, monkeypatch):
    _, on_disk, x = small_setup()
    listed = []
    report = reconstruct(on_disk, None, x, algo="qdrop", iters=20, batch_size=16, progress=False,
                         max_cache_bytes=DISK_CAP, state_path=str(tmp_path / "state.pt"),
                         on_unit_done=lambda step, name: listed.append(sorted(p.name for p in tmp_path.iterdir())))
    assert report["cache"] == "disk-fp16"
    tiers = {r["unit"]: r["cache"] for r in report["unit_reports"]}
    assert tiers["conv1"] == "cpu-fp32" and tiers["layer1"] == "disk-fp16"
    # the most at once: layer1's inputs on disk and its FP output in memory
    assert report["cache_bytes"] == 2 * 64 * 16 * 28 * 28 * 2 + 64 * 16 * 14 * 14 * 4
    assert report["cache_memory_bytes"] <= DISK_CAP
    assert all(names == ["state.pt"] for names in listed)  # not even while it runs: the files have no name

    tier = _Cache.tier  # the same run with what goes to disk held in memory, in the same precision
    monkeypatch.setattr(_Cache, "tier", lambda self, *a: "cpu-fp16" if tier(self, *a) == "disk-fp16" else tier(self, *a))
    _, in_memory, x = small_setup()
    report = reconstruct(in_memory, None, x, algo="qdrop", iters=20, batch_size=16, progress=False,
                         max_cache_bytes=DISK_CAP)
    assert report["cache"] == "cpu-fp16"
    a, b = int_state(on_disk), int_state(in_memory)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(on_disk(x), in_memory(x))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files with /proc")
def test_disk_cache_files_are_gone_after_a_run_and_after_an_error(tmp_path):
    _, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="brecq", iters=5, batch_size=16, progress=False,
                max_cache_bytes=DISK_CAP, state_path=str(tmp_path / "state.pt"))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and _fds_under(tmp_path) == []

    class Stop(Exception):
        pass

    def stop_in_layer2(step, name):
        if name == "layer1":  # layer1's input and output, and the next quantized input, are on disk
            assert _fds_under(tmp_path)
            raise Stop

    (tmp_path / "state.pt").unlink()
    _, qmodel, x = small_setup()
    with pytest.raises(Stop) as err:
        reconstruct(qmodel, None, x, algo="qdrop", iters=5, batch_size=16, progress=False,
                    max_cache_bytes=DISK_CAP, state_path=str(tmp_path / "state.pt"), on_unit_done=stop_in_layer2)
    assert err.traceback  # (the traceback, holding the loop's frames and their tensors, is still alive)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and _fds_under(tmp_path) == []


def test_a_cap_too_small_even_for_the_disk_cache_is_one_line():
    _, qmodel, x = small_setup()
    with pytest.raises(ReconstructionError, match="memory cap 1000 bytes is too small") as err:
        reconstruct(qmodel, None, x, iters=5, batch_size=16, max_cache_bytes=1000, progress=False)
    assert "\n" not in str(err.value)


def test_default_lambda_from_structure():
    import torchvision

    def prepared(m):
        return qdrop.prepare(m.eval(), (torch.randn(1, 3, 64, 64),))

    assert default_lambda(prepared(torchvision.models.resnet18())) == 0.01
    assert default_lambda(prepared(torchvision.models.mobilenet_v2())) == 0.1
    assert default_lambda(prepared(torchvision.models.mnasnet1_0())) == 0.2


def test_quant_mode_restores_states():
    _, qmodel, x = small_setup()
    with quant_mode(qmodel, weights=False, acts=False):
        assert all(q.state == "off" for _, q in quantizers(qmodel))
    assert all(q.state == "quant" for _, q in quantizers(qmodel))


# ---- convergence options (Stage.lr_iters, warmup / b_start / b_end, hard_tail) ------------------

def _soft_fraction_probe(monkeypatch):
    """Records, for every unit, the fraction of rounding variables h(V) not yet at 0 or 1 when fixed."""
    from qdrop.quant.quantizer import Quantizer

    seen = []
    orig = Quantizer.fix_rounding

    def fix_rounding(q):
        h = q.rounding().detach()
        seen.append(((h > 0.01) & (h < 0.99)).float().mean().item())
        orig(q)

    monkeypatch.setattr(Quantizer, "fix_rounding", fix_rounding)
    return seen


def test_paper_configurations_are_unchanged():
    from dataclasses import replace

    from qdrop.recon.configs import ALGORITHMS, CANDIDATES, Stage

    for name in ("adaround", "brecq", "qdrop"):
        for s in ALGORITHMS[name].stages:
            assert (s.w_lr, s.lr_iters, s.warmup, s.b_start, s.b_end, s.hard_tail, s.learn_w_scale) == (
                1e-3, None, None, None, None, 0.0, False)
    assert [s.act_lr for s in ALGORITHMS["qdrop"].stages] == [4e-5]
    assert Stage().act_lr == 4e-5
    # qdrop-plus is qdrop with the learning rates scaled for short budgets, nothing else
    assert CANDIDATES["qdrop-plus"].units == "block"
    assert [replace(s, lr_iters=None) for s in CANDIDATES["qdrop-plus"].stages] == list(ALGORITHMS["qdrop"].stages)
    # qdrop-plus-fastround is qdrop with the rounding's rate x 16 and the step sizes' meant for 2,000 iterations
    assert [replace(s, w_lr=1e-3, act_lr_iters=None) for s in CANDIDATES["qdrop-plus-fastround"].stages] == list(
        ALGORITHMS["qdrop"].stages)
    assert [(s.w_lr, s.act_lr_iters, s.lr_iters) for s in CANDIDATES["qdrop-plus-fastround"].stages] == [
        (1.6e-2, 2000, None)]


def test_options_at_their_neutral_values_give_the_paper_result():
    from qdrop.recon import get_algorithm

    _, ref, x = small_setup()
    reconstruct(ref, None, x, algo="qdrop", iters=40, batch_size=16, progress=False)
    # lr_iters <= iters never scales the learning rates; the overrides spell out ReconConfig's warmup and beta
    for lr_iters in (40, 10):
        spelled = get_algorithm("qdrop", lr_iters=lr_iters, warmup=0.2, b_start=20.0, b_end=2.0, hard_tail=0.0)
        _, qmodel, x = small_setup()
        reconstruct(qmodel, None, x, algo=spelled, iters=40, batch_size=16, progress=False)
        a, b = int_state(ref), int_state(qmodel)
        assert all(torch.equal(a[k], b[k]) for k in a), lr_iters


@pytest.mark.slow  # issue #13's engine options; among the slowest of CI's subset, so `make test-all` runs it
def test_lr_iters_scales_the_learning_rates_and_decides_more_rounding(monkeypatch):
    from qdrop.recon import get_algorithm

    seen = _soft_fraction_probe(monkeypatch)
    _, base, x = small_setup()
    reconstruct(base, None, x, algo="qdrop", iters=40, batch_size=16, progress=False)
    soft_base, seen[:] = sum(seen) / len(seen), []
    _, scaled, x = small_setup()
    reconstruct(scaled, None, x, algo=get_algorithm("qdrop", lr_iters=4000), iters=40, batch_size=16, progress=False)
    soft_scaled = sum(seen) / len(seen)
    assert soft_scaled < 0.5 * soft_base, (soft_base, soft_scaled)  # 100x the steps: V reaches 0/1 far more often
    a, b = int_state(base), int_state(scaled)
    assert any(not torch.equal(a[k], b[k]) for k in a if not k.endswith(".scale"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".scale"))  # step sizes' lr scaled too


def test_act_lr_iters_scales_the_step_sizes_apart_from_the_rounding():
    from qdrop.recon import get_algorithm

    # at 20 iterations, lr_iters=80 is the rounding's rate x 4; act_lr_iters=20 keeps the step sizes' rate, and
    # act_lr_iters=80 with lr_iters=20 scales the step sizes' alone: each equals the rates spelled out
    cases = [(dict(lr_iters=80, act_lr_iters=20), dict(w_lr=4e-3)),
             (dict(lr_iters=20, act_lr_iters=80), dict(act_lr=1.6e-4)),
             (dict(lr_iters=80), dict(w_lr=4e-3, act_lr=1.6e-4)),
             (dict(act_lr_iters=80), dict(act_lr=1.6e-4))]  # the step sizes' budget alone (qdrop-plus-fastround)
    states = []
    for scaled, spelled in cases:
        pair = []
        for overrides in (scaled, spelled):
            _, qmodel, x = small_setup()
            reconstruct(qmodel, None, x, algo=get_algorithm("qdrop", **overrides), iters=20, batch_size=16,
                        progress=False)
            pair.append(int_state(qmodel))
        a, b = pair
        assert all(torch.equal(a[k], b[k]) for k in a), scaled
        states.append(a)
    # and the three settings are different trainings (the test could not pass with the option ignored)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(states[i][k], states[j][k]) for k in states[i]), (i, j)
    assert all(torch.equal(states[1][k], states[3][k]) for k in states[1])  # lr_iters at or below iters: no scale
    with pytest.raises(UsageError, match="act_lr_iters must be a positive integer"):
        get_algorithm("qdrop", act_lr_iters=0)


def test_warmup_and_beta_overrides_change_the_result():
    from qdrop.recon import get_algorithm

    _, ref, x = small_setup()
    reconstruct(ref, None, x, algo=get_algorithm("adaround", lr_iters=400), iters=40, batch_size=16, progress=False)
    for override in (dict(warmup=0.0), dict(b_start=4.0), dict(b_end=8.0)):
        _, qmodel, x = small_setup()
        reconstruct(qmodel, None, x, algo=get_algorithm("adaround", lr_iters=400, **override), iters=40, batch_size=16,
                    progress=False)
        a, b = int_state(ref), int_state(qmodel)
        assert any(not torch.equal(a[k], b[k]) for k in a), override


@pytest.mark.slow  # issue #13's engine options; among the slowest of CI's subset, so `make test-all` runs it
def test_hard_tail_freezes_the_rounding_and_keeps_learning_step_sizes():
    from qdrop.recon import get_algorithm

    # the whole stage hard: V never moves, so the kept rounding is round-to-nearest ...
    _, naive, x = small_setup()
    nearest = {n: m.weight_quant.int_repr(m.layer.weight) for n, m in naive.named_modules() if isinstance(m, QuantLayer)}
    for algo in ("qdrop", "adaround"):  # adaround: nothing left to learn, the loop still runs
        _, qmodel, x = small_setup()
        before = {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}
        reconstruct(qmodel, None, x, algo=get_algorithm(algo, hard_tail=1.0), iters=30, batch_size=16, progress=False)
        got = int_state(qmodel)
        assert all(torch.equal(got[n], nearest[n]) for n in nearest), algo
        after = {n: q.scale.item() for n, q in quantizers(qmodel) if q.role == "act"}
        assert (before != after) == (algo == "qdrop")  # ... while qdrop's step sizes still learn
    # a partial tail: the rounding learned in the soft part is kept, and differs from nearest
    _, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo=get_algorithm("qdrop", hard_tail=0.25, lr_iters=400), iters=40, batch_size=16,
                progress=False)
    got = int_state(qmodel)
    assert any(not torch.equal(got[n], nearest[n]) for n in nearest)


def test_cuda_graph_is_refused_without_a_gpu():
    _, qmodel, x = small_setup()
    with pytest.raises(UsageError, match="needs a CUDA device"):
        reconstruct(qmodel, None, x, iters=5, batch_size=16, progress=False, device="cpu", cuda_graph=True)


def test_cached_tensors_on_the_current_gpu_count_as_on_the_device():
    """--device cuda names no index while tensors on it say cuda:0: the CUDA-graph check must not call
    them foreign (on the first real GPU, an H200 in stop 43, it did, and every unit fell back to eager)."""
    from types import SimpleNamespace

    from qdrop.recon import engine

    def unit(where):
        t = SimpleNamespace(device=torch.device(where))
        return [t], [t], [t], [((), {})], [None]

    assert engine._why_not_graphable(*unit("cuda:0"), torch.device("cuda"), 1) is None
    assert engine._why_not_graphable(*unit("cuda:0"), torch.device("cuda:0"), 1) is None
    assert "not on the GPU" in engine._why_not_graphable(*unit("cpu"), torch.device("cuda"), 1)
    assert "not on the GPU" in engine._why_not_graphable(*unit("cuda:1"), torch.device("cuda:0"), 1)


class _FakeCuda:
    """Just enough of torch.cuda for _CudaGraphStep: capture records the step instead of running it."""

    def __init__(self):
        self.capturing, self.captures = False, 0
        fake = self

        class Graph:
            def replay(self):
                self.fn()

        class Capture:
            def __init__(self, g):
                self.g = g

            def __enter__(self):
                fake.capturing, fake.target = True, self.g
                fake.captures += 1

            def __exit__(self, *exc):
                fake.capturing = False

        class Stream:
            def wait_stream(self, other):
                pass

        self.CUDAGraph, self.graph, self.Stream = Graph, Capture, Stream
        self.current_stream = Stream
        self.stream = lambda s: __import__("contextlib").nullcontext()


def test_cuda_graph_step_runs_each_iteration_once_and_recaptures_when_the_rounding_hardens(monkeypatch):
    """The wrapper's bookkeeping, with a fake CUDA: warm-up iterations run eagerly, the capture call's
    replay is that call's iteration, later calls replay, and the hard tail gets its own graph."""
    from qdrop.recon import engine

    fake = _FakeCuda()
    monkeypatch.setattr(engine.torch, "cuda", fake)
    ran = []

    def step(g, hard):
        if fake.capturing:  # recorded, not run: a replay runs it
            fake.target.fn = lambda: ran.append((g, hard))
        else:
            ran.append((g, hard))

    graphed = engine._CudaGraphStep(step)
    calls = [(0, False)] * 10 + [(0, True)] * 6
    for g, hard in calls:
        graphed(g, hard)
    assert ran == calls and fake.captures == 2


def test_passes_over_the_calibration_set_bound_the_chunk_by_bytes(monkeypatch):
    from qdrop.recon import engine

    seen = []

    def unit(x):
        seen.append(x.shape[0])
        return x * 2

    x = torch.randn(50, 3, 8, 8)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 7 * 3 * 8 * 8 * 4)  # room for 7 rows of single-precision input
    out = engine.run_chunks(unit, x, "cpu")
    assert seen == [7] * 7 + [1] and torch.equal(out, x * 2)
    seen.clear()
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1)  # never fewer than one row
    assert torch.equal(engine.run_chunks(unit, x[:3], "cpu"), x[:3] * 2) and seen == [1, 1, 1]
