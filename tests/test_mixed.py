"""Mixed precision: the allocation is the exact optimum under each budget, bad budgets name the
feasible range, the chosen bits reach the quantized model, its checkpoint, `qdrop inspect` and the
ONNX export."""
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qdrop
from qdrop.errors import UsageError
from qdrop.quant.layers import QuantLayer
from qdrop.recon.mixed import BUDGET_TOL, LayerCost, allocate, layer_costs, output_sensitivity, parse_budget

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CIFAR, _model, needs_cifar  # noqa: E402

BITS = (2, 4, 8)


def _brute_force(sens, costs, kind, budget, bits):
    from qdrop.recon.mixed import _total

    free = [c for c in costs if c.fixed_bits is None]
    best = None
    for combo in itertools.product(bits, repeat=len(free)):
        alloc = dict(zip((c.name for c in free), combo))
        if _total(costs, kind, alloc) <= budget + BUDGET_TOL * max(abs(budget), 1.0):
            obj = sum(sens[n][b] for n, b in alloc.items())
            best = obj if best is None else min(best, obj)
    return best


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_allocation_is_the_exact_optimum(data):
    """Against exhaustive search, for every budget kind, with a pinned layer."""
    n = data.draw(st.integers(2, 5))
    costs = [LayerCost(f"l{i}", data.draw(st.integers(10, 5000)), data.draw(st.integers(100, 10**6)),
                       data.draw(st.sampled_from([4, 8])), None) for i in range(n)]
    costs.append(LayerCost("pinned", 300, 1000, 8, 8))
    # sensitivity falls with more bits, as measured sensitivities do
    sens = {c.name: dict(zip(BITS, sorted((data.draw(st.floats(1e-6, 10.0)) for _ in BITS), reverse=True)))
            for c in costs}
    kind = data.draw(st.sampled_from(["bits", "size", "bops"]))
    from qdrop.recon.mixed import _bounds

    lo, hi = _bounds(costs, kind, BITS)
    budget = lo + data.draw(st.floats(0.0, 1.0)) * (hi - lo)
    result = allocate(sens, costs, kind, budget, BITS)
    assert result["used"] <= budget + BUDGET_TOL * max(abs(budget), 1.0)
    # optimal up to the solver's absolute gap: 1e-6 of the largest sensitivity (allocate's docstring)
    largest = max(v for per in sens.values() for v in per.values())
    best = _brute_force(sens, costs, kind, budget, BITS)
    assert best - 1e-12 <= result["objective"] <= best + 1e-6 * largest


def test_a_budget_a_rounding_error_below_the_maximum_admits_the_maximum():
    """Found by hypothesis: budget = lo + 0.9999999999999999 * (hi - lo) is hi less float rounding (~1e-9 of
    ~1e7 BOPs); the all-8-bit allocation costs exactly hi and must count as feasible (relative tolerance)."""
    from qdrop.recon.mixed import _bounds

    costs = [LayerCost("l0", 10, 100, 4, None), LayerCost("l1", 10, 100, 4, None), LayerCost("l2", 10, 100, 4, None),
             LayerCost("l3", 10, 464680, 8, None), LayerCost("pinned", 300, 1000, 8, 8)]
    vals = iter([9.0, 10.0, 10.0, 8.0, 10.0, 10.0, 1.0, 3.0, 2.0, 1.0, 2.0, 2.0, 9.0, 1.0, 1.0])
    sens = {c.name: dict(zip(BITS, sorted((next(vals) for _ in BITS), reverse=True))) for c in costs}
    lo, hi = _bounds(costs, "bops", BITS)
    budget = lo + 0.9999999999999999 * (hi - lo)
    result = allocate(sens, costs, "bops", budget, BITS)
    assert result["used"] <= budget + BUDGET_TOL * budget
    assert result["objective"] == _brute_force(sens, costs, "bops", budget, BITS) == 19.0


