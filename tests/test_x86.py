"""x86 deployment targets: the avx2 grid cannot saturate ONNX Runtime's u8 x s8 kernels, the static
check finds the layers that can, the CPU probe tells which kind of CPU this is, and the exported model
agrees with the simulation on both kinds of CPU (the AVX2 one emulated by QEMU where it is installed)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import qdrop  # noqa: E402
from qdrop.export import export_onnx  # noqa: E402
from qdrop.export.check import ort_session  # noqa: E402
from qdrop.export.x86 import (INT16_MAX, describe_cpu, emulator, run_emulated, saturation_warning,  # noqa: E402
                              u8s8_saturates, worst_pair_sums)
from qdrop.graph.prepare import TARGET_CPUS  # noqa: E402
from qdrop.quant.layers import QuantLayer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CIFAR, _model, needs_cifar  # noqa: E402

needs_qemu = pytest.mark.skipif(emulator() is None, reason="qemu-x86_64 not installed (apt-get install qemu-user): "
                                "the emulated-AVX2 checks need it")


def _prepared(target, bits="w8a8"):
    torch.manual_seed(1)
    x = torch.randn(64, 3, 16, 16)
    qm = qdrop.prepare(_model(), (x[:2],), backend="onnxruntime", bits=bits, target_cpu=target)
    qdrop.calibrate(qm, [x[:32], x[32:]])
    return qm, x


def _weight_grid(target):
    qm, _ = _prepared(target)
    schemes = {m.weight_quant.scheme for m in qm.modules() if isinstance(m, QuantLayer)}
    assert len(schemes) == 1
    s = schemes.pop()
    return s.qmin, s.qmax


def _vpmaddubsw_dot(x_u8: np.ndarray, w_s8: np.ndarray) -> int:
    """What AVX2's u8 x s8 kernels compute: adjacent products added in int16 with saturation,
    then accumulated in int32."""
    p = x_u8.astype(np.int64) * w_s8.astype(np.int64)
    if len(p) % 2:
        p = np.append(p, 0)
    return int(np.clip(p[0::2] + p[1::2], -32768, 32767).sum())


def test_the_onnxruntime_preset_defaults_to_the_portable_target():
    qm, _ = _prepared(None)
    assert qm.qdrop_config.target_cpu == "avx2"
    assert _weight_grid("avx2") == (-63, 63)  # 7-bit narrow: 255 * (63 + 63) = 32,130 fits in int16
    assert _weight_grid("vnni") == (-127, 127)
    assert qdrop.prepare(_model(), (torch.randn(2, 3, 16, 16),), backend="academic").qdrop_config.target_cpu is None
    with pytest.raises(ValueError, match="no CPU targets"):
        qdrop.prepare(_model(), (torch.randn(2, 3, 16, 16),), backend="tensorrt", target_cpu="avx2")
    with pytest.raises(ValueError, match="choose from"):
        qdrop.prepare(_model(), (torch.randn(2, 3, 16, 16),), backend="onnxruntime", target_cpu="sse2")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_u8_input_can_saturate_weights_on_the_avx2_grid(data):
    """The saturating pair sum equals the exact dot product for every uint8 input and every weight
    vector on the grid the avx2 target gives 8-bit layers (read from a prepared model); the full int8
    grid's counterexample is the next test."""
    lo, hi = _AVX2_GRID
    n = data.draw(st.integers(2, 40))
    x = np.array(data.draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    w = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))
    assert _vpmaddubsw_dot(x, w) == int((x * w).sum())


_AVX2_GRID = _weight_grid("avx2")


def test_full_int8_weights_can_saturate():
    x, w = np.array([255, 255]), np.array([127, 127])
    assert _vpmaddubsw_dot(x, w) == INT16_MAX != int((x * w).sum())


def test_static_check_names_the_layers_that_can_saturate():
    safe, _ = _prepared("avx2")
    rows = worst_pair_sums(safe)
    assert [r["layer"] for r in rows] == ["stem", "c1", "c2", "fc"]
    assert all(r["worst_pair_sum"] <= INT16_MAX and not r["saturates_without_vnni"] for r in rows)
    assert saturation_warning(rows) is None
    full, _ = _prepared("vnni")
    rows = worst_pair_sums(full)
    assert all(r["saturates_without_vnni"] for r in rows)
    msg = saturation_warning(rows)
    assert "4 of 4" in msg and "stem" in msg and "--target-cpu avx2" in msg and "\n" not in msg
    # a 4-bit layer in an 8-bit container: codes <= 7, never saturates
    low, _ = _prepared("vnni", bits="w4a8")
    assert saturation_warning(worst_pair_sums(low)) is None
    assert TARGET_CPUS["avx2"]["weight_bits"] == 7
    # the advice names what each backend can do
    assert "--backend onnxruntime" in saturation_warning(worst_pair_sums(full), "qnn")


def test_the_probe_agrees_with_the_cpu_flags():
    """The probe (ONNX Runtime's answer) and the CPUID flags (the ISA) must tell the same story."""
    cpu = describe_cpu()
    assert "avx2" in cpu["flags"]  # every x86-64 machine this project runs on
    if cpu["vnni"]:
        assert not cpu["u8s8_saturates"]
    elif "avx2" in cpu["flags"]:
        assert cpu["u8s8_saturates"]  # AVX2 / AVX-512 without VNNI: vpmaddubsw


