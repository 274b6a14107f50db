"""qdrop.export.emulate: ONNX Runtime's integer arithmetic replayed in PyTorch gives the runtime's own
codes (outputs equal to float32 rounding of the logits), where fake quantization differs at rounding ties."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qdrop  # noqa: E402
from qdrop.export import export_onnx  # noqa: E402
from qdrop.export.check import ort_session  # noqa: E402
from qdrop.export.emulate import integer_forward  # noqa: E402
from qdrop.export.x86 import describe_cpu, emulator, run_emulated, u8s8_saturates  # noqa: E402
from qdrop.graph import quantizers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_export import Net, _model  # noqa: E402

# One requantized code apart moves a logit by at least one activation step times a weight (~1e-3 here);
# float32 rounding of the logits themselves is ~1e-7. Below this bound every integer code is the runtime's.
SAME_CODES = 1e-5


class ViewNet(Net):
    """The head as EfficientNet writes it: pool, then view (ONNX Reshape, which ONNX Runtime moves the
    QuantizeLinear across, so the pool fuses into QLinearGlobalAveragePool; Flatten keeps it in float)."""

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.c2(F.relu(self.c1(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


class TwoUserNet(Net):
    """The classifier's float output (QGemm with a float output) read by two ops."""

    def forward(self, x):
        y = super().forward(x)
        return torch.cat([y, y * 2], 1)


def _net(head: str) -> nn.Module:
    """test_export's network (head "flatten"), or the same weights with the view head or two users of the logits."""
    model = _model()
    if head in ("view", "two-users"):
        other = (ViewNet if head == "view" else TwoUserNet)().eval()
        other.load_state_dict(model.state_dict())
        return other
    return model


def _prepared(target="avx2", bits="w8a8", n=128, seed=1, head="flatten"):
    torch.manual_seed(seed)
    x = torch.randn(n, 3, 16, 16)
    qm = qdrop.prepare(_net(head), (x[:2],), backend="onnxruntime", bits=bits, target_cpu=target)
    qdrop.calibrate(qm, [x[: n // 2], x[n // 2:]])
    return qm, x


def _ort(path, x):
    return ort_session(path).run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("target,head", [("avx2", "flatten"), ("avx2", "view"), ("vnni", "flatten")])
def test_integer_emulation_is_what_onnxruntime_computes(tmp_path, target, head):
    if target == "vnni" and u8s8_saturates():
        pytest.skip(f"this CPU ({describe_cpu()['model']}) has no VNNI: its kernels saturate on full int8 weights, "
                    "which the emulation does not model")
    qm, x = _prepared(target, head=head)
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    report = {}
    emu = integer_forward(qm, x, report).numpy()
    out = _ort(path, x)
    assert np.abs(emu - out).max() < SAME_CODES
    assert report["exact"]["QLinearConv"] == 3 and report["exact"]["QLinearAdd"] == 1
    # a Flatten after the pool keeps ONNX Runtime's pool in float; a view (Reshape) lets it fuse
    assert report["exact"].get("QLinearGlobalAveragePool", 0) == (head == "view")
    assert report["float"] == ({} if head == "view" else {"GlobalAveragePool (not fused)": 1})
    with torch.no_grad():
        sim = qm(x).numpy()
    assert np.abs(sim - out).max() < 1e-2  # fake quantization is close, but not the runtime's codes


def test_integer_model_is_the_emulation_as_a_module(tmp_path):
    """What `qdrop quantize --eval-integer` scores: the emulation behind nn.Module's eval()/to(), giving
    ONNX Runtime's outputs, and leaving the model's training mode alone."""
    from qdrop.export import IntegerModel

    qm, x = _prepared()
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    out = _ort(path, x)
    with torch.no_grad():
        sim = qm(x).numpy()
    qm.train()
    emulated = IntegerModel(qm).eval().to("cpu")
    got = emulated(x).numpy()
    assert np.abs(got - out).max() < SAME_CODES and np.array_equal(got, integer_forward(qm, x).numpy())
    assert not np.array_equal(got, sim)  # the emulation's arithmetic, not the simulation's (last bits differ here)
    assert emulated.report["float"] == {"GlobalAveragePool (not fused)": 1}
    emulated.qmodel.train()
    emulated(x)
    assert qm.training  # integer_forward evaluates in eval mode and puts the mode back


def test_a_value_read_twice_in_float_is_computed_and_counted_once(tmp_path):
    qm, x = _prepared(head="two-users", n=32)
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    report = {}
    emu = integer_forward(qm, x, report).numpy()
    assert np.abs(emu - _ort(path, x)).max() < SAME_CODES
    assert report["exact"]["QGemm (float output)"] == 1


@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no shrinking: minutes
@given(seed=st.integers(0, 2**16), head=st.sampled_from(["flatten", "view"]), scale_exp=st.lists(st.floats(-7.0, -1.0), min_size=8, max_size=8),
       zps=st.lists(st.integers(0, 255), min_size=8, max_size=8))
def test_integer_emulation_holds_for_any_activation_grid(tmp_path_factory, seed, head, scale_exp, zps):
    """Random scales and zero points on every activation quantizer: ties, saturation, and zero points that
    keep ONNX Runtime from folding a ReLU into the kernel (it then runs that op in float)."""
    qm, x = _prepared(seed=seed % 7, n=32, head=head)
    acts = [q for _, q in quantizers(qm) if q.role == "act"]
    for q, e, z in zip(acts, scale_exp, zps):
        q.set_range(torch.tensor(2.0 ** e), torch.tensor(float(z)))
    path = tmp_path_factory.mktemp("emu") / "m.onnx"
    export_onnx(qm, path, x[:1])
    emu = integer_forward(qm, x).numpy()
    out = _ort(path, x)
    assert np.abs(emu - out).max() <= SAME_CODES * max(1.0, np.abs(out).max())


def _qlinear_add_session(sa, za, sb, zb, sc, zc):
    """One com.microsoft QLinearAdd (the op ONNX Runtime fuses DequantizeLinear-Add-QuantizeLinear into)."""
    from onnx import TensorProto, helper

    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("sa", sa), ("sb", sb), ("sc", sc))]
    inits += [helper.make_tensor(n, TensorProto.UINT8, [], [v]) for n, v in (("za", za), ("zb", zb), ("zc", zc))]
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain="com.microsoft")
    vec = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None]) for n in "abc"]
    graph = helper.make_graph([node], "qladd", vec[:2], vec[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# the grids of two residual adds of EfficientNet-Lite0 W8A8 (a Xeon's calibration) where an unfused k constant
# put 1 and 2 of the 65,536 code pairs on the other side of a rounding tie (121.49999 -> 121, ONNX Runtime 122)
_LITE0_ADDS = [(0.15260881185531616, 105, 0.2912867069244385, 123, 0.3730636537075043, 118),
               (0.14525581896305084, 113, 0.23536799848079681, 123, 0.23259471356868744, 130)]


@settings(max_examples=6, deadline=None)
@given(grid=st.tuples(st.floats(1e-3, 1.0), st.integers(0, 255), st.floats(1e-3, 1.0), st.integers(0, 255),
                      st.floats(1e-3, 1.0), st.integers(0, 255)))
@example(grid=_LITE0_ADDS[0])
@example(grid=_LITE0_ADDS[1])
def test_qlinear_add_gives_onnxruntimes_code_for_every_pair_of_input_codes(grid):
    from qdrop.export.emulate import Codes, qlinear_add

    sa, za, sb, zb, sc, zc = grid
    sa, sb, sc = (float(np.float32(v)) for v in (sa, sb, sc))
    a, b = (t.ravel() for t in np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)))
    out = _qlinear_add_session(sa, za, sb, zb, sc, zc).run(None, {"a": a, "b": b})[0]
    codes = [Codes(torch.from_numpy(v.astype(np.float32)), torch.tensor(s), z, 0, 255) for v, s, z in ((a, sa, za), (b, sb, zb))]
    emu = qlinear_add(*codes, torch.tensor(sc), zc).clamp(0, 255).numpy()
    assert (emu == out).all(), f"{int((emu != out).sum())} of 65,536 pairs differ"


