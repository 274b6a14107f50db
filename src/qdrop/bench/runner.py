"""`qdrop bench CONFIG.yaml`: run a sweep, one JSON line per run in RESULTS_DIR/results.jsonl.

Layout of a results folder::

    RESULTS_DIR/sweep.json        the sweep's name, config and config hash (a folder holds one sweep)
    RESULTS_DIR/results.jsonl     one record per finished or failed run, appended with flush + fsync
    RESULTS_DIR/runs/<run_id>/    the run's own output (model.pt, config.json, recon.json, metrics.json;
                                  recon_state.pt while it reconstructs, so a killed run resumes mid-way;
                                  model.onnx and parity.json with `deploy: onnxruntime`)

A run whose latest record has status "ok" is skipped; failed runs are retried by the next
invocation. A finished run of a reconstruction algorithm whose definition (the stages its name stands for,
kept in the record) has changed since is "stale" and runs again. With `deploy: onnxruntime`, a finished run whose record has no deployment (or a failed
one) is exported and scored again from its model.pt, without quantizing it again. With `--ray`, the
pending runs are Ray tasks instead (ray_runner.py); the planning, the lock and the records stay
here, written by this process alone. Exit status of
bench_main: 0 every selected run is done, 1 some run or deployment failed, 2 the config or the
command line is invalid (nothing ran).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from .config import (ConfigError, Run, Sweep, check_paths, filter_runs, is_nlp, job_of, load_sweep, parse_assignments,
                     same_sweep)
from ..errors import QdropError
from ..io import PeakMemory, append_line, atomic_write_json, environment, git_info, package_versions, torch_threads

SCHEMA = 1
RESULTS = "results.jsonl"
SWEEP = "sweep.json"
CHECKPOINT = "model.pt"
ONNX = "model.onnx"

# Layer ops of ONNX Runtime's optimised graph that compute in float: a layer still one of these
# after ORT's QDQ fusion was dequantized and run in float, not on an integer kernel.
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
# Integer kernels that do a layer's multiply-accumulate (QLinearAdd, QLinearGlobalAveragePool, ...
# are integer too but are no layers: a graph with only those still ran its layers in float).
INTEGER_LAYER_OPS = ("QLinearConv", "NhwcQLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                     "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
LATENCY_BATCHES = (1, 32)
LATENCY_WARMUP = 3
LATENCY_RUNS = 20


class SweepRefused(QdropError, RuntimeError):
    """The results folder belongs to another sweep (use --force), or another process holds it."""


# ---- results folder ----------------------------------------------------------------------

def read_results(results_dir: str | Path, warn: bool = True) -> list[dict]:
    """Every record of RESULTS_DIR/results.jsonl, in order. A line cut short by a kill is skipped
    (with a warning): its run counts as not done, so the next `qdrop bench` runs it again."""
    path = Path(results_dir) / RESULTS
    if not path.exists():
        return []
    records, torn = [], 0
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1  # a partial line from an interrupted write
            continue
        if isinstance(rec, dict) and "run_id" in rec:
            records.append(rec)
    if torn and warn:
        print(f"qdrop: warning: skipped {torn} unreadable line(s) of {path} (a write cut short by a kill); "
              "`qdrop bench` reruns the runs they belonged to", file=sys.stderr)
    return records


def latest_records(records: list[dict]) -> dict[str, dict]:
    """run_id -> its latest record, except that an ok record is never replaced by a later failure."""
    out: dict[str, dict] = {}
    for r in records:
        prev = out.get(r["run_id"])
        if prev is not None and prev.get("status") == "ok" and r.get("status") != "ok":
            continue
        out[r["run_id"]] = r
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _claim(results_dir: Path, sweep: Sweep, force: bool) -> None:
    """Write sweep.json, or check that the folder was written by this same config."""
    path = results_dir / SWEEP
    info = dict(name=sweep.name, config_hash=sweep.config_hash, config=sweep.config, source=sweep.source)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if same_sweep(old, sweep.config_hash):
            return
        if not force:
            raise SweepRefused(
                f"{results_dir} holds results of another sweep config ({old.get('name')!r}, hash {old.get('config_hash')}; "
                f"this one is {sweep.name!r}, hash {sweep.config_hash}): use another out folder, or --force to add to it")
        info["history"] = old.get("history", []) + [{k: old.get(k) for k in ("name", "config_hash", "created")}]
    info["created"] = _now()
    atomic_write_json(path, info, indent=1)


@contextlib.contextmanager
def _lock(results_dir: Path):
    """One sweep process per results folder at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    f = open(results_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepRefused(f"another qdrop bench process is writing to {results_dir}") from None
        yield
    finally:
        f.close()


# ---- one run ------------------------------------------------------------------------------

def _fp_key(c: dict) -> str:
    """What the FP score depends on: runs with the same key share one FP evaluation."""
    dev = (c.get("device") or "auto").split(":")[0]
    if is_nlp(c):
        return json.dumps(["nlp", c["model"], c.get("task"), c.get("data"), c.get("window"), c.get("max_windows"), dev])
    return json.dumps([c["model"], c.get("data"), c.get("eval_limit"), c.get("pretrained"), c.get("weights"), dev])


def _unit_curves(run_dir: Path) -> list | None:
    path = run_dir / "recon.json"
    if not path.exists():
        return None
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    keys = ("unit", "kind", "iters", "seconds", "ms_per_iter", "final_loss", "curve", "curve_total")
    curves = []
    for u in rep.get("unit_reports", []):
        curve = {k: u.get(k) for k in keys}
        if "distribution_correction" in u:  # PD-Quant's correction runs before the loop, which `seconds` times
            curve["dc_seconds"] = u["distribution_correction"]["seconds"]
        curves.append(curve)
    return curves


def _call_vision(c: dict, run_dir: Path, fp_top1, progress: bool) -> dict:
    from ..pipeline import run_quantize

    return run_quantize(job_of(c), out=run_dir, progress=progress, fp_top1=fp_top1)


def _call_nlp(c: dict, run_dir: Path, fp, progress: bool) -> dict:
    from ..nlp_pipeline import run_nlp_quantize as fn

    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in c.items() if k in params and k not in ("out", "progress", "fp")}
    kwargs["out"] = run_dir
    if "progress" in params:
        kwargs["progress"] = progress
    if fp is not None and "fp" in params:
        kwargs["fp"] = fp
    result = fn(**kwargs)
    result = dict(result) if isinstance(result, dict) else {"result": result}
    result["_fp_reused"] = "fp" in kwargs
    return result


