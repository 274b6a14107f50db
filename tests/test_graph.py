"""Graph preparation: exactness on many architectures, presets, tracing errors, units."""
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qdrop
from qdrop.graph import TraceError, block_units, describe, layer_units, prepare, set_quant_state
from qdrop.graph import units as units_module
from qdrop.models import load_model
from qdrop.quant.layers import QuantLayer


def randomize_bn(model):
    """Non-trivial BN statistics so that folding is really exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def tv(name):
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.get_model(name).eval())


MODELS = {
    "resnet18": lambda: tv("resnet18"),
    "resnet50": lambda: tv("resnet50"),
    "mobilenet_v2": lambda: tv("mobilenet_v2"),
    "mnasnet1_0": lambda: tv("mnasnet1_0"),
    "regnet_x_600mf": lambda: randomize_bn(load_model("regnet_x_600mf", pretrained=False)[0]),
    "efficientnet_lite0": lambda: load_model("efficientnet_lite0")[0],
    "cifar10_resnet20": lambda: randomize_bn(load_model("cifar10_resnet20", pretrained=False)[0]),
    "cifar10_resnet32": lambda: randomize_bn(load_model("cifar10_resnet32", pretrained=False)[0]),
}
INPUT = {"cifar10_resnet20": (2, 3, 32, 32), "cifar10_resnet32": (2, 3, 32, 32)}


def _prepared(name, bits="w4a4", backend="academic"):
    model = MODELS[name]()
    x = torch.randn(INPUT.get(name, (2, 3, 224, 224)))
    return model, prepare(model, (x,), bits=bits, backend=backend), x


@pytest.mark.parametrize("name", list(MODELS))
def test_disabled_quantizers_give_the_original_function(name):
    model, qmodel, x = _prepared(name)
    set_quant_state(qmodel, "off")
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()), "BN should be folded"
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


EXPECTED_BLOCKS = {  # block units besides the stem and the classifier
    "resnet18": (10, [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]),
    "resnet50": (18, [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]),
    "mobilenet_v2": (20, [f"features.{i}" for i in range(1, 18)]),
    "mnasnet1_0": (21, [f"layers.{i}.{j}" for i, n in zip(range(8, 14), (3, 3, 3, 2, 4, 1)) for j in range(n)]),
    "regnet_x_600mf": (18, [f"trunk_output.block{i}.block{i}-{j}" for i, n in zip(range(1, 5), (1, 3, 5, 7)) for j in range(n)]),
    "efficientnet_lite0": (19, [f"_blocks.{i}" for i in range(16)]),
    "cifar10_resnet20": (11, [f"layer{i}.{j}" for i in range(1, 4) for j in range(3)]),
}


@pytest.mark.parametrize("name", list(EXPECTED_BLOCKS))
def test_block_units_follow_the_architecture(name):
    _, qmodel, x = _prepared(name)
    units = block_units(qmodel)
    total, blocks = EXPECTED_BLOCKS[name]
    names = [u.name for u in units]
    assert len(units) == total, names
    for b in blocks:
        assert b in names
    # chaining the units reproduces the whole model (quantized too)
    with torch.no_grad():
        h = x
        for u in units:
            h = qdrop.graph.subgraph(qmodel, u.nodes, u.input, [u.output])(h)
        assert torch.allclose(h, qmodel(x), atol=1e-5)
    # every quantized layer and activation quantizer is in exactly one unit
    layers = [l for u in units for l in u.layers]
    assert sorted(layers) == sorted(n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer))


def test_residual_block_keeps_its_shortcut_and_output_quantizer():
    _, qmodel, _ = _prepared("resnet18")
    unit = next(u for u in block_units(qmodel) if u.name == "layer2.0")
    assert unit.layers == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    # its output quantizer (after the final ReLU) belongs to the block, not the next one
    assert unit.output.op == "call_module" and unit.output.target.startswith("act_quant")
    lus = layer_units(qmodel, unit)
    assert [u.name for u in lus] == unit.layers
    assert lus[0].nodes[-1].target == "layer2.0.relu"  # conv1 + its ReLU


def test_partition_code_names_no_model():
    src = inspect.getsource(units_module).lower()
    for word in ("resnet", "mobilenet", "mnasnet", "regnet", "efficientnet", "bottleneck", "basicblock"):
        assert word not in src


def test_academic_preset_placement():
    _, qmodel, _ = _prepared("resnet18", bits="w2a4")
    d = describe(qmodel)
    bits = {l["name"]: l["bits"] for l in d["layers"]}
    assert bits["conv1"] == 8 and bits["fc"] == 8 and bits["layer1.0.conv1"] == 2
    assert all(l["granularity"].startswith("per-channel") and not l["symmetric"] for l in d["layers"])
    fc_input = [a for a in d["activations"] if "fc" in a["feeds"]]
    assert len(fc_input) == 1 and fc_input[0]["bits"] == 8
    assert not any(a["after"].startswith("input") for a in d["activations"])  # network input not quantized
    assert all(a["bits"] == 4 for a in d["activations"] if a is not fc_input[0])


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_runtime_presets_quantize_input_and_residual_adds(backend):
    _, qmodel, _ = _prepared("resnet18", bits="w8a8", backend=backend)
    d = describe(qmodel)
    assert any(a["after"].startswith("input") for a in d["activations"])
    add_inputs = [a for a in d["activations"] if any(f.startswith("add") for f in a["feeds"])]
    assert len(add_inputs) >= 8
    # onnxruntime's default x86 target (avx2) keeps 8-bit weights on the 7-bit grid that cannot
    # saturate u8 x s8 int16 pair sums; tensorrt (GPU) uses the full narrow int8 grid
    grid, bits = ([-63, 63], 7) if backend == "onnxruntime" else ([-127, 127], 8)
    for l in d["layers"]:
        assert l["symmetric"] and l["grid"] == grid and l["bits"] == bits
    act_grid = [-128, 127] if backend == "tensorrt" else [0, 255]
    assert all(a["grid"] == act_grid for a in d["activations"])


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.odd = Untraceable()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.odd(self.stem(x)), 1).flatten(1))


def test_untraceable_module_is_named_and_can_be_kept_as_leaf():
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match=r"module 'odd' \(Untraceable\)"):
        prepare(net, (x,))
    qmodel = prepare(net, (x,), leaf_modules=["odd"])
    assert isinstance(qmodel.odd, Untraceable)  # stays in FP
    assert not isinstance(qmodel.odd.conv, QuantLayer)
    set_quant_state(qmodel, "off")
    assert torch.allclose(qmodel(x), net(x), atol=1e-6)


def test_prepare_rejects_bad_arguments():
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        prepare(net, (x,), backend="nope", leaf_modules=["odd"])
    for bits in ("w1a4", "w9a8", "wxa4"):
        with pytest.raises(ValueError):
            prepare(net, (x,), bits=bits, leaf_modules=["odd"])
    with pytest.raises(ValueError, match="not found"):
        prepare(net, (x,), leaf_modules=["missing"])


def test_calibrate_rejects_nan_and_the_original_model_is_untouched():
    model, qmodel, x = _prepared("cifar10_resnet20")
    with pytest.raises(ValueError, match="NaN"):
        qdrop.calibrate(qmodel, [torch.full_like(x, float("nan"))])
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    qdrop.calibrate(qmodel, [x])  # calibrating again after the refusal works
    assert all(q.calibrated and q.state == "quant" for _, q in qdrop.graph.quantizers(qmodel))
    with torch.no_grad():
        assert not torch.allclose(qmodel(x), model(x), atol=1e-3)


def test_grouped_and_depthwise_convs_and_conv1d_are_quantized():
    net = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4, 3)).eval()
    x = torch.randn(5, 4, 8)
    qmodel = prepare(net, (x,), bits="w4a4")
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == 3
    qdrop.calibrate(qmodel, [x])
    out = qmodel(x)
    assert out.shape == (5, 3) and not torch.allclose(out, net(x))
    assert re.search("Conv1d", str(describe(qmodel)))