@pytest.mark.skipif(emulator() is None, reason="qemu-x86_64 not installed (apt-get install qemu-user)")
def test_integer_emulation_is_what_an_avx2_cpu_computes(tmp_path):
    qm, x = _prepared("avx2", n=64)
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    out, cpu = run_emulated(path, x.numpy(), "avx2")
    assert cpu["emulated"] and not cpu["vnni"]
    assert np.abs(integer_forward(qm, x).numpy() - out).max() < SAME_CODES


def test_below_8_bits_the_emulation_falls_back_to_the_float_graph(tmp_path):
    """4-bit activations in an 8-bit container: ONNX Runtime runs those layers in float (a Clip sits
    between the layer and its QuantizeLinear), so the emulation requantizes from float there."""
    qm, x = _prepared(bits="w4a4", n=64)
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    emu = integer_forward(qm, x).numpy()
    out = _ort(path, x)
    assert (emu.argmax(1) == out.argmax(1)).mean() >= 0.95
    assert np.abs(emu - out).max() < 0.05 * np.abs(out).max()


def test_integer_emulation_needs_a_prepared_model():
    with pytest.raises(TypeError, match="qdrop.prepare"):
        integer_forward(_model(), torch.randn(1, 3, 16, 16))


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_integer_emulation_of_timm_families(tmp_path, name):
    """A MaxPool between a conv and its quantizer (ResNet: ONNX Runtime pools the codes), and ops with no
    integer kernel (MobileNetV3's hardswish and squeeze-excite run in float, to float32 rounding)."""
    timm = pytest.importorskip("timm")
    from qdrop.export import optimized_op_counts

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(8, 3, 64, 64)
    qm = qdrop.prepare(model, (x[:2],), backend="onnxruntime", bits="w8a8")
    qdrop.calibrate(qm, [torch.randn(8, 3, 64, 64)])
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    _, integer = optimized_op_counts(path)
    report = {}
    emu = integer_forward(qm, x, report, kernels=set(integer)).numpy()
    out = _ort(path, x)
    if name == "resnet18":
        assert np.abs(emu - out).max() < SAME_CODES
        assert report["exact"]["QLinearConv"] == integer["QLinearConv"]
    else:
        assert (emu.argmax(1) == out.argmax(1)).all()
        assert np.abs(emu - out).max() < 0.05 * np.abs(out).max()