# ---- deployment ---------------------------------------------------------------------------

def kernel_kind(optimized_ops: dict, integer_nodes: dict) -> tuple[int, str]:
    """(layers ORT ran in float, 'integer' | 'mixed' | 'float') from op counts of its optimised graph."""
    float_layers = sum(optimized_ops.get(op, 0) for op in FLOAT_COMPUTE_OPS)
    integer_layers = sum(integer_nodes.get(op, 0) for op in INTEGER_LAYER_OPS)
    if not integer_layers:
        return float_layers, "float"
    return float_layers, "integer" if float_layers == 0 else "mixed"


def _test_images(c: dict, n: int):
    """n images of the run's test split (repeated when the split is smaller), as float32 numpy."""
    import numpy as np

    from ..data import load_split
    from ..models import load_model

    _, info = load_model(c["model"], data=c["data"], pretrained=False)  # only the dataset and preprocessing
    split = load_split(info.dataset, "test", data=c["data"], preprocess=info.preprocess, limit=min(n, c["eval_limit"] or n))
    x = split.x[:n]  # a tensor also where the split is decoded lazily
    reps = -(-n // len(x))
    return np.ascontiguousarray(x.repeat(reps, *([1] * (x.dim() - 1)))[:n].numpy(), dtype=np.float32)


def ort_latency(onnx_path: Path, c: dict) -> dict:
    """Median ms per batch of ONNX Runtime (CPU) on the run's test images, after warm-up runs."""
    from ..export.check import ort_session

    threads = c.get("threads") or 2
    sess = ort_session(onnx_path, threads=threads)
    name = sess.get_inputs()[0].name
    x = _test_images(c, max(LATENCY_BATCHES))
    out = dict(threads=threads, warmup=LATENCY_WARMUP, runs=LATENCY_RUNS)
    for batch in LATENCY_BATCHES:
        feed = {name: x[:batch]}
        for _ in range(LATENCY_WARMUP):
            sess.run(None, feed)
        times = []
        for _ in range(LATENCY_RUNS):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        out[f"b{batch}_ms"] = round(1000 * statistics.median(times), 3)
    return out


def _deploy_onnxruntime(c: dict, run_dir: Path) -> dict:
    from ..pipeline import run_export

    onnx_path = run_dir / ONNX
    # check_data=True: the model's default data, where the run itself had no data path;
    # target_cpu: the export refuses weights that would saturate on the CPUs the run was made for
    res = run_export(run_dir, onnx_path, check_data=c["data"] if c["data"] is not None else True, data=c["data"],
                     eval_limit=c["eval_limit"], progress=False, target_cpu=c["target_cpu"])
    p = res["parity"]
    integer = p.get("integer_nodes") or {}
    float_layers, kernels = kernel_kind(p.get("optimized_ops") or {}, integer)
    return dict(ort_version=p.get("ort_version"), graph_optimization_level=p.get("graph_optimization_level"),
                target_cpu=res.get("target_cpu"), low_bit_container=res.get("low_bit_container"),
                samples=p.get("samples"), deployed_top1=p.get("ort_top1"), sim_top1=p.get("sim_top1"),
                agreement=p.get("agreement"), max_abs_diff=p.get("max_abs_diff"), mean_abs_diff=p.get("mean_abs_diff"),
                integer_node_total=p.get("integer_node_total"), integer_nodes=integer,
                float_compute_nodes=float_layers, kernels=kernels, cpu=p.get("cpu"),
                u8s8_saturating_layers=p.get("u8s8_saturating_layers"), warning=res.get("warning"),
                latency_ms=ort_latency(onnx_path, c))


def deploy_run(c: dict, run_dir: Path) -> dict:
    """Export a finished vision run from its model.pt and score it in the runtime `c['deploy']` on
    the run's test images. Never raises: a failure is recorded as `error` (one line), so the
    simulated result is kept."""
    out = dict(runtime=c["deploy"])
    t = time.perf_counter()
    try:
        with torch_threads(c.get("threads")):
            out.update(_deploy_onnxruntime(c, run_dir))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded like a failed run: the message, and the traceback for a bug
        lines = str(err).strip().splitlines()
        out["error"] = f"{type(err).__name__}: {lines[0] if lines else ''}"
        out["traceback"] = traceback.format_exc()[-4000:]
    out["seconds"] = round(time.perf_counter() - t, 2)
    out["finished"] = _now()
    return out


def _drop_checkpoint(run_dir: Path) -> None:
    """keep_checkpoint: false: the model goes in both its forms (parity.json and the record stay)."""
    for name in (CHECKPOINT, ONNX):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


def _deploy_pending(run: Run, record: dict | None) -> bool:
    """A finished run whose record lacks the deployment its config asks for, or whose deployment failed."""
    want = run.config.get("deploy")
    if not want or run.kind != "vision" or record is None or record.get("status") != "ok":
        return False
    got = record.get("deploy") or {}
    return got.get("runtime") != want or "error" in got


def deploy_record(run: Run, record: dict, results_dir: Path) -> dict:
    """The record of a finished run with its deployment added (the run is not quantized again)."""
    c = run.config
    run_dir = results_dir / "runs" / run.run_id
    new = dict(record, config={**record["config"], "deploy": c["deploy"]}, deploy=deploy_run(c, run_dir))
    if not c.get("keep_checkpoint", True) and "error" not in new["deploy"]:
        _drop_checkpoint(run_dir)
    return new


def _deploy_note(dep: dict | None) -> str:
    if not dep:
        return ""
    if "error" in dep:
        return f"; deploy FAILED: {dep['error'][:300]}"
    return (f"; {dep['runtime']} {dep.get('deployed_top1')} (agreement {dep.get('agreement')} %, "
            f"{dep.get('kernels')} kernels)")


def execute_run(run: Run, results_dir: Path, sweep_name: str, fp_top1: float | None = None, progress: bool = False) -> dict:
    """Run one configuration; return its record (status 'ok' or 'failed', never raises on a run error)."""
    c = run.config
    run_dir = results_dir / "runs" / run.run_id
    record = dict(schema=SCHEMA, run_id=run.run_id, sweep=sweep_name, kind=run.kind, config=c,
                  out_dir=str(Path("runs") / run.run_id), started=_now(), git=git_info(), versions=package_versions())
    algorithm = algorithm_definition(c)
    if algorithm is not None:  # what the algorithm's name ran, for the next plan to compare (_plan)
        record["algorithm"] = algorithm
    t0 = time.perf_counter()
    metrics = None
    with PeakMemory() as mem, torch_threads(c.get("threads")):
        try:
            done = run_dir / "metrics.json"
            if done.exists():
                # finished before a kill that came ahead of its results line: take its metrics
                metrics = json.loads(done.read_text())
                record["recovered"] = True
            elif run.kind == "vision":
                metrics = _call_vision(c, run_dir, fp_top1, progress)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                metrics = _call_nlp(c, run_dir, fp_top1, progress)
            status, error = "ok", None
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded, the sweep goes on
            status = "failed"
            error = dict(type=type(err).__name__, message=str(err), traceback=traceback.format_exc()[-4000:])
        record["peak_memory"] = None if record.get("recovered") else mem.result()
    record["wall_seconds"] = round(time.perf_counter() - t0, 2)
    record["finished"] = _now()
    record["status"] = status
    if error:
        record["error"] = error
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if metrics is not None:
        metrics = dict(metrics)
        env = metrics.pop("environment", None)
        record["seconds"] = metrics.get("seconds")
        record["metrics"] = metrics
        reused = metrics.pop("_fp_reused", None)
        record["fp_reused"] = None if record.get("recovered") else (fp_top1 is not None) if reused is None else reused
        if env is not None:
            record["device"] = dict(env, used=_used_device(run_dir, c))
    if "device" not in record:
        record["device"] = dict(environment(), used=_used_device(run_dir, c))
    if run.kind == "vision":
        record["units"] = _unit_curves(run_dir)
        cfg = run_dir / "config.json"
        if cfg.exists():
            try:
                record["data_used"] = {k: v for k, v in json.loads(cfg.read_text()).items() if k in ("calib_data", "eval_data", "lam")}
            except json.JSONDecodeError:
                pass
    if status == "ok" and run.kind == "vision" and c.get("deploy"):
        record["deploy"] = deploy_run(c, run_dir)
    # a failed deployment keeps the checkpoint, so that the next invocation can deploy it again
    if status == "ok" and not c.get("keep_checkpoint", True) and "error" not in record.get("deploy", {}):
        _drop_checkpoint(run_dir)
    return record


def run_job(run: Run, results_dir: Path, sweep_name: str, fp_top1: float | None = None, progress: bool = False,
            recorded: dict | None = None) -> dict:
    """One pending run of a sweep, here or on a Ray worker: its record. recorded: the run's ok
    record, when it is pending only to be deployed (it is not quantized again)."""
    if recorded is not None:
        return deploy_record(run, recorded, results_dir)
    return execute_run(run, results_dir, sweep_name, fp_top1=fp_top1, progress=progress)


def _used_device(run_dir: Path, c: dict) -> str:
    cfg = run_dir / "config.json"
    if cfg.exists():
        with contextlib.suppress(Exception):
            return json.loads(cfg.read_text())["device"]
    if c.get("device"):
        return c["device"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- the sweep ----------------------------------------------------------------------------

def _varying_keys(runs: list[Run]) -> list[str]:
    keys = []
    for k in runs[0].config:
        if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1:
            keys.append(k)
    return keys


def plan_table(runs: list[Run], status: dict[str, str]) -> str:
    """The dry-run listing: one line per run with its status and the settings that vary."""
    keys = [k for k in ("model", "bits", "algo", "seed") if k in runs[0].config]
    keys += [k for k in _varying_keys(runs) if k not in keys]
    rows = [["status", "run_id", *keys]]
    for r in runs:
        rows.append([status.get(r.run_id, "pending"), r.run_id, *[str(r.config.get(k)) for k in keys]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def resolve_results_dir(sweep: Sweep, out: str | Path | None) -> Path:
    folder = out or sweep.out
    if not folder:
        raise ConfigError(f"{sweep.source or 'config'}: no results folder: set 'out' in the config or pass --out")
    return Path(folder).expanduser()


def algorithm_definition(c: dict) -> dict | None:
    """The reconstruction algorithm a run's `algo` names, as data (None: observers, transforms, no name)."""
    from ..recon.configs import ALGORITHMS, CANDIDATES, definition

    name = c.get("algo")
    return definition(name) if isinstance(name, str) and (name in ALGORITHMS or name in CANDIDATES) else None


def record_changes(rec: dict) -> list[str]:
    """What changed in a finished run's algorithm since it ran ([] when nothing did, or when the record is from
    before definitions were kept: nothing to compare). Ray workers write the definition of the qdrop they run."""
    from ..recon.configs import definition_changes

    if rec.get("status") != "ok" or not isinstance(rec.get("algorithm"), dict):
        return []
    return definition_changes(rec["algorithm"], algorithm_definition(rec.get("config") or {}) or {})


def stale_runs(selected: list, latest: dict[str, dict]) -> dict[str, list[str]]:
    """run_id -> what changed, for each selected finished run whose algorithm's definition differs from the one
    its record kept."""
    out = {}
    for r in selected:
        changes = record_changes(latest[r.run_id]) if r.run_id in latest else []
        if changes:
            out[r.run_id] = changes
    return out


def _supersede(run_dir: Path, old: dict) -> None:
    """A stale run's folder before it runs again: the old run's metrics.json would be taken as the new run's result
    (a kill's recovery), so it goes; a metrics.json the rerun itself wrote before a kill (other metrics than the old
    record's) stays and is recovered, and so does the rerun's state file (the engine refuses one written by another
    configuration). The old model.pt is overwritten by the new run."""
    path = run_dir / "metrics.json"
    try:
        written, recorded = json.loads(path.read_text()), old.get("metrics") or {}
        if isinstance(written, dict) and all(written.get(k) == v for k, v in recorded.items()):  # (records keep a part)
            path.unlink()
    except (OSError, ValueError):
        pass


def _plan(selected: list, results_dir: Path, limit: int | None, warn: bool = True):
    """What a sweep has left to do, from its results file: (latest records, status per run, runs
    only to deploy, runs that cannot be deployed, pending runs, number already done, stale runs: those
    finished under an earlier definition of their algorithm, which run again)."""
    latest = latest_records(read_results(results_dir, warn=warn))
    stale = stale_runs(selected, latest)
    done = {rid for rid, r in latest.items() if r.get("status") == "ok"} - stale.keys()
    # finished runs that still need their deployment: they are exported from their checkpoint, not
    # quantized again; a run whose checkpoint was deleted (keep_checkpoint: false) stays as recorded
    # (a stale run is quantized again, not only deployed)
    to_deploy = {r.run_id for r in selected if r.run_id not in stale and _deploy_pending(r, latest.get(r.run_id))}
    no_checkpoint = {rid for rid in to_deploy if not (results_dir / "runs" / rid / CHECKPOINT).exists()}
    to_deploy -= no_checkpoint
    status = {r.run_id: ("stale" if r.run_id in stale else "deploy" if r.run_id in to_deploy
                         else "done, no model.pt to deploy" if r.run_id in no_checkpoint
                         else "done" if r.run_id in done else "failed" if r.run_id in latest else "pending")
              for r in selected}
    pending = [r for r in selected if r.run_id not in done or r.run_id in to_deploy]
    if limit is not None:
        pending = pending[:limit]
    skipped = sum(1 for r in selected if r.run_id in done and r.run_id not in to_deploy)
    return latest, status, to_deploy, no_checkpoint, pending, skipped, stale


def run_sweep(config_path: str | Path, out: str | Path | None = None, dry_run: bool = False, only=None,
              limit: int | None = None, force: bool = False, set_values=None, progress: bool = True,
              verbose: bool = False, stream=None, ray: bool | str | None = None) -> dict:
    """Run (or, with dry_run, list) the sweep in `config_path`.

    only: {'model': 'cifar10_resnet20', 'algo': ['qdrop', 'brecq']} or 'model=a,algo=b|c';
    limit: run at most this many of the pending runs; force: write into a results folder made by
    another config; set_values: {'iters': 500} or 'iters=500' replaces defaults (or a grid key);
    ray: run the pending runs as Ray tasks: True or '' on a local Ray (the one this process already
    initialised, else a new one from ray.init()), or a cluster address ('auto', 'host:port', 'ray://...').
    Returns {'results_dir', 'runs' (selected), 'ran', 'skipped', 'failed', 'deployed' (finished runs only
    deployed now), 'deploy_failed', 'records', 'plan'}.
    Raises ConfigError (bad config, nothing ran), SweepRefused (folder of another sweep) or
    RayUnavailable (Ray not installed, or its cluster does not answer; nothing written).
    """
    stream = stream or sys.stdout
    use_ray = ray is not None and ray is not False
    if use_ray:
        from . import ray_runner

        ray_runner.require_ray()
    if isinstance(only, (str, list, tuple)):
        only = parse_assignments([only] if isinstance(only, str) else only, "--only")
    if isinstance(set_values, (str, list, tuple)):
        set_values = parse_assignments([set_values] if isinstance(set_values, str) else set_values, "--set")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"--limit must be a non-negative integer, got {limit!r}")
    sweep = load_sweep(config_path, set_values=set_values)
    results_dir = resolve_results_dir(sweep, out)
    selected = filter_runs(sweep.runs, only)
    if not dry_run:
        check_paths(selected, sweep.source)
    for w in sweep.warnings:
        print(f"warning: {w}", file=sys.stderr)

    latest, status, to_deploy, no_checkpoint, pending, skipped, stale = _plan(selected, results_dir, limit)
    summary = dict(results_dir=str(results_dir), runs=selected, plan=pending, skipped=skipped,
                   ran=0, failed=0, deployed=0, deploy_failed=0, records=[], config_hash=sweep.config_hash, stale=stale)
    if stale:
        algos = sorted({r.config.get("algo") for r in selected if r.run_id in stale})
        first = next(iter(stale.values()))
        print(f"note: {len(stale)} finished runs ({', '.join(algos)}) were recorded under an earlier definition of their "
              f"algorithm ({'; '.join(first[:3])}{'; ...' if len(first) > 3 else ''}); they "
              f"{'would run' if dry_run else 'run'} again, and their new records replace the old ones in reports",
              file=sys.stderr)

    if dry_run:
        foreign = ""
        sweep_json = results_dir / SWEEP
        if sweep_json.exists():
            with contextlib.suppress(Exception):
                old = json.loads(sweep_json.read_text())
                if not same_sweep(old, sweep.config_hash):
                    foreign = f"  (note: {results_dir} holds another config's results; a real run needs --force)"
        n_done = sum(1 for s in status.values() if s.startswith("done"))
        deploys = f", {len(to_deploy)} of them only to deploy" if to_deploy else ""
        print(f"sweep {sweep.name}: {len(selected)} runs selected of {len(sweep.runs)} ({n_done} done, "
              f"{len(pending)} would run{deploys}{f', limit {limit}' if limit is not None else ''}) -> {results_dir}{foreign}",
              file=stream)
        print(plan_table(selected, status), file=stream)
        return summary

    if no_checkpoint:
        print(f"note: {len(no_checkpoint)} finished runs cannot be deployed: their model.pt was deleted "
              f"(keep_checkpoint: false); run them again in another results folder to deploy them", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        # Ray is reached before anything is written: a cluster that does not answer leaves no trace
        address = ray if isinstance(ray, str) and ray else None
        cluster = stack.enter_context(ray_runner.session(address)) if use_ray and pending else None
        results_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_lock(results_dir))
        _claim(results_dir, sweep, force)
        # planned again under the lock: another process may have finished runs since the first read
        latest, status, to_deploy, no_checkpoint, pending, skipped, stale = _plan(selected, results_dir, limit, warn=False)
        for run in pending:
            if run.run_id in stale:
                _supersede(results_dir / "runs" / run.run_id, latest[run.run_id])
        summary.update(plan=pending, skipped=skipped, stale=stale)
        fp_cache = {}
        for r in latest.values():
            if r.get("status") == "ok" and (r.get("metrics") or {}).get("fp") is not None:
                fp_cache.setdefault(_fp_key(r["config"]), r["metrics"]["fp"])
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), desc=f"bench {sweep.name}", unit="run", disable=not progress, dynamic_ncols=True)

        def job(run: Run) -> dict:
            """run_job's arguments for a pending run, as of now (the FP score of a run before it)."""
            if run.run_id in to_deploy:
                return dict(recorded=latest[run.run_id])
            return dict(fp_top1=fp_cache.get(_fp_key(run.config)), progress=verbose)

        def here():
            for run in pending:
                bar.set_postfix_str(run.run_id)
                yield run, run_job(run, results_dir, sweep.name, **job(run))

        finished = here() if cluster is None else ray_runner.run_tasks(cluster, pending, job, results_dir, sweep.name,
                                                                       run_job, SCHEMA, _now)
        stack.enter_context(contextlib.closing(finished))  # a stop cancels the Ray tasks still running
        for run, rec in finished:  # as each run finishes: only this process writes results.jsonl
            if cluster is not None:
                bar.set_postfix_str(run.run_id)
            append_line(results_dir / RESULTS, json.dumps(rec, default=str))
            summary["records"].append(rec)
            if run.run_id in to_deploy:
                summary["deployed"] += 1
            else:
                summary["ran"] += 1
            if "error" in rec.get("deploy", {}):
                summary["deploy_failed"] += 1
            if rec["status"] == "ok":
                m = rec.get("metrics") or {}
                if m.get("fp") is not None:
                    fp_cache.setdefault(_fp_key(run.config), m["fp"])
                if run.run_id in to_deploy:
                    msg = (f"deploy {run.label()}: simulated {m.get('quant')}{_deploy_note(rec['deploy'])} "
                           f"({rec['deploy'].get('seconds', 0):.0f} s)")
                else:
                    msg = (f"ok     {run.label()}: FP {m.get('fp')} -> {m.get('quant')} ({rec['wall_seconds']:.0f} s)"
                           f"{_deploy_note(rec.get('deploy'))}")
            else:
                summary["failed"] += 1
                msg = f"FAILED {run.label()}: {rec['error']['type']}: {rec['error']['message'][:300]}"
            bar.write(msg, file=stream)
            bar.update(1)
        bar.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdrop bench", description="Run a sweep of quantization runs from a YAML config; "
                                "one JSON line per run in RESULTS_DIR/results.jsonl (finished runs are skipped).")
    p.add_argument("config", help="sweep YAML (see docs/benchmark_protocol.md)")
    p.add_argument("--out", default=None, help="results folder (default: the config's 'out')")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    p.add_argument("--only", action="append", default=[], metavar="KEY=V[|V..][,KEY=V]",
                   help="run only the matching runs, e.g. model=cifar10_resnet20,algo=qdrop|brecq (repeatable: all must match)")
    p.add_argument("--limit", type=int, default=None, help="run at most this many pending runs")
    p.add_argument("--force", action="store_true", help="write into a results folder made by another config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a default (or a grid key) of the config, e.g. --set iters=500 (changes the config hash, "
                   "so the results go to another folder; the runner-only threads, keep_checkpoint and deploy do not)")
    p.add_argument("--verbose", "-v", action="store_true", help="show each run's own progress bars")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the runs")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the pending runs as Ray tasks (one GPU each where the cluster has GPUs), on a new local "
                        "Ray or on the cluster at ADDRESS (auto, host:port, ray://host:port); needs "
                        "pip install 'qdrop[ray]' and a filesystem the nodes share (put --ray after CONFIG)")
    return p


def bench_main(argv=None) -> int:
    """`qdrop bench`: 0 all selected runs done, 1 some run or deployment failed, 2 invalid config or refused folder."""
    args = build_parser().parse_args(argv)
    try:
        summary = run_sweep(args.config, out=args.out, dry_run=args.dry_run, only=args.only or None, limit=args.limit,
                            force=args.force, set_values=args.set or None, progress=not args.no_progress,
                            verbose=args.verbose, ray=args.ray)
    except QdropError as err:  # ConfigError, SweepRefused, WriteError, ...
        print(f"qdrop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdrop: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    deployed = f", {summary['deployed']} finished runs deployed" if summary["deployed"] else ""
    deploy_failed = f", {summary['deploy_failed']} deployments failed" if summary["deploy_failed"] else ""
    print(f"{summary['ran']} ran ({summary['failed']} failed), {summary['skipped']} already done{deployed}{deploy_failed} -> "
          f"{Path(summary['results_dir']) / RESULTS}")
    return 1 if summary["failed"] or summary["deploy_failed"] else 0