@pytest.mark.parametrize("target", ["avx2", "vnni"])
def test_native_onnxruntime_matches_the_simulation_where_the_target_is_exact(tmp_path, target):
    if target == "vnni" and u8s8_saturates():
        pytest.skip(f"this CPU ({describe_cpu()['model']}) has no VNNI: its kernels saturate on full int8 weights "
                    "(the emulated test below shows that)")
    qm, x = _prepared(target)
    path = tmp_path / "m.onnx"
    export_onnx(qm, path, x[:1])
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        sim = qm(x).numpy()
    assert (out.argmax(1) == sim.argmax(1)).all()
    assert np.abs(out - sim).max() < 1e-3


@needs_qemu
def test_emulated_avx2_runs_the_avx2_target_exactly_and_saturates_full_int8(tmp_path):
    results = {}
    for target in ("avx2", "vnni"):
        qm, x = _prepared(target)
        path = tmp_path / f"{target}.onnx"
        export_onnx(qm, path, x[:1])
        emulated, cpu = run_emulated(path, x.numpy(), "avx2")
        assert cpu["emulated"] and not cpu["vnni"] and cpu["u8s8_saturates"]
        with torch.no_grad():
            sim = qm(x).numpy()
        results[target] = np.abs(emulated - sim).max()
    assert results["avx2"] < 1e-3  # the portable grid: what the simulation says
    assert results["vnni"] > 10 * results["avx2"] + 1e-3  # full int8 on AVX2: saturated pair sums


@needs_cifar
@needs_qemu
@pytest.mark.shared_data
@pytest.mark.slow  # was CI's slowest test (QEMU): `make test-all`; the fast subset keeps the emulated exactness test above
# and, on an AVX2 machine, test_export's real-data parity runs natively
def test_cli_parity_on_an_emulated_avx2_cpu_on_real_data(tmp_path, capsys):
    """The issue's reproduction: ResNet-20 W8A8 for ONNX Runtime, checked as an AVX2 CPU runs it."""
    from qdrop.cli import main

    common = ["--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w8a8", "--backend", "onnxruntime",
              "--calib", "256", "--eval-limit", "500"]
    check = ["--check", str(CIFAR), "--data", str(CIFAR), "--eval-limit", "500", "--emulate-cpu", "avx2"]
    for target in ("avx2", "vnni"):
        out = tmp_path / target
        assert main(["quantize", *common, "--target-cpu", target, "--out", str(out)]) == 0
        assert main(["export", "--checkpoint", str(out), *check]) == 0
    err = capsys.readouterr().err
    assert err.count("qdrop: warning:") == 1 and "--target-cpu avx2" in err  # the vnni export warns, once
    good = json.loads((tmp_path / "avx2" / "parity.json").read_text())
    bad = json.loads((tmp_path / "vnni" / "parity.json").read_text())
    for p in (good, bad):
        assert p["cpu"]["emulated"] and p["cpu"]["kind"] == "avx2" and p["cpu"]["u8s8_saturates"]
        assert p["ort_version"] and p["graph_optimization_level"] == "all"
    assert good["agreement"] >= 99.6 and abs(good["sim_top1"] - good["ort_top1"]) <= 0.4
    assert good["u8s8_saturating_layers"] == 0 and good["integer_nodes"].get("QLinearConv") == 19
    assert bad["u8s8_saturating_layers"] > 0 and bad["agreement"] < 98  # the silent failure the default avoids


@needs_cifar
@pytest.mark.shared_data
def test_export_refuses_a_full_int8_checkpoint_for_the_avx2_target(tmp_path, capsys):
    from qdrop.cli import main

    out = tmp_path / "vnni"
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w8a8", "--backend",
                 "onnxruntime", "--target-cpu", "vnni", "--calib", "64", "--eval-limit", "100", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out), "--data", str(CIFAR), "--target-cpu", "avx2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdrop: error:") and "--target-cpu avx2" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before  # nothing half-written
    assert main(["export", "--checkpoint", str(out), "--data", str(CIFAR), "--emulate-cpu", "avx2"]) == 2  # needs --check
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w8a8", "--backend",
                 "academic", "--target-cpu", "avx2", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # the integer emulation is ONNX Runtime's arithmetic: another preset's model is refused before any work
    capsys.readouterr()
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w8a8", "--backend",
                 "academic", "--eval-integer", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eval-integer" in err and "--backend onnxruntime" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main(["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w8a8", "--backend",
                 "onnxruntime", "--no-int32-bias", "--eval-integer", "--out", str(tmp_path / "x")]) == 2
    assert "drop --no-int32-bias" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_old_onnxruntime_checkpoints_keep_their_full_int8_grid(tmp_path):
    """Checkpoints written before target CPUs existed were full int8: they reload as 'vnni'."""
    from qdrop.pipeline import load_checkpoint, save_checkpoint

    factory = tmp_path / "net.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom test_export import _model\n"
                       "def small():\n    return _model(), dict(input_shape=(3, 16, 16), num_classes=10)\n")
    qm, x = _prepared("vnni")
    path = tmp_path / "model.pt"
    save_checkpoint(qm, f"module:{factory}:small", path, x[:1].shape)
    ckpt = torch.load(path, weights_only=True)  # plain data: also proves the checkpoint loads safely
    del ckpt["prepare"]["target_cpu"]
    torch.save(ckpt, path)
    loaded, _, _ = load_checkpoint(path, pretrained=False)
    assert loaded.qdrop_config.target_cpu == "vnni"
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))