def test_budgets_outside_the_feasible_range_name_it():
    costs = [LayerCost("a", 1000, 10**5, 4, None), LayerCost("b", 3000, 10**5, 4, None)]
    sens = {c.name: {b: 1.0 / b for b in BITS} for c in costs}
    with pytest.raises(UsageError, match=r"choose 2 to 8"):
        allocate(sens, costs, "bits", 1.5, BITS)
    with pytest.raises(UsageError, match=r"outside what this model can meet.*choose 0\.001 to 0\.004 MB"):
        allocate(sens, costs, "size", 0.0005e6, BITS)
    for bad in ("size", "size=", "weight=3", "bops=-1", "bits=x"):
        with pytest.raises(UsageError, match="budget must look like"):
            parse_budget(bad)
    assert parse_budget("size=0.25") == ("size", 250000.0) and parse_budget("bops=1.5") == ("bops", 1.5e9)


def test_layer_bits_reach_the_model_and_the_search_prefers_the_cheap_layers():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    probe = qdrop.prepare(_model(), (x[:2],), backend="academic", bits="w8a4")
    costs = layer_costs(probe, x)
    assert [c.fixed_bits for c in costs] == [8, None, None, 8]  # the academic preset pins first and last
    sens = output_sensitivity(probe, x, bits=BITS)
    for name in ("c1", "c2"):  # every candidate's error falls with more bits
        assert sens[name][2] > sens[name][4] > sens[name][8] >= 0
    qm = qdrop.prepare(_model(), (x[:2],), backend="academic", bits="w8a4", layer_bits={"c1": 2, "c2": 4})
    assert {n: m.weight_quant.bits for n, m in qm.named_modules() if isinstance(m, QuantLayer)} == \
        {"stem": 8, "c1": 2, "c2": 4, "fc": 8}
    assert qm.qdrop_config.layer_bits == {"c1": 2, "c2": 4}
    with pytest.raises(UsageError, match="does not have"):
        qdrop.prepare(_model(), (x[:2],), backend="academic", bits="w8a4", layer_bits={"nope": 2})


@needs_cifar
@pytest.mark.shared_data
def test_cli_mixed_bits_end_to_end_on_real_data(tmp_path, capsys):
    """qdrop quantize --bits w2.5a4 on ResNet-20: the allocation meets the average, is written to
    config.json, survives the checkpoint (inspect shows it) and is exported per layer."""
    from qdrop.cli import main

    out = tmp_path / "mixed"
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w2.5a4", "--calib", "64",
                 "--eval-limit", "200", "--out", str(out)]) == 0
    alloc = json.loads((out / "config.json").read_text())["allocation"]
    free = [layer for layer in alloc["layers"] if not layer["fixed"]]
    avg = sum(layer["params"] * layer["bits"] for layer in free) / sum(layer["params"] for layer in free)
    assert avg <= 2.5 + 1e-9 and alloc["used"] == pytest.approx(avg)
    assert len({layer["bits"] for layer in free}) > 1  # really mixed
    assert alloc["seconds"] < 1.0  # the integer program itself
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["allocation"]["bits"] == alloc["bits"]
    capsys.readouterr()
    assert main(["inspect", str(out), "--data", str(CIFAR), "--json"]) == 0
    layers = {layer["name"]: layer["bits"] for layer in json.loads(capsys.readouterr().out)["layers"]}
    for name, b in alloc["bits"].items():
        assert layers[name] == b
    assert main(["export", "--checkpoint", str(out), "--data", str(CIFAR)]) == 0
    onnx = pytest.importorskip("onnx")
    model = onnx.load(out / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, b in alloc["bits"].items():
        codes = inits[f"{name}.weight_quant.int_weight"]
        assert codes.min() >= 0 and codes.max() <= 2**b - 1  # academic: asymmetric, unsigned b-bit grid
    # a budget no allocation can meet: one line with the feasible range, refused before anything is written
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w4a4", "--budget",
                 "size=0.001", "--calib", "64", "--eval-limit", "200", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdrop: error: size budget") and "choose" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_weight_bytes_count_each_layers_bits():
    from qdrop.pipeline import _weight_bytes

    x = torch.randn(8, 3, 16, 16)
    qm = qdrop.prepare(_model(), (x[:2],), backend="academic", bits="w8a4", layer_bits={"c1": 2, "c2": 4})
    sizes = {n: m.layer.weight.numel() for n, m in qm.named_modules() if isinstance(m, QuantLayer)}
    assert _weight_bytes(qm) == (8 * sizes["stem"] + 2 * sizes["c1"] + 4 * sizes["c2"] + 8 * sizes["fc"]) // 8
