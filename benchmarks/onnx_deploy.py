"""Deployment benchmark: parity of the exported QDQ model with the simulation, and latency.

  python benchmarks/onnx_deploy.py parity  [--iters 1000]   -> benchmarks/results/onnx_parity.json
  python benchmarks/onnx_deploy.py latency [--runs 30]      -> benchmarks/results/onnx_latency_<vnni|avx2>.json
  python benchmarks/onnx_deploy.py latency --target-cpu vnni -> ..._<vnni|avx2>_target-vnni.json (full int8 weights)

parity: CIFAR-10 ResNet-20 W8A8 (naive and qdrop) on all 10,000 test images, EfficientNet-Lite0 W8A8
naive on the 500 evaluation images of the shared ImageNet samples; onnxruntime preset for both x86 targets
(avx2: 7-bit weights, vnni: full int8) and the academic preset; each scored by this machine's ONNX Runtime
and, where qemu-x86_64 is installed, by ONNX Runtime under an emulated AVX2 CPU without VNNI.
latency: ORT int8 (QDQ, fused by ORT into integer kernels) vs ORT FP32 vs PyTorch eager FP32, batch 1
and 32, median of --runs timed runs after warm-up, all in this one process with the same thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    "cifar10_resnet20": dict(data=SHARED / "cifar10", calib=1024, eval_limit=None),
    "efficientnet_lite0": dict(data=SHARED / "imagenet" / "samples", calib=500, eval_limit=None),
}


def _save(obj, name):
    from qdrop.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / name, obj)
    print(f"-> {RESULTS / name}")


def run_parity(args):
    from qdrop.export.x86 import describe_cpu, emulator
    from qdrop.io import environment
    from qdrop.pipeline import QuantizeJob, run_export, run_quantize

    # rows already measured (same model, preset, algorithm, bias, target and CPU) are kept: a killed
    # run resumes at the row it was on; --fresh measures every row again
    old = [] if args.fresh or not (RESULTS / "onnx_parity.json").exists() else \
        json.loads((RESULTS / "onnx_parity.json").read_text()).get("rows", [])
    # (rows written before the integer emulation existed lack its columns: they are measured again)
    done = {_row_key(r): r for r in old if "cpu" in r and "emulation_agreement" in r}
    rows = []
    # (model, preset, algorithm, int32_bias, target_cpu): int32_bias None = the preset's choice (on for
    # onnxruntime, off for academic); the float-bias row is the ablation that shows what the simulated bias
    # buys. Each model is scored by this machine's ONNX Runtime and, where QEMU is installed, by the same
    # ONNX Runtime under an emulated AVX2 CPU without VNNI (its integer kernels, bit for bit).
    runs = [("cifar10_resnet20", "onnxruntime", "naive", None, "avx2"), ("cifar10_resnet20", "onnxruntime", "naive", None, "vnni"),
            ("cifar10_resnet20", "onnxruntime", "qdrop", None, "avx2"),
            ("efficientnet_lite0", "onnxruntime", "naive", None, "avx2"), ("efficientnet_lite0", "onnxruntime", "naive", None, "vnni"),
            ("cifar10_resnet20", "onnxruntime", "qdrop", None, "vnni"),
            ("cifar10_resnet20", "onnxruntime", "naive", False, "avx2"), ("cifar10_resnet20", "academic", "naive", None, None)]
    emulations = [None] + (["avx2"] if emulator() and not args.native_only else [])
    native_kind = describe_cpu()["kind"]
    for model, backend, algo, int32_bias, target in runs:
        if args.only and model not in args.only:
            continue
        case = CASES[model]
        out = Path(args.work) / (f"{model}_{backend}_{algo}" + ("" if int32_bias is None else f"_int32bias{int32_bias}")
                                 + ("" if target is None else f"_{target}"))
        metrics_file = out / "metrics.json"
        if not metrics_file.exists():
            job = QuantizeJob(model, "w8a8", algo, backend, data=str(case["data"]), calib=case["calib"], iters=args.iters,
                              eval_limit=case["eval_limit"], int32_bias=int32_bias, target_cpu=target)
            run_quantize(job, out=out, progress=False)
        metrics = json.loads(metrics_file.read_text())
        from qdrop.graph.prepare import PRESETS

        sim_bias = PRESETS[backend].int32_bias if int32_bias is None else int32_bias
        for emulate in emulations:
            key = _key(model, backend, algo, "int32" if sim_bias else "float", target, emulate or native_kind, bool(emulate))
            if key in done:
                rows.append(done[key])
                continue
            r = run_export(out, out / "model.onnx", check_data=case["data"], data=case["data"], progress=False,
                           emulate_cpu=emulate)
            p = r["parity"]
            row = dict(model=model, backend=backend, algo=algo, target_cpu=target, sim_bias="int32" if sim_bias else "float",
                       iters=metrics["iters"], fp=metrics["fp"], sim_top1=p["sim_top1"], ort_top1=p["ort_top1"],
                       agreement=p["agreement"], samples=p["samples"], max_abs_diff=round(p["max_abs_diff"], 4),
                       mean_abs_diff=round(p["mean_abs_diff"], 5), cpu=p["cpu"], ort_version=p["ort_version"],
                       u8s8_saturating_layers=p["u8s8_saturating_layers"], integer_nodes=p["integer_nodes"],
                       other_nodes={k: v for k, v in p["optimized_ops"].items() if k not in p["integer_nodes"]})
            e = p["integer_emulation"]  # ONNX Runtime's arithmetic replayed in PyTorch (qdrop.export.emulate)
            row.update(emulation_agreement=e["agreement"], emulation_top1=e["top1"],
                       emulation_max_abs_diff=e["max_abs_diff"], emulation_identical=e["identical_outputs"],
                       emulation_ops_in_float=e["ops_in_float"])
            rows.append(row)
            print(f"{model:20s} {backend:11s} {algo:6s} {str(target):5s} {row['sim_bias']:5s} on {p['cpu']['kind']:4s}"
                  f"{' (emulated)' if emulate else ''}: sim {row['sim_top1']:.2f} ort {row['ort_top1']:.2f} "
                  f"agree {row['agreement']:.2f}% max|d| {row['max_abs_diff']:.3f}; integer emulation: agree "
                  f"{row['emulation_agreement']:.2f}% max|d| {row['emulation_max_abs_diff']:.3g}", flush=True)
            _save(dict(rows=_merged(rows, old), environment=environment()), "onnx_parity.json")  # after each row
    print("\n| model | preset | target CPU | algo | simulated bias | ORT ran on | sim top-1 | ORT top-1 | agreement | max abs diff "
          "| integer emulation: agreement, max abs diff | integer kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ints = ", ".join(f"{k} {v}" for k, v in r["integer_nodes"].items())
        cpu = r["cpu"]
        where = ("AVX2, emulated" if cpu.get("emulated") else cpu["kind"].upper()) + (" (saturates)" if cpu["u8s8_saturates"] else "")
        print(f"| {r['model']} | {r['backend']} | {r['target_cpu'] or '-'} | {r['algo']} | {r['sim_bias']} | {where} | "
              f"{r['sim_top1']:.2f} | {r['ort_top1']:.2f} | {r['agreement']:.2f} % ({r['samples']}) | {r['max_abs_diff']:.3f} | "
              f"{r['emulation_agreement']:.2f} %, {r['emulation_max_abs_diff']:.3g} | {ints} |")


def _merged(rows: list, old: list) -> list:
    """This invocation's rows, then the rows of the file it did not touch (another --only, an earlier run)."""
    keys = {_row_key(r) for r in rows}
    return rows + [r for r in old if "cpu" in r and _row_key(r) not in keys]


