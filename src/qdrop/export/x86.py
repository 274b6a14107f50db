"""x86 integer kernels: what saturates, on which CPU, and how to check it before deploying.

ONNX Runtime's CPU integer kernels (MLAS) multiply uint8 activations by int8 weights. On CPUs with
AVX-512 VNNI, AVX-VNNI or AMX they accumulate in int32 (vpdpbusd, tdpbusd): exact. On AVX2 and on
AVX-512 without VNNI they use vpmaddubsw, which adds each pair of adjacent u8 x s8 products in
int16 *with saturation*: when x_i * w_i + x_j * w_j leaves [-32768, 32767] the result is silently
wrong. ONNX Runtime's quantization guide names this and the remedy (7-bit weights, "reduce_range").
qdrop's `target_cpu="avx2"` (the onnxruntime preset's default) quantizes to that remedy; this module
checks a model against the limit and tells whether the CPU at hand saturates.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

INT16_MAX = 32767


def worst_pair_sums(qmodel) -> list[dict]:
    """For every enabled weight quantizer with signed codes, the worst-case u8 x s8 pair sum its
    integer weights allow: x_max * (|w_a| + |w_b|) for the two largest |codes| of any output
    channel, x_max being the largest code of the layer's input (255 for an 8-bit container).
    Which two products the kernel pairs depends on its packing; the two largest are the bound
    for any pairing, so a layer under the limit can never saturate."""
    from ..graph.prepare import layer_input_quantizers
    from ..quant.layers import QuantLayer

    inputs = layer_input_quantizers(qmodel) if hasattr(qmodel, "graph") else {}
    rows = []
    for name, layer in qmodel.named_modules():
        if not isinstance(layer, QuantLayer):
            continue
        wq = layer.weight_quant
        if wq.state != "quant" or not wq.calibrated or wq.scheme.qmin >= 0:
            continue  # off, or unsigned weights (u8 x u8 kernels widen to int16 first: exact)
        iq = inputs.get(name)
        x_max = int(iq.scheme.qmax) if iq is not None and iq.scheme.qmin >= 0 else 255
        codes = wq.int_repr(layer.layer.weight.detach()).abs().reshape(layer.layer.weight.shape[0], -1)
        top2 = codes.topk(min(2, codes.shape[1]), dim=1).values.sum(1) if codes.shape[1] > 1 else codes[:, 0]
        worst = int(x_max * top2.max().item())
        rows.append(dict(layer=name, weight_bits=wq.bits, input_max_code=x_max, worst_pair_sum=worst,
                         saturates_without_vnni=worst > INT16_MAX))
    return rows


def saturation_warning(rows: list[dict], backend: str = "onnxruntime", remedy: str | None = None) -> str | None:
    """One line naming the layers that can saturate on non-VNNI CPUs and the remedy, or None.
    remedy: the advice to give instead of the vision presets' (the transformer path has no --target-cpu)."""
    bad = [r for r in rows if r["saturates_without_vnni"]]
    if not bad:
        return None
    names = ", ".join(r["layer"] for r in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    worst = max(r["worst_pair_sum"] for r in bad)
    if remedy is None:
        remedy = ("for any x86 CPU re-quantize with --target-cpu avx2 (7-bit weights)" if backend == "onnxruntime" else
                  f"the {backend} preset targets its own runtime; for ONNX Runtime on any x86 CPU quantize with "
                  "--backend onnxruntime (its default --target-cpu avx2)")
    return (f"{len(bad)} of {len(rows)} integer layers can saturate ONNX Runtime's u8s8 kernels on x86 CPUs without "
            f"VNNI (AVX2, AVX-512F/BW): worst pair sum {worst} > {INT16_MAX} in {names}. Exact only on VNNI/AMX CPUs; "
            + remedy)


def cpu_flags() -> dict:
    """The instruction sets that decide which integer kernels run, read from CPUID (via numpy,
    which also holds under an emulator) and, for AVX-VNNI and AMX that numpy does not report,
    from /proc/cpuinfo."""
    feats = _cpuid_features()
    flags = {"avx2": bool(feats.get("AVX2")), "avx512f": bool(feats.get("AVX512F")),
             "avx512bw": bool(feats.get("AVX512BW")), "avx512_vnni": bool(feats.get("AVX512VNNI"))}
    proc = _proc_cpuinfo_flags()
    # Under an emulator /proc/cpuinfo is the host's: run_emulated says so; also never trust it where
    # CPUID disagrees with it on AVX-512
    trusted = not os.environ.get(EMULATED_ENV) and ("avx512f" in proc) == flags["avx512f"]
    flags["avx_vnni"] = trusted and "avx_vnni" in proc
    flags["amx_int8"] = trusted and "amx_int8" in proc
    return flags


def _cpuid_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


def _proc_cpuinfo_flags() -> set:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def probe_model(path: str | os.PathLike) -> None:
    """A QLinearConv whose exact result needs int32 pair sums: x = 255 everywhere, w = 127
    everywhere, 16 input channels. Exact output code 247; a saturating kernel gives 125."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cin, cout = 16, 8
    w = np.full((cout, cin, 1, 1), 127, dtype=np.int8)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.ones(cout, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(2100.0, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "y_zp")]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"], ["y"])
    graph = helper.make_graph([node], "u8s8_probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, cin, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, cout, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


PROBE_EXACT = round(255 * 127 * 16 / 2100)  # 247


@functools.lru_cache(maxsize=None)
def u8s8_saturates() -> bool:
    """Run the probe in this process's ONNX Runtime: True when its u8 x s8 kernels saturate here."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "probe.onnx")
        probe_model(p)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        y = s.run(None, {"x": np.full((1, 16, 4, 4), 255, np.uint8)})[0]
    return bool((y != PROBE_EXACT).any())


def describe_cpu() -> dict:
    """What parity.json and benchmark rows record about the CPU that ran ONNX Runtime."""
    flags = cpu_flags()
    vnni = flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]
    return dict(model=cpu_model(), flags=sorted(k for k, v in flags.items() if v), vnni=vnni,
                kind="vnni" if vnni else ("avx2" if flags["avx2"] else "other"),
                u8s8_saturates=u8s8_saturates())


