"""The published improvements on QDrop as engine options (issue #13): the Fisher-weighted and
prediction-difference objectives, and the network-wise refinement stage."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qdrop
from qdrop.graph import quantizers
from qdrop.quant.layers import QuantLayer
from qdrop.recon import quant_mode, reconstruct
from qdrop.recon import engine
from qdrop.recon.configs import CANDIDATES, Stage, get_algorithm
from qdrop.errors import UsageError

from test_recon import int_state, output_error, small_setup


def test_each_tail_completes_the_fp_model():
    """tail_fn(k) after blocks 0..k is the model: what the prediction-based objectives look through."""
    model, qmodel, x = small_setup()
    part = engine.GraphPartition(qmodel)
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        want = model(x[:8])
        y = x[:8]
        for k in range(len(part.blocks)):
            y = part.block_fn(k)(y)
            tail = part.tail_fn(k)
            got = y if tail is None else tail(y)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        whole = part.network()
        torch.testing.assert_close(whole.block_fn(0)(x[:8]), want, rtol=1e-4, atol=1e-4)
    assert set(whole.blocks[0].layers) == {n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


@pytest.mark.parametrize("algo", ["qdrop-fisher", "qdrop-pd", "qdrop-net"])
def test_components_reduce_the_error_and_end_with_fixed_rounding(algo):
    model, qmodel, x = small_setup()
    before = output_error(qmodel, model, x)
    report = reconstruct(qmodel, model, x, algo=algo, iters=100, batch_size=16, progress=False)
    assert output_error(qmodel, model, x) < 0.8 * before
    units = [r["unit"] for r in report["unit_reports"]]
    assert (units[-1] == "network") == (algo == "qdrop-net")
    assert all(m.weight_quant.alpha is None and m.weight_quant.round_up is not None
               for m in qmodel.modules() if isinstance(m, QuantLayer))
    assert all(q.prob == 1.0 and q.state == "quant" for _, q in quantizers(qmodel))


def test_prediction_objectives_run_the_rest_of_the_network_fp(monkeypatch):
    """While block k learns against the prediction, the blocks after it are off (the FP rest); the block
    itself and those before it quantize as usual (a layer's bias rounding reads the previous output's quantizer)."""
    seen = []
    real = engine._optimize
    blocks = engine.GraphPartition(small_setup()[1]).blocks
    names = [b.name for b in blocks]

    def owner(qmodel, name):
        return next(i for i, b in enumerate(blocks) if name in b.act_quants or any(name.startswith(t + ".") for t in b.layers))

    def spy(qmodel, unit, *args, **kwargs):
        k = names.index(unit.name)
        states = {n: (owner(qmodel, n), q.state) for n, q in quantizers(qmodel) if q.calibrated}
        seen.append((k, {s for j, s in states.values() if j <= k}, {s for j, s in states.values() if j > k},
                     kwargs.get("tail") is not None))
        return real(qmodel, unit, *args, **kwargs)

    monkeypatch.setattr(engine, "_optimize", spy)
    _, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="qdrop-pd", iters=5, batch_size=16, progress=False)
    assert [k for k, *_ in seen] == list(range(len(blocks)))
    for k, upto, after, has_tail in seen:
        assert upto == {"quant"}, k
        assert has_tail == (k < len(blocks) - 1) and after <= {"off"}, k
    assert seen[0][2] == {"off"}


def test_fisher_weights_are_the_kl_gradient():
    model, qmodel, x = small_setup()
    part = engine.GraphPartition(qmodel)
    cache = engine._Cache(torch.device("cpu"), None)
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        logits = model(x)
        y1 = part.block_fn(0)(x)
    with quant_mode(qmodel, weights=True, acts=True):
        (w,) = engine._fisher_weights(part.block_fn(1), part.tail_fn(1), [y1], [logits], [((), {})], "cpu", cache, 16)
        y = part.block_fn(1)(y1[:4]).detach().requires_grad_(True)
        with torch.enable_grad():
            kl = torch.nn.functional.kl_div(torch.log_softmax(part.tail_fn(1)(y), 1), torch.softmax(logits[:4], 1),
                                            reduction="sum") / 16
            (g,) = torch.autograd.grad(kl, y)
    assert w.shape == y1.shape[:1] + y.shape[1:] and (w >= 0).all() and w.abs().max() > 0
    torch.testing.assert_close(w[:4], g.abs(), rtol=1e-4, atol=1e-9)  # (the loop weights the error by 1 + w)


def test_reopened_rounding_starts_at_the_kept_decisions():
    _, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="qdrop", iters=20, batch_size=16, progress=False)
    layer = next(m for m in qmodel.modules() if isinstance(m, QuantLayer))
    wq, w = layer.weight_quant, layer.layer.weight
    kept, decisions = wq(w).detach(), wq.round_up.clone()
    wq.init_adaround(w)
    h = wq.rounding().detach()
    assert torch.allclose(h, 0.01 + 0.98 * decisions.float(), atol=1e-4)
    s = wq.scale.reshape(-1, *[1] * (w.dim() - 1))
    assert ((wq(w) - kept).abs() <= 0.011 * s).all()
    wq.round_loss(2.0).backward()
    assert wq.alpha.grad.abs().min() > 0  # off the clamp: every V can move


def test_killed_network_refinement_resumes_to_the_same_model(tmp_path):
    _, ref, x = small_setup()
    reconstruct(ref, None, x, algo="qdrop-net", iters=20, batch_size=16, seed=3, progress=False)
    state = tmp_path / "state.pt"
    _, qmodel, x = small_setup()

    class Killed(Exception):
        pass

    def kill(step, name):
        if name == "fc":  # the last block-wise unit: the network stage is next
            raise Killed

    with pytest.raises(Killed):
        reconstruct(qmodel, None, x, algo="qdrop-net", iters=20, batch_size=16, seed=3, progress=False,
                    state_path=str(state), on_unit_done=kill)
    _, resumed, x = small_setup()
    done = []
    reconstruct(resumed, None, x, algo="qdrop-net", iters=20, batch_size=16, seed=3, progress=False,
                state_path=str(state), on_unit_done=lambda step, name: done.append(name))
    assert done == ["network"]
    a, b = int_state(ref), int_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folded_bn_statistics_recover_the_bn_input():
    """What folding keeps (beta, |gamma|, sqrt(var + eps)) maps the folded layer's output back to the BN's
    input exactly as the distribution correction reads it: z = (y - beta) * std / |gamma| + running_mean
    for gamma > 0 (folding multiplies by gamma / std)."""
    model, qmodel, x = small_setup()
    with torch.no_grad():
        for m in model.modules():  # gammas of both signs and a dead channel
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.weight[0] = 0.0
    qmodel = __import__("qdrop").prepare(model, (x[:2],), bits="w4a4")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {}
    hooks = [bn.register_forward_hook(lambda m, a, y: seen.__setitem__(m, a[0])) for bn in bns]
    convs = [m for m in qmodel.modules() if isinstance(m, QuantLayer) and hasattr(m.layer, "bn_output")]
    outs = []
    hooks += [c.register_forward_hook(lambda m, a, y: outs.append(y)) for c in convs]
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        model(x[:4])
        qmodel(x[:4])
    for h in hooks:
        h.remove()
    assert len(convs) == len(bns) and len(outs) == len(bns)
    for bn, conv, y in zip(bns, convs, outs):  # (both in the order the network runs them)
        beta, gamma, std = conv.layer.bn_output
        z = seen[bn]
        sign = torch.sign(bn.weight).reshape(1, -1, 1, 1)
        live = (gamma > 0).reshape(1, -1, 1, 1).expand_as(z)
        want = (z - bn.running_mean.reshape(1, -1, 1, 1)) * sign  # |gamma| un-scales; the sign stays
        got = (y - beta.reshape(1, -1, 1, 1)) * (std / gamma.clamp(min=1e-12)).reshape(1, -1, 1, 1)
        torch.testing.assert_close(got[live], want[live], rtol=1e-4, atol=1e-4)


def test_distribution_correction_moves_inputs_towards_the_bn_statistics():
    model, qmodel, x = small_setup()
    part = engine.GraphPartition(qmodel)
    with quant_mode(qmodel, weights=False, acts=False):
        xs, _ = part.start(x, "cpu")
    k = next(k for k, b in enumerate(part.blocks) if any(hasattr(qmodel.get_submodule(t).layer, "bn_output")
                                                          for t in b.layers))
    x_k = [part.block_fn(j) for j in range(k)]
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        h = xs[0]
        for f in x_k:
            h = f(h)
    cache = engine._Cache(torch.device("cpu"), None)
    free, r_free = engine._correct_distribution(qmodel, part.blocks[k], part.block_fn(k), [h],
                                                Stage(dc_iters=60, dc_lr=1e-2, dc_reg=1.0), "cpu", cache, 16)
    held, r_held = engine._correct_distribution(qmodel, part.blocks[k], part.block_fn(k), [h],
                                                Stage(dc_iters=60, dc_lr=1e-2, dc_reg=1e4), "cpu", cache, 16)
    assert r_free["batches"] == 4 and r_free["stat_loss_last"] < 0.8 * r_free["stat_loss_first"]
    assert r_free["input_change"] > 10 * r_held["input_change"]  # the constraint keeps the inputs in place
    assert free[0].shape == h.shape and not torch.equal(free[0], h)
    assert all(p.grad is None for p in qmodel.parameters())  # the unit's parameters are not touched


def test_distribution_correction_reconstructs_and_reports():
    model, qmodel, x = small_setup()
    before = output_error(qmodel, model, x)
    report = reconstruct(qmodel, model, x, algo=get_algorithm("qdrop-pdquant", dc_iters=20), iters=100, batch_size=16,
                         progress=False)
    assert output_error(qmodel, model, x) < 0.8 * before
    dc = [r["distribution_correction"] for r in report["unit_reports"] if "distribution_correction" in r]
    assert dc and all(d["stat_loss_last"] <= d["stat_loss_first"] for d in dc)


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="dc_iters"):
        Stage(dc_iters=-1)
    with pytest.raises(UsageError, match="loss"):
        Stage(loss="l1")
    _, no_bn, x = small_setup()
    for m in no_bn.modules():  # as a network without BatchNorm would be
        if isinstance(m, QuantLayer) and hasattr(m.layer, "bn_output"):
            del m.layer.bn_output
    with pytest.raises(UsageError, match="has none"):  # nothing to correct: refused, not silently plain qdrop
        reconstruct(no_bn, None, x, algo="qdrop-dc", iters=5, batch_size=16, progress=False)
    with pytest.raises(UsageError, match="scope"):
        Stage(scope="layer")
    _, qmodel, x = small_setup()
    layer_fisher = get_algorithm("adaround", loss="fisher")
    with pytest.raises(UsageError, match="block units"):
        reconstruct(qmodel, None, x, algo=layer_fisher, iters=5, batch_size=16, progress=False)


def test_candidates_are_qdrop_plus_one_component():
    from dataclasses import replace

    qdrop = get_algorithm("qdrop").stages[0]
    assert CANDIDATES["qdrop-fisher"].stages == (replace(qdrop, loss="fisher"),)
    assert CANDIDATES["qdrop-pd"].stages == (replace(qdrop, loss="pd"),)
    assert CANDIDATES["qdrop-dc"].stages == (replace(qdrop, dc_iters=500),)
    assert CANDIDATES["qdrop-pdquant"].stages == (replace(qdrop, loss="pd", dc_iters=500),)
    assert CANDIDATES["qdrop-ws"].stages == (replace(qdrop, learn_w_scale=True),)
    first, refine = CANDIDATES["qdrop-net"].stages
    assert first == qdrop and refine.scope == "network"


def test_mrecg_merges_the_adjacent_blocks_of_largest_capacity_drop():
    model, qmodel, x = small_setup()
    part = engine.GraphPartition(qmodel)
    caps = [sum(qmodel.get_submodule(t).layer.weight.numel() * qmodel.get_submodule(t).weight_quant.scheme.bits
                for t in u.layers) for u in part.blocks]
    drops = [(caps[k] - caps[k + 1], k) for k in range(len(caps) - 1) if caps[k] > caps[k + 1]]
    assert drops  # (SmallResNet: the last block holds more bits than the classifier)
    k = max(drops)[1]
    merged = part.merged(1)
    names = [u.name for u in merged.blocks]
    assert len(names) == len(part.blocks) - 1 and f"{part.blocks[k].name}+{part.blocks[k + 1].name}" in names
    assert part.merged(0).blocks == part.blocks
    # the chain still computes the model
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        y = x[:4]
        for j in range(len(merged.blocks)):
            y = merged.block_fn(j)(y)
        torch.testing.assert_close(y, model(x[:4]), rtol=1e-4, atol=1e-4)
    report = reconstruct(qmodel, None, x, algo="qdrop-mrecg", iters=10, batch_size=16, progress=False)
    assert [r["unit"] for r in report["unit_reports"]] == [u.name for u in part.merged(2).blocks]


def test_only_learned_parameters_get_gradients_and_flips_are_reported():
    _, qmodel, x = small_setup()
    report = reconstruct(qmodel, None, x, algo="qdrop-net", iters=20, batch_size=16, progress=False)
    weights = [m.layer.weight for m in qmodel.modules() if isinstance(m, QuantLayer)]
    assert all(w.grad is None and w.requires_grad for w in weights)  # the FP rest ran without weight gradients
    net = report["unit_reports"][-1]
    assert net["reopened"] == sum(w.numel() for w in weights) and 0 <= net["flipped"] <= net["reopened"]
    assert "flipped" not in report["unit_reports"][0]


def test_fisher_weights_survive_a_half_precision_cache():
    """|dKL/dy| is ~1e-6 here: cached as 1 + |g| in half precision it would be all ones."""
    model, qmodel, x = small_setup()
    part = engine.GraphPartition(qmodel)
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        logits = model(x)
        y1 = part.block_fn(0)(x)
        n = part.block_fn(1)(y1).numel()
    args = (part.block_fn(1), part.tail_fn(1), [y1], [logits], [((), {})], "cpu")
    with quant_mode(qmodel, weights=True, acts=True):
        (w32,) = engine._fisher_weights(*args, engine._Cache(torch.device("cpu"), None), 16)
        half = engine._Cache(torch.device("cpu"), max_bytes=3 * n * 3)  # fp32 does not fit, fp16 does
        (w16,) = engine._fisher_weights(*args, half, 16)
    assert w32.dtype == torch.float32 and w16.dtype == torch.float16
    assert w32.max() < 1e-3  # (so small that 1 + |g| rounds to 1 in half precision)
    assert ((w16.float() - w32).abs() <= 1e-3 * w32 + 6e-8).all()


def test_state_files_of_earlier_runs_still_match():
    """Stage fields added later are recorded only when set: a plain qdrop run's recorded stages are the
    fields it had before they existed."""
    meta = engine._stage_meta(get_algorithm("qdrop").stages[0])
    assert not {"loss", "pd_reg", "pd_temp", "scope", "dc_iters", "dc_lr", "dc_reg", "act_lr_iters"} & set(meta)
    assert engine._stage_meta(CANDIDATES["qdrop-pd"].stages[0])["loss"] == "pd"
    assert engine._stage_meta(CANDIDATES["qdrop-plus-fastround"].stages[0])["act_lr_iters"] == 2000


def test_learned_weight_steps_recover_a_bad_grid_and_keep_their_codes():
    """qdrop-ws (Stage.learn_w_scale): with every weight step 1.6x too wide, learning the steps with the rounding
    ends closer to the FP model than qdrop on the same grid; each layer keeps its learned step and fixed codes."""
    errors = {}
    for algo in ("qdrop", "qdrop-ws"):
        model, qmodel, x = small_setup()
        layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
        for m in layers:
            with torch.no_grad():
                m.weight_quant.scale.mul_(1.6)
        wide = [m.weight_quant.scale.detach().clone() for m in layers]
        reconstruct(qmodel, model, x, algo=algo, iters=100, batch_size=16, progress=False)
        errors[algo] = output_error(qmodel, model, x)
        moved = [not torch.equal(m.weight_quant.scale.detach(), s) for m, s in zip(layers, wide)]
        assert all(moved) == (algo == "qdrop-ws") and any(moved) == (algo == "qdrop-ws")
        assert all(m.weight_quant.alpha is None and m.weight_quant.log_step is None for m in layers)
    assert errors["qdrop-ws"] < 0.95 * errors["qdrop"]


def _prediction_kl(qmodel, model, x):
    with torch.no_grad():
        return torch.nn.functional.kl_div(torch.log_softmax(qmodel(x), 1), torch.log_softmax(model(x), 1),
                                          reduction="batchmean", log_target=True).item()


def test_e2e_steps_keep_the_codes_and_lower_the_prediction_error():
    """configs.E2E_STEPS after a block-wise stage: the weights' integer codes stay as that stage chose them, their
    step sizes and the activation step sizes move, and the network's KL from the FP prediction falls."""
    from dataclasses import replace
    from qdrop.recon.configs import E2E_STEPS, Algorithm

    assert CANDIDATES["qdrop-plus-e2e"].stages == (*CANDIDATES["qdrop-plus-fastround"].stages, E2E_STEPS)
    assert CANDIDATES["qdrop-e2e"].stages == (*get_algorithm("qdrop").stages, E2E_STEPS)
    from qdrop.recon.configs import RESEARCH_ALGOS, VISION_ALGOS
    assert "qdrop-plus-e2e" in VISION_ALGOS and RESEARCH_ALGOS.count("qdrop-plus-e2e") == 1  # shipped, listed once
    model, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="qdrop", iters=30, batch_size=16, progress=False)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    codes = {n: m.weight_quant.int_repr(m.layer.weight) for n, m in layers.items()}
    w_steps = {n: m.weight_quant.scale.detach().clone() for n, m in layers.items()}
    a_steps = {n: q.scale.detach().clone() for n, q in quantizers(qmodel) if q.role == "act" and q.state == "quant"}
    before = _prediction_kl(qmodel, model, x)
    e2e = Algorithm("e2e", "block", (replace(E2E_STEPS, iters_scale=1.0),))
    report = reconstruct(qmodel, model, x, algo=e2e, iters=150, batch_size=16, progress=False)
    assert [r["unit"] for r in report["unit_reports"]] == ["network"]
    assert _prediction_kl(qmodel, model, x) < 0.8 * before
    for n, m in layers.items():
        wq = m.weight_quant
        assert wq.log_step is None and wq.alpha is None
        assert torch.equal(wq.int_repr(m.layer.weight), codes[n]), n  # the codes held, as the export writes them
    assert any(not torch.equal(m.weight_quant.scale, w_steps[n]) for n, m in layers.items())
    assert any(not torch.equal(q.scale, a_steps[n]) for n, q in quantizers(qmodel) if n in a_steps)
    assert all(q.prob == 1.0 and q.state == "quant" and not q.scale.requires_grad for _, q in quantizers(qmodel))
    assert all(m.layer.weight.requires_grad for m in layers.values())  # the FP weights the stage froze, restored
    # the stage's rates are never scaled by a budget given to every stage (--lr-iters)
    assert get_algorithm("qdrop-plus-e2e", lr_iters=8000).stages[1].act_lr_iters == 1