def _key(model, backend, algo, sim_bias, target, cpu_kind, emulated) -> tuple:
    """A row is one configuration scored on one kind of CPU (vnni / avx2, emulated or not): rows measured on
    another machine's kind are neither reused nor replaced. The one definition for rows to be measured and
    rows already written."""
    return (model, backend, algo, sim_bias, target, cpu_kind, emulated)


def _row_key(r: dict) -> tuple:
    return _key(r["model"], r["backend"], r["algo"], r["sim_bias"], r.get("target_cpu"), r["cpu"]["kind"],
                bool(r["cpu"].get("emulated")))


def _median_ms(fn, runs, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run_latency(args):
    import qdrop
    from qdrop.data import load_split
    from qdrop.export import export_onnx
    from qdrop.export.check import ort_session
    from qdrop.models import load_model
    from qdrop.io import environment

    from qdrop.export.x86 import describe_cpu

    torch.set_num_threads(args.threads)
    cpu = describe_cpu()  # timings belong to the CPU kind that made them: they differ between VNNI and AVX2
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for model_name, case in CASES.items():
            if args.only and model_name not in args.only:
                continue
            fp_model, info = load_model(model_name, data=case["data"])
            fp_model.eval()
            calib = load_split(info.dataset, "calib", data=case["data"], preprocess=info.preprocess, limit=256, seed=0)
            qm = qdrop.prepare(fp_model, (calib.x[:2],), backend="onnxruntime", bits="w8a8", target_cpu=args.target_cpu)
            qdrop.calibrate(qm, [calib.x[i:i + 32] for i in range(0, len(calib.x), 32)])
            int8_path, fp_path = Path(d) / f"{model_name}_int8.onnx", Path(d) / f"{model_name}_fp32.onnx"
            export_onnx(qm, int8_path, calib.x[:1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(fp_model, (calib.x[:1],), str(fp_path), dynamo=False, opset_version=13,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            s_int8 = ort_session(int8_path, threads=args.threads)
            s_fp = ort_session(fp_path, threads=args.threads)
            for batch in (1, 32):
                x = calib.x[:batch].contiguous()
                xn = x.numpy()
                with torch.inference_mode():
                    t_torch = _median_ms(lambda: fp_model(x), args.runs)
                t_fp = _median_ms(lambda: s_fp.run(None, {"input": xn}), args.runs)
                t_int8 = _median_ms(lambda: s_int8.run(None, {"input": xn}), args.runs)
                row = dict(model=model_name, batch=batch, target_cpu=args.target_cpu, cpu=cpu["kind"], cpu_model=cpu["model"],
                           ort_int8_ms=round(t_int8, 3), ort_fp32_ms=round(t_fp, 3),
                           torch_fp32_ms=round(t_torch, 3), int8_speedup_vs_ort_fp32=round(t_fp / t_int8, 2),
                           int8_speedup_vs_torch=round(t_torch / t_int8, 2))
                rows.append(row)
                print(f"{model_name:20s} batch {batch:2d}: ORT int8 {t_int8:8.2f} ms  ORT fp32 {t_fp:8.2f} ms  "
                      f"torch fp32 {t_torch:8.2f} ms  -> int8 {t_fp / t_int8:.2f}x vs ORT fp32, {t_torch / t_int8:.2f}x vs torch")
    env = environment()
    env["threads"] = args.threads
    env["cpu"] = cpu
    # one file per CPU kind (measuring on one keeps the other's); a non-default target gets its own file
    name = f"onnx_latency_{cpu['kind']}" + ("" if args.target_cpu == "avx2" else f"_target-{args.target_cpu}") + ".json"
    _save(dict(rows=rows, runs=args.runs, environment=env), name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["parity", "latency"])
    p.add_argument("--only", nargs="*", default=None, help="model names to run")
    p.add_argument("--iters", type=int, default=1000, help="qdrop iterations per unit (parity's qdrop row)")
    p.add_argument("--native-only", action="store_true", help="parity: skip the emulated-AVX2 rows even where QEMU exists")
    p.add_argument("--fresh", action="store_true", help="parity: measure every row again (default: keep the rows "
                   "already in onnx_parity.json)")
    p.add_argument("--work", default=str(ROOT / "runs" / "onnx_deploy"), help="where checkpoints go (reused)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-cpu", default="avx2", choices=("avx2", "vnni"), help="latency: the int8 model's x86 target")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (run_parity if args.what == "parity" else run_latency)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
