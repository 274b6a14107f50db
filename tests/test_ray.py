"""qdrop bench --ray: a sweep's runs as Ray tasks on a local Ray of 2 CPUs.

The sweeps are test_bench's tiny ones (a module: CNN on a generated image folder, naive or 2
iterations), so the accuracies are meaningless and only compared between the two runners. The
fault tests kill processes from inside the model factory of a `module:` model: a factory that
kills its own Ray worker the first time, and one that waits while a file exists so that a driver
can be killed while its runs are in flight.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from qdrop.bench import bench_main, read_results, run_sweep
# test_bench's fixtures: _env (autouse: offline, one thread) and tiny (an image folder and a tiny model file)
from test_bench import TINY_MODEL, _env, tiny, tiny_config, write_config  # noqa: F401

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'qdrop[ray]')")

# a factory that kills the process it runs in the first time (not the test's own process, where the
# driver builds each model once to check the config)
DIE_ONCE = '''
import os

def make_dying():
    calls = open({calls!r}, "a")
    calls.write(f"{{os.getpid()}}\\n")
    calls.close()
    if os.getpid() != {driver} and not os.path.exists({marker!r}):
        open({marker!r}, "w").close()
        os._exit(3)  # the worker dies mid-task, as if killed
    return make()
'''
# a factory that waits while HOLD exists, in a Ray task only (the driver checks the config with
# Ray not yet started), and says when it started
WAIT = '''
import os, sys, time

def make_slow():
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return make()
    open({started!r}, "a").close()
    deadline = time.time() + 120
    while os.path.exists({hold!r}) and time.time() < deadline:
        time.sleep(0.2)
    return make()
'''


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs in this process; run_sweep(ray=True) uses it as it is."""
    import logging

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    print(f"\nray.init(num_cpus=2): {time.perf_counter() - t:.1f} s")
    yield ray
    ray.shutdown()


def model_file(tiny, name: str, source: str) -> str:
    path = tiny["base"] / f"{name}.py"
    path.write_text(TINY_MODEL + source)
    return str(path)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qdrop: error:")
    return lines[0]


# ---- bad input ------------------------------------------------------------------------------

def test_ray_missing_is_one_line_error(tiny, tmp_path, monkeypatch, capsys):
    from qdrop.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out"))
    assert main(["bench", str(path), "--ray", "--no-progress"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "pip install 'qdrop[ray]'" in line
    assert not (tmp_path / "out").exists()


@needs_ray
def test_unanswered_address_is_one_line_error(tiny, tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out"))
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        t = time.perf_counter()
        assert bench_main([str(path), "--ray", address, "--no-progress"]) == 2
        assert time.perf_counter() - t < 30
        line = one_line_error(capsys.readouterr().err)
        assert address in line and "does not answer" in line
        assert not (tmp_path / "out").exists()  # nothing written, not even the folder


# ---- running --------------------------------------------------------------------------------

VOLATILE = {"seconds", "wall_seconds", "ms_per_iter", "started", "finished", "peak_memory", "process_peak", "fp_reused"}


def stable(value):
    """A record without its timings and memory peaks (and fp_reused: runs submitted together each evaluate the FP model)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


@needs_ray
def test_same_records_as_local_runner(tiny, tmp_path, local_ray, capsys):
    cfg = tiny_config(tiny, tmp_path / "local")
    local_path = write_config(tmp_path / "local.yaml", cfg)
    ray_path = write_config(tmp_path / "ray.yaml", dict(cfg, out=str(tmp_path / "ray")))
    t = time.perf_counter()
    here = run_sweep(local_path, progress=False)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    assert bench_main([str(ray_path), "--ray", "--no-progress"]) == 0
    t_ray = time.perf_counter() - t
    out = capsys.readouterr().out
    assert "2 ran (0 failed), 0 already done" in out
    with capsys.disabled():
        print(f"\ntiny sweep, 2 runs: local {t_local:.1f} s, Ray tasks {t_ray:.1f} s (Ray already started)")
    local = {r["run_id"]: r for r in read_results(tmp_path / "local")}
    remote = {r["run_id"]: r for r in read_results(tmp_path / "ray")}
    assert set(local) == set(remote) == {r.run_id for r in here["runs"]}
    for rid, rec in remote.items():
        assert rec["status"] == "ok"
        assert stable(rec) == stable(local[rid])
        assert (tmp_path / "ray" / rec["out_dir"] / "model.pt").exists()  # the task wrote its own run folder
    assert {r["config"]["algo"]: r["metrics"]["iters"] for r in remote.values()} == {"naive": 0, "qdrop": 2}
    # resume: a second invocation has nothing to do and does not even reach Ray
    assert bench_main([str(ray_path), "--ray", "nowhere:1", "--no-progress"]) == 0
    assert "0 ran (0 failed), 2 already done" in capsys.readouterr().out
    assert len(read_results(tmp_path / "ray")) == 2


@needs_ray
def test_killed_worker_is_retried_and_recorded_once(tiny, tmp_path, local_ray):
    calls, marker = tmp_path / "calls.txt", tmp_path / "died"
    source = DIE_ONCE.format(calls=str(calls), marker=str(marker), driver=os.getpid())
    cfg = tiny_config(tiny, tmp_path / "out", algo=["naive"])
    cfg["defaults"]["model"] = f"module:{model_file(tiny, 'dying_model', source)}:make_dying"
    path = write_config(tmp_path / "c.yaml", cfg)
    s = run_sweep(path, progress=False, ray=True)
    assert s["ran"] == 1 and s["failed"] == 0, s["records"]
    assert marker.exists()  # a worker died in this run ...
    workers = set(calls.read_text().split()) - {str(os.getpid())}
    assert len(workers) >= 2  # ... and another one ran it again
    (rec,) = read_results(tmp_path / "out")
    assert rec["status"] == "ok" and not rec.get("recovered") and rec["metrics"]["quant"] is not None


@needs_ray
def test_killed_driver_then_rerun_no_duplicate_or_lost_rows(tiny, tmp_path, local_ray):
    """A `qdrop bench --ray` (its own local Ray) killed with SIGKILL while runs are in flight; the
    rerun records each run exactly once."""
    hold, started = tmp_path / "hold", tmp_path / "slow_started"
    hold.touch()
    slow = model_file(tiny, "slow_model", WAIT.format(hold=str(hold), started=str(started)))
    cfg = tiny_config(tiny, tmp_path / "out", algo=["naive"], bits=["w4a4", "w8a8"],
                      model=[tiny["model"], f"module:{slow}:make_slow"])
    path = write_config(tmp_path / "c.yaml", cfg)
    results = tmp_path / "out" / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a new local Ray, not this one
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qdrop.bench", "bench", str(path), "--ray", "--no-progress"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (started.exists() and results.exists() and results.read_text().count("\n") >= 1):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.time() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, while a slow run waits in its task
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray is still there (Ray ends it too)
    before = read_results(tmp_path / "out")
    assert 1 <= len(before) < 4 and all(r["status"] == "ok" for r in before)
    hold.unlink()
    s = run_sweep(path, progress=False, ray=True)
    assert s["failed"] == 0 and s["ran"] + len(before) == 4
    rows = read_results(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert Counter(r["run_id"] for r in rows) == Counter({r.run_id: 1 for r in s["runs"]})
    lines = results.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["run_id"] for line in lines)  # no torn or extra line