# ---- running ONNX Runtime as another x86 CPU would (QEMU user-mode emulation) ----

EMULATED_CPUS = {"avx2": "Haswell"}  # qdrop name -> QEMU CPU model: AVX2 + FMA, no AVX-512, no VNNI
EMULATED_ENV = "QDROP_EMULATED_CPU"  # set for the emulated worker: /proc/cpuinfo there describes the host


def emulator() -> str | None:
    return shutil.which("qemu-x86_64")


# Runs under the emulator. It loads this file alone (not the qdrop package, which imports torch:
# emulated, that import alone takes seconds).
_WORKER = r"""
import importlib.util, sys, json, numpy as np, onnxruntime as ort
spec = importlib.util.spec_from_file_location("qdrop_x86", sys.argv[4])
x86 = importlib.util.module_from_spec(spec); spec.loader.exec_module(x86)
path, xin, out = sys.argv[1:4]
so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 1
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.load(xin)
name = s.get_inputs()[0].name
y = np.concatenate([s.run(None, {name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
np.save(out, y)
print(json.dumps(x86.describe_cpu()))
"""


def run_emulated(onnx_path, x: np.ndarray, cpu: str = "avx2", timeout: float = 3600) -> tuple[np.ndarray, dict]:
    """Run an ONNX model in ONNX Runtime under QEMU's model of another x86 CPU (same Python, same
    ONNX Runtime build): its kernels dispatch on the emulated CPUID, so integer results are those
    of that CPU, bit for bit; timings are not. Returns (outputs, describe_cpu() as seen inside)."""
    import json

    from ..errors import ExportError, UsageError  # here, not at the top: the emulated worker loads this file alone

    if cpu not in EMULATED_CPUS:
        raise UsageError(f"unknown emulated CPU {cpu!r}; choose from {sorted(EMULATED_CPUS)}")
    qemu = emulator()
    if qemu is None:
        raise UsageError("emulating another CPU needs QEMU's user-mode emulator qemu-x86_64 "
                                "(Debian/Ubuntu: apt-get install qemu-user)")
    with tempfile.TemporaryDirectory() as d:
        xin, out = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
        np.save(xin, np.ascontiguousarray(x, dtype=np.float32))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), EMULATED_ENV: cpu}
        where = f"ONNX Runtime under {qemu} -cpu {EMULATED_CPUS[cpu]}"
        try:
            r = subprocess.run([qemu, "-cpu", EMULATED_CPUS[cpu], os.path.realpath(sys.executable), "-c", _WORKER,
                                str(onnx_path), xin, out, os.path.abspath(__file__)],
                               capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{where} did not finish in {timeout:.0f} s; check fewer samples (--eval-limit)") from None
        if r.returncode != 0:  # e.g. a build that needs instructions the emulated CPU lacks (SIGILL)
            err = [l for l in r.stderr.splitlines() if "warning: TCG" not in l and l.strip()]
            raise ExportError(f"{where} failed (exit {r.returncode}): {err[-1] if err else 'no message'}")
        cpu_seen = json.loads(r.stdout.strip().splitlines()[-1])
        cpu_seen["model"] = f"QEMU -cpu {EMULATED_CPUS[cpu]} (emulated) on {cpu_model()}"
        cpu_seen["emulated"] = True
        return np.load(out), cpu_seen