def _interrupt_adam_step(monkeypatch, n: int) -> None:
    """Make the n-th Adam step from now on (counted over every optimizer) raise KeyboardInterrupt, as a kill would."""
    calls = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_e2e_steps_stopped_midway_leave_every_weight_on_its_codes(monkeypatch):
    """An interrupted end-to-end stage (here the 10th optimizer step raises) still ends with every weight
    quantizer on its held codes and the steps learned so far: no quantizer is left learning."""
    from dataclasses import replace
    from qdrop.recon.configs import E2E_STEPS, Algorithm

    model, qmodel, x = small_setup()
    reconstruct(qmodel, None, x, algo="qdrop", iters=20, batch_size=16, progress=False)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
    codes = [m.weight_quant.int_repr(m.layer.weight) for m in layers]
    _interrupt_adam_step(monkeypatch, 10)
    e2e = Algorithm("e2e", "block", (replace(E2E_STEPS, iters_scale=1.0),))
    with pytest.raises(KeyboardInterrupt):
        reconstruct(qmodel, None, x, algo=e2e, iters=50, batch_size=16, progress=False)
    for m, c in zip(layers, codes):
        assert m.weight_quant.log_step is None and m.weight_quant._codes is None
        assert torch.equal(m.weight_quant.int_repr(m.layer.weight), c)
    assert all(not q.scale.requires_grad and q.prob == 1.0 and not q.training for _, q in quantizers(qmodel))
    assert all(m.layer.weight.requires_grad for m in layers)


def test_a_run_killed_in_its_e2e_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """qdrop-plus-e2e killed halfway through its network-scope stage: rerun with the same state file, it redoes
    that stage from the block-wise result and ends where an uninterrupted run ends."""
    from test_recon import int_state

    _, full, x = small_setup()
    reconstruct(full, None, x, algo="qdrop-plus-e2e", iters=24, batch_size=16, progress=False)
    _, qmodel, x = small_setup()
    n_block_steps = 24 * len(engine.GraphPartition(qmodel).blocks)
    state = tmp_path / "state.pt"
    _interrupt_adam_step(monkeypatch, n_block_steps + 3)  # the network stage's third step (6 in all)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(qmodel, None, x, algo="qdrop-plus-e2e", iters=24, batch_size=16, progress=False, state_path=str(state))
    monkeypatch.undo()
    assert engine._load_state(str(state), "cpu")["done"] == len(engine.GraphPartition(qmodel).blocks) - 1  # (killed
    # after every block unit was saved: in the network stage)
    _, resumed, x = small_setup()
    report = reconstruct(resumed, None, x, algo="qdrop-plus-e2e", iters=24, batch_size=16, progress=False,
                         state_path=str(state))
    assert report["unit_reports"][-1]["unit"] == "network"
    want, got = int_state(full), int_state(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    for n, m in full.named_modules():  # the learned weight steps too, not only the codes
        if isinstance(m, QuantLayer):
            torch.testing.assert_close(resumed.get_submodule(n).weight_quant.scale, m.weight_quant.scale)


def test_torchrun_refuses_one_process_stages_before_anything_is_loaded(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) a network-scope stage is refused by QuantizeJob.check, with a one-line
    error, before data or model are loaded; a plain qdrop job passes the same check."""
    from qdrop.pipeline import QuantizeJob
    from test_cli import CIFAR

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="without torchrun"):
        QuantizeJob("cifar10_resnet20", "w4a4", "qdrop-plus-e2e", data=str(CIFAR)).check()
    QuantizeJob("cifar10_resnet20", "w4a4", "qdrop", data=str(CIFAR)).check()
    monkeypatch.setenv("WORLD_SIZE", "1")
    QuantizeJob("cifar10_resnet20", "w4a4", "qdrop-plus-e2e", data=str(CIFAR)).check()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(2, 20), w=st.integers(2, 20), views=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1), constant_border=st.booleans())
def test_augmented_views_are_the_inputs_then_shifted_mirrored_copies(n, c, h, w, views, seed, constant_border):
    """shifted_flips: the inputs first, unchanged; then views - 1 copies, each image a window of itself or of its
    mirror image, shifted by at most 1/8 of its side, the edge repeated into the border (or, given fill, the border
    that constant per channel); the same seed, the same copies."""
    import torch.nn.functional as F
    from qdrop.recon.augment import shifted_flips

    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed % 1000))
    fill = torch.randn(c, generator=torch.Generator().manual_seed(seed % 997)) if constant_border else None
    out = shifted_flips(x, views, seed, fill=fill)
    assert out.shape == (views * n, c, h, w)
    assert torch.equal(out[:n], x)
    assert torch.equal(out, shifted_flips(x, views, seed, fill=fill))
    p = max(1, round(min(h, w) / 8))

    def bordered(img):
        if fill is None:
            return F.pad(img[None], (p, p, p, p), mode="replicate")[0]
        framed = fill.view(c, 1, 1).expand(c, h + 2 * p, w + 2 * p).clone()
        framed[:, p:p + h, p:p + w] = img
        return framed

    for i in range(n, views * n):
        src = x[i % n]
        windows = [bordered(img)[:, dy:dy + h, dx:dx + w]
                   for img in (src, src.flip(-1)) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        assert any(torch.equal(out[i], win) for win in windows), i


def test_a_network_stage_with_views_learns_on_the_copies_against_fp_predictions_on_them(monkeypatch):
    """Stage.views=4 on the e2e stage: its unit sees the calibration set and 3 augmented copies (4 x the samples), and
    its targets are the FP model's predictions on those very inputs; the block-wise stage before it sees the set as
    given. Non-image inputs and unit-scope stages with views are refused with one line."""
    from dataclasses import replace
    from qdrop.recon.augment import shifted_flips
    from qdrop.recon.configs import E2E_STEPS, Algorithm

    model, qmodel, x = small_setup()
    seen = []
    optimize = engine._optimize

    def spy(qm, unit, fn, x_q, x_fp, y_fp, stage, *a, aux=None, **kw):
        seen.append((unit.name, x_q[0].clone(), None if aux is None else aux[0].clone()))
        return optimize(qm, unit, fn, x_q, x_fp, y_fp, stage, *a, aux=aux, **kw)

    monkeypatch.setattr(engine, "_optimize", spy)
    algo = Algorithm("e2e-views", "block", (get_algorithm("qdrop").stages[0], replace(E2E_STEPS, views=4)))
    reconstruct(qmodel, None, x, algo=algo, iters=8, batch_size=16, seed=3, progress=False)
    assert all(s[1].shape[0] == len(x) for s in seen[:-1])  # the block units: the inputs as given
    name, inputs, targets = seen[-1]
    assert name == "network" and inputs.shape[0] == 4 * len(x)
    torch.testing.assert_close(inputs, shifted_flips(x, 4, engine._unit_seed(3, 1, 0, 1)))
    copies = inputs[len(x):]
    unchanged = sum(torch.equal(c, x[i % len(x)]) for i, c in enumerate(copies))
    mirrored = sum(torch.equal(c, x[i % len(x)].flip(-1)) for i, c in enumerate(copies))  # mirrored, not shifted
    assert unchanged < len(copies) / 8 and mirrored < len(copies) / 8  # (each 1 in 2 x 81 for a 28-pixel side)
    # some copies are windows of the mirrored image, some of the image itself (each with probability 1/2)
    p = round(28 / 8)

    def window_of(c, img):
        padded = torch.nn.functional.pad(img[None], (p, p, p, p), mode="replicate")[0]
        return any(torch.equal(c, padded[:, dy:dy + 28, dx:dx + 28]) for dy in range(2 * p + 1) for dx in range(2 * p + 1))

    flips = [window_of(c, x[i].flip(-1)) for i, c in enumerate(copies[:16])]
    assert all(f or window_of(c, x[i]) for i, (c, f) in enumerate(zip(copies[:16], flips)))
    assert 0 < sum(flips) < 16
    with torch.no_grad():
        torch.testing.assert_close(targets, model(inputs), rtol=1e-4, atol=1e-4)  # the FP model on the copies
    monkeypatch.undo()
    with pytest.raises(UsageError, match="scope='network' or views=1"):
        replace(get_algorithm("qdrop").stages[0], views=2)
    with pytest.raises(UsageError, match="positive integer"):
        replace(E2E_STEPS, views=0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    v = torch.randn(64, 8)
    qmlp = qdrop.prepare(mlp, (v[:2],), bits="w4a4")
    qdrop.calibrate(qmlp, [v[:32]])
    with pytest.raises(UsageError, match=r"images \[N, C, H, W\]"):
        reconstruct(qmlp, None, v, algo=Algorithm("e2e", "block", (replace(E2E_STEPS, views=4),)), iters=4,
                    batch_size=16, progress=False)
