"""Fault injection: qdrop survives kill -9, a full disk, corrupted files and a concurrent sweep.

Every test drives the real command line (`python -m qdrop.cli ...`) as a subprocess on the shared
CIFAR-10 data with tiny settings (ResNet-20, 64 calibration images, 20 iterations per unit, 200 test
images, one thread), injects one fault and checks what the user is promised:

* a killed `qdrop quantize` / `qdrop bench` / `qdrop export` is finished by rerunning the same
  command, with exactly the result of an uninterrupted run and no temporary file left behind;
* a file is always either absent or complete (written to a temporary name and renamed);
* a failure the user can fix (full disk, corrupted or unsafe file, a second sweep on the same
  folder) is one line 'qdrop: error: ...' and a non-zero exit, never a Python traceback.

The kill points are found by polling the output folder and the process's stderr (tqdm's progress
text). Two faults cannot be hit by polling alone and are armed inside the process instead, by the
small launcher LAUNCHER below (it patches one library function, then runs qdrop.cli.main):
"park half-way through writing file X" (the kill then lands while X's temporary file is half
written) and "pause before taking the sweep's lock" (a second `qdrop bench` that read the results
before the first one finished).
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR = SHARED / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "test.npz").exists(), reason="needs ../shared/data/cifar10")
pytestmark = [needs_cifar, pytest.mark.shared_data]

TIMEOUT = 300  # seconds for any one qdrop process (they take 3-10 s here)
SMALL = ["--calib", "64", "--iters", "20", "--eval-limit", "200", "--batch-size", "16", "--seed", "0", "--threads", "1"]
QUANTIZE = ["quantize", "--model", "cifar10_resnet20", "--data", str(CIFAR), "--bits", "w4a4", "--algo", "qdrop", *SMALL]
FSIZE_LIMIT = 64 * 1024  # bytes: config.json fits, model.pt (1.4 MB), recon_state.pt and model.onnx (0.3 MB) do not
BAR = re.compile(r"\d+%\|")  # a tqdm progress line
RECON_BAR = re.compile(r"qdrop:\s+\d+%\|")  # the reconstruction loop's progress bar (desc = algorithm name)

LAUNCHER = r'''
"""Runs qdrop.cli.main with one fault armed by the environment (tests/test_faults.py)."""
import io
import os
import sys
import time


def _park(marker):
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    while True:  # until the test kills this process with SIGKILL
        time.sleep(60)


def _name(target):
    if isinstance(target, (str, bytes, os.PathLike)):
        return os.path.basename(os.fsdecode(target))
    return os.path.basename(str(getattr(target, "name", "")))


def _write_half(target, data):
    half = data[: len(data) // 2]
    if hasattr(target, "write"):
        target.write(half)
        target.flush()
        os.fsync(target.fileno())
    else:
        with open(target, "wb") as f:
            f.write(half)
            f.flush()
            os.fsync(f.fileno())


# QDROP_FAULT_STALL=torch|file:NAME:N  park half-way through the Nth write of a file whose name contains
# NAME: torch: the Nth torch.save to it (to a path or a file object); file: the Nth open() of it for
# writing (any writer that goes through Python's open, e.g. onnx.save or qdrop's own atomic writes)
stall = os.environ.get("QDROP_FAULT_STALL")
if stall:
    kind, name, nth = stall.split(":")
    nth, seen, marker = int(nth), [0], os.environ["QDROP_FAULT_MARKER"]

    def _hit(target):
        if name in _name(target):
            seen[0] += 1
            return seen[0] == nth
        return False

    if kind == "torch":
        import torch

        _torch_save = torch.save

        def save(obj, f, *args, **kwargs):
            if _hit(f):
                buf = io.BytesIO()
                _torch_save(obj, buf, *args, **kwargs)
                _write_half(f, buf.getvalue())
                _park(marker)
            return _torch_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        import builtins

        _open = builtins.open

        class _HalfWriter:
            """The first write puts half of its bytes on disk, then the process parks."""

            def __init__(self, f):
                self._f = f

            def write(self, data):
                _write_half(self._f, data)
                _park(marker)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __getattr__(self, attr):
                return getattr(self._f, attr)

        def open_(file, mode="r", *args, **kwargs):
            f = _open(file, mode, *args, **kwargs)
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax") and _hit(file):
                return _HalfWriter(f)
            return f

        builtins.open = open_

# QDROP_FAULT_LOCK_DIR=DIR: before the first exclusive flock of a file in DIR, create
# QDROP_FAULT_READY and wait until QDROP_FAULT_GO exists (a process descheduled right there)
lock_dir = os.environ.get("QDROP_FAULT_LOCK_DIR")
if lock_dir:
    import fcntl

    _flock, gated = fcntl.flock, [False]

    def flock(fd, op):
        fileno = fd if isinstance(fd, int) else fd.fileno()
        path = os.readlink(f"/proc/self/fd/{fileno}")
        if not gated[0] and op & fcntl.LOCK_EX and os.path.dirname(path) == os.path.realpath(lock_dir):
            gated[0] = True
            open(os.environ["QDROP_FAULT_READY"], "w").close()
            deadline = time.time() + 300
            while not os.path.exists(os.environ["QDROP_FAULT_GO"]) and time.time() < deadline:
                time.sleep(0.02)
        return _flock(fd, op)

    fcntl.flock = flock

from qdrop.cli import main

sys.exit(main(sys.argv[1:]))
'''


# ---- running qdrop as a subprocess -----------------------------------------------------------

@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


_LIVE: list = []


@pytest.fixture(autouse=True)
def _no_stragglers():
    """Whatever a failing test leaves running (a parked or stopped qdrop) is killed."""
    yield
    while _LIVE:
        proc = _LIVE.pop()
        if proc.p.poll() is None:
            proc.p.send_signal(signal.SIGCONT)
            proc.p.kill()
            proc.p.wait()


def _env(**extra) -> dict:
    return {**os.environ, "QDROP_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def fsize_limit(nbytes: int):
    """preexec_fn: files the child writes cannot grow past nbytes; the write fails with EFBIG
    (SIGXFSZ ignored), as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


class Qdrop:
    """One `qdrop ...` process; stdout and stderr go to files in `logs` (never the output folder)."""

    def __init__(self, args, logs: Path, name: str, env: dict | None = None, preexec_fn=None, launcher: Path | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.name, self.out_path, self.err_path = name, logs / f"{name}.stdout", logs / f"{name}.stderr"
        entry = [str(launcher)] if launcher else ["-m", "qdrop.cli"]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen([sys.executable, *entry, *map(str, args)], stdout=out, stderr=err,
                                      env=env or _env(), preexec_fn=preexec_fn, cwd=logs)
        _LIVE.append(self)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, cond, what: str, timeout: float = TIMEOUT, watch=None) -> None:
        """Poll until cond() holds; fail if the process exits first (the fault point was missed)."""
        deadline = time.monotonic() + timeout
        while True:
            if watch is not None:
                watch()
            if cond():
                return
            if self.p.poll() is not None:
                pytest.fail(f"{self.name}: qdrop exited ({self.p.returncode}) before {what}; stderr:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {what} within {timeout} s; stderr:\n{self.stderr()[-3000:]}")
            time.sleep(0.005)

    def kill9(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=60)

    def finish(self, timeout: float = TIMEOUT) -> Result:
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            pytest.fail(f"{self.name}: qdrop did not finish within {timeout} s; stderr:\n{self.stderr()[-3000:]}")
        return Result(self.p.returncode, self.out_path.read_text(errors="replace"), self.stderr())


def qdrop(args, logs: Path, name: str, **kw) -> Result:
    return Qdrop(args, logs, name, **kw).finish()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "qdrop_with_fault.py"
    path.write_text(LAUNCHER)
    return path


# ---- what the results must look like --------------------------------------------------------

def message_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress lines (what is left after each carriage return)."""
    lines = []
    for raw in stderr.splitlines():
        line = raw.rsplit("\r", 1)[-1].strip()
        said = re.search(r"qdrop: (error|warning):", line)
        if said and BAR.search(line[: said.start()]):  # printed right after a bar, on the bar's line
            line = line[said.start():]
        if line and not BAR.search(line):
            lines.append(line)
    return lines


def assert_one_line_error(res: Result, *words: str) -> str:
    """Non-zero exit, no traceback, exactly one 'qdrop: error:' line naming `words`; returns it."""
    assert "Traceback" not in res.stderr, f"a traceback instead of a one-line error (exit {res.rc}):\n{res.stderr[-4000:]}"
    assert res.rc != 0, f"exit 0 although it failed; stderr:\n{res.stderr[-2000:]}"
    errors = [line for line in message_lines(res.stderr) if line.startswith("qdrop: error:")]
    assert len(errors) == 1, f"expected one 'qdrop: error:' line (exit {res.rc}):\n{res.stderr[-3000:]}"
    for w in words:
        assert w in errors[0], f"{w!r} not named in: {errors[0]}"
    return errors[0]


def assert_ok(res: Result) -> None:
    assert res.rc == 0 and "Traceback" not in res.stderr, f"exit {res.rc}; stderr:\n{res.stderr[-4000:]}"


def leftovers(folder: Path, allow=()) -> list[str]:
    """Partial or temporary files: names starting with '.' or containing '.tmp' (anywhere below folder)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (p.name.startswith(".") or ".tmp" in p.name) and p.name not in allow)


def load_pt(path: Path):
    """A .pt file written by the run under test: qdrop writes plain data, so weights_only holds."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_complete_outputs(out: Path) -> None:
    """Every output file present is complete: JSON parses, checkpoints load."""
    for name in ("config.json", "recon.json", "metrics.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())
    for name in ("model.pt", "recon_state.pt"):
        if (out / name).exists():
            load_pt(out / name)


def assert_same_result(out: Path, ref: dict) -> None:
    """metrics.json's scores and every tensor of model.pt equal the uninterrupted run's."""
    m = json.loads((out / "metrics.json").read_text())
    assert (m["quant"], m["fp"]) == (ref["metrics"]["quant"], ref["metrics"]["fp"])
    sd = load_pt(out / "model.pt")["state_dict"]
    assert sd.keys() == ref["state_dict"].keys()
    different = [k for k, v in sd.items() if not torch.equal(v, ref["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"
    assert not (out / "recon_state.pt").exists()


def assert_onnx_complete(path: Path) -> None:
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


class OnnxWatch:
    """Called while polling: whenever model.onnx is there (a new version of it), it must load."""

    def __init__(self, path: Path):
        self.path, self.seen = path, set()

    def __call__(self):
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self.seen:
            self.seen.add(key)
            assert_onnx_complete(self.path)


# ---- the uninterrupted reference --------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """`qdrop quantize` without faults, same command and seed: what every resumed run must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    out = base / "run"
    assert_ok(qdrop([*QUANTIZE, "--out", out], base / "logs", "reference"))
    assert leftovers(out) == []
    return dict(out=out, metrics=json.loads((out / "metrics.json").read_text()),
                state_dict=load_pt(out / "model.pt")["state_dict"])


def checkpoint_dir(reference, folder: Path) -> Path:
    """A folder holding a copy of the reference model.pt (for eval / export)."""
    folder.mkdir(parents=True)
    shutil.copy2(reference["out"] / "model.pt", folder / "model.pt")
    return folder


# ---- 1. kill -9 during qdrop quantize ------------------------------------------------------------

# CI's fast subset kills each phase that leaves something to resume; the kill during calibration (nothing written
# but config.json: the rerun starts over) runs with `make test-all`
@pytest.mark.parametrize("phase", [pytest.param("calibration", marks=pytest.mark.slow), "reconstruction", "evaluation"])
def test_quantize_killed_then_rerun_matches_uninterrupted_run(phase, reference, tmp_path):
    """Fault: SIGKILL of `qdrop quantize` during calibration (config.json written, no reconstruction
    bar yet), during reconstruction (recon_state.pt exists: at least one unit finished, recon.json
    not yet written) or during evaluation ('eval fp' or 'eval quant' progress on stderr, metrics.json
    not yet written).
    Required: every file left is complete; rerunning the same command exits 0 with the same
    metrics.json scores and a model.pt equal tensor for tensor to the uninterrupted run's, and no
    temporary or partial file remains in the output folder."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = Qdrop([*QUANTIZE, "--out", out], logs, f"killed-{phase}")
    if phase == "calibration":
        proc.wait_for(lambda: (out / "config.json").exists(), "config.json (data loaded, calibration next)")
        time.sleep(0.3)  # into prepare + calibrate (about 1.5 s here)
        assert not RECON_BAR.search(proc.stderr()), "missed calibration: reconstruction had started"
    elif phase == "reconstruction":
        proc.wait_for(lambda: (out / "recon_state.pt").exists(), "recon_state.pt (a finished unit)")
    else:
        proc.wait_for(lambda: re.search(r"eval (fp|quant):", proc.stderr()), "'eval fp' / 'eval quant' progress on stderr")
    proc.kill9()
    # the kill landed in the intended phase
    if phase == "calibration":
        assert not RECON_BAR.search(proc.stderr()) and not (out / "recon_state.pt").exists()
    elif phase == "reconstruction":
        assert (out / "recon_state.pt").exists() and not (out / "recon.json").exists()
    assert not (out / "metrics.json").exists(), "the kill came after the run had finished"
    assert_complete_outputs(out)

    res = qdrop([*QUANTIZE, "--out", out], logs, f"rerun-{phase}")
    assert_ok(res)
    assert_same_result(out, reference)
    assert leftovers(out) == []


# both files go through the same atomic torch.save: CI's fast subset tears recon_state.pt, `make test-all` model.pt too
@pytest.mark.parametrize("target, nth", [("recon_state.pt", 2), pytest.param("model.pt", 1, marks=pytest.mark.slow)])
def test_quantize_killed_mid_write_then_rerun_leaves_no_temp_file(target, nth, reference, launcher, tmp_path):
    """Fault: SIGKILL while half of `target` is written (the launcher parks the process in the middle
    of the nth torch.save to it: for recon_state.pt the second, so a complete one from the first unit
    is on disk; for model.pt the final save). Required: `target` itself is absent or complete (the
    half-written bytes are only in a temporary file); the rerun of the same command exits 0 with
    the uninterrupted run's result and removes the dead process's temporary file."""
    out, logs, marker = tmp_path / "run", tmp_path / "logs", tmp_path / "parked"
    env = _env(QDROP_FAULT_STALL=f"torch:{target}:{nth}", QDROP_FAULT_MARKER=str(marker))
    proc = Qdrop([*QUANTIZE, "--out", out], logs, "killed-mid-write", env=env, launcher=launcher)
    proc.wait_for(marker.exists, f"the process parked half-way through writing {target}")
    proc.kill9()
    assert any(target in name for name in leftovers(out)), "no half-written temporary file: the kill missed the write"
    assert_complete_outputs(out)
    assert not (out / "metrics.json").exists()

    res = qdrop([*QUANTIZE, "--out", out], logs, "rerun")
    assert_ok(res)
    assert_same_result(out, reference)
    assert leftovers(out) == []


# ---- 2. kill -9 during qdrop bench ------------------------------------------------------------------

def write_sweep(path: Path, out: Path, bits=("w4a4", "w8a8"), algos=("naive",), exclude=None) -> Path:
    cfg = dict(name="faults", out=str(out),
               defaults=dict(model="cifar10_resnet20", data=str(CIFAR), calib=64, iters=20, eval_limit=200,
                             batch_size=16, seed=0, threads=1),
               grid=dict(bits=list(bits), algo=list(algos)))
    if exclude:
        cfg["exclude"] = exclude
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def jsonl_records(results: Path) -> tuple[list[dict], int]:
    """(parsed records, number of lines that are not a complete JSON record)."""
    recs, torn = [], 0
    for line in results.read_text().splitlines():
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return recs, torn


def assert_one_ok_record_per_run(results: Path, expected: list) -> list[dict]:
    """Every run of the sweep (expected: its (bits, algo) pairs) has exactly one record, and it is
    ok: nothing duplicated, nothing lost."""
    recs, _ = jsonl_records(results)
    got = sorted((r["config"]["bits"], r["config"]["algo"]) for r in recs)
    assert got == sorted(expected), f"records (bits, algo): {got}, expected one each of {sorted(expected)}"
    assert len({r["run_id"] for r in recs}) == len(recs)
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs if r["status"] != "ok"]
    return recs


def test_bench_killed_after_first_record_then_rerun(reference, tmp_path):
    """Fault: SIGKILL of `qdrop bench` (3 runs: naive w4a4, qdrop w4a4, naive w8a8) as soon as the
    first record is in results.jsonl, i.e. while the qdrop run reconstructs. Required: the rerun
    exits 0; every run then has exactly one ok record (no duplicated, no lost row, no torn line);
    the resumed qdrop run's model.pt equals the uninterrupted `qdrop quantize` run with the same
    settings; no temporary file is left; a third invocation runs and appends nothing."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    cfg = write_sweep(tmp_path / "sweep.yaml", out, algos=("naive", "qdrop"), exclude=[{"bits": "w8a8", "algo": "qdrop"}])
    expected = [("w4a4", "naive"), ("w4a4", "qdrop"), ("w8a8", "naive")]
    results = out / "results.jsonl"
    proc = Qdrop(["bench", cfg, "--no-progress"], logs, "bench-killed")
    proc.wait_for(lambda: results.exists() and results.read_text().count("\n") >= 1, "the first record in results.jsonl")
    proc.kill9()
    recs, torn = jsonl_records(results)
    assert len(recs) == 1 and torn == 0, "the kill did not land in the second run"
    assert recs[0]["config"]["algo"] == "naive"

    assert_ok(qdrop(["bench", cfg, "--no-progress"], logs, "bench-rerun"))
    recs = assert_one_ok_record_per_run(results, expected)
    assert leftovers(out, allow=(".lock",)) == []
    (q,) = [r for r in recs if r["config"]["algo"] == "qdrop"]
    assert q["metrics"]["quant"] == reference["metrics"]["quant"]
    sd = load_pt(out / q["out_dir"] / "model.pt")["state_dict"]
    assert all(torch.equal(v, reference["state_dict"][k]) for k, v in sd.items())

    before = results.read_bytes()
    assert_ok(qdrop(["bench", cfg, "--no-progress"], logs, "bench-again"))
    assert results.read_bytes() == before


# ---- 3. kill -9 during qdrop export --check ------------------------------------------------------

def export_args(ckpt: Path, check: bool = True) -> list:
    args = ["export", "--checkpoint", ckpt, "--data", CIFAR, "--threads", "1"]
    return args + ["--check", CIFAR, "--eval-limit", "200"] if check else args


@pytest.mark.parametrize("when", [
    "parity-check",
    "mid-write",
])
def test_export_killed_then_rerun(when, reference, launcher, tmp_path):
    """Fault: SIGKILL of `qdrop export --check` either half-way through writing the ONNX file (the
    launcher parks the process in its first write to the file) or right after model.onnx appeared, during the
    ONNX Runtime parity check. Required: model.onnx is, whenever it exists (polled during the run
    and after the kill), a complete file that onnx.checker accepts; the rerun of the same command
    exits 0 and writes model.onnx and parity.json; no temporary file remains in the folder."""
    ckpt, logs = checkpoint_dir(reference, tmp_path / "ckpt"), tmp_path / "logs"
    onnx_path, watch = ckpt / "model.onnx", OnnxWatch(ckpt / "model.onnx")
    if when == "mid-write":
        marker = tmp_path / "parked"
        env = _env(QDROP_FAULT_STALL="file:model.onnx:1", QDROP_FAULT_MARKER=str(marker))
        proc = Qdrop(export_args(ckpt), logs, "export-killed", env=env, launcher=launcher)
        proc.wait_for(marker.exists, "the process parked half-way through writing model.onnx", watch=watch)
        assert any("model.onnx" in name for name in leftovers(ckpt)), "no half-written temporary file"
    else:
        proc = Qdrop(export_args(ckpt), logs, "export-killed")
        proc.wait_for(onnx_path.exists, "model.onnx", watch=watch)
    proc.kill9()
    assert not (ckpt / "parity.json").exists(), "the kill came after the export had finished"
    if onnx_path.exists():
        assert_onnx_complete(onnx_path)

    res = qdrop(export_args(ckpt), logs, "export-rerun")
    assert_ok(res)
    assert_onnx_complete(onnx_path)
    assert json.loads((ckpt / "parity.json").read_text())["samples"] == 200
    assert leftovers(ckpt) == []


# ---- 4. full disk (file-size limit) ------------------------------------------------------------

@pytest.mark.parametrize("previous", [False, True], ids=["fresh-folder", "over-a-finished-run"])
def test_quantize_on_full_disk(previous, reference, tmp_path):
    """Fault: files cannot grow past 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG as
    on a full disk). fresh-folder: `--algo naive` into an empty folder, which fails writing model.pt;
    over-a-finished-run: the reference command again over a copy of its finished output, which fails
    writing recon_state.pt. Required: non-zero exit, one line 'qdrop: error: ...' naming the file
    and no traceback; model.pt and metrics.json are absent (fresh) or byte-identical to the previous
    complete version; no temporary or partial file is left."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    if previous:
        shutil.copytree(reference["out"], out)
        before = {n: (out / n).read_bytes() for n in ("model.pt", "metrics.json")}
        args, target = [*QUANTIZE, "--out", out], "recon_state.pt"
    else:
        args, target = [*QUANTIZE[:QUANTIZE.index("--algo")], "--algo", "naive", *SMALL, "--out", out], "model.pt"
    res = qdrop(args, logs, "full-disk", preexec_fn=fsize_limit(FSIZE_LIMIT))
    print("stderr:", message_lines(res.stderr)[-3:], "left:", leftovers(out))
    assert res.rc != 0
    if previous:
        assert {n: (out / n).read_bytes() for n in before} == before
    else:
        assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    if (out / "recon_state.pt").exists():
        load_pt(out / "recon_state.pt")  # a progress file left behind is complete (raises if torn)
    assert leftovers(out) == []
    assert_one_line_error(res, target)


def test_export_on_full_disk(reference, tmp_path):
    """Fault: files cannot grow past 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored) during `qdrop export`,
    first with no model.onnx yet, then over a complete model.onnx of an earlier export. Required:
    non-zero exit, one line 'qdrop: error: ...' naming model.onnx, no traceback; model.onnx absent
    resp. byte-identical to the earlier one; no temporary file left."""
    logs = tmp_path / "logs"
    fresh = checkpoint_dir(reference, tmp_path / "fresh")
    res = qdrop(export_args(fresh, check=False), logs, "full-disk-fresh", preexec_fn=fsize_limit(FSIZE_LIMIT))
    print("stderr:", message_lines(res.stderr)[-3:])
    assert not (fresh / "model.onnx").exists()
    assert leftovers(fresh) == []
    assert_one_line_error(res, "model.onnx")

    again = checkpoint_dir(reference, tmp_path / "again")
    assert_ok(qdrop(export_args(again, check=False), logs, "export-unlimited"))
    before = (again / "model.onnx").read_bytes()
    res = qdrop(export_args(again, check=False), logs, "full-disk-again", preexec_fn=fsize_limit(FSIZE_LIMIT))
    assert (again / "model.onnx").read_bytes() == before
    assert leftovers(again) == []
    assert_one_line_error(res, "model.onnx")


# ---- 5. corrupted files ----------------------------------------------------------------------

# the same file read by the same loader: CI's fast subset cuts it short, `make test-all` also empties it
@pytest.mark.parametrize("damage", ["truncated", pytest.param("empty", marks=pytest.mark.slow)])
def test_quantize_with_corrupted_recon_state(damage, reference, tmp_path):
    """Fault: the output folder holds a recon_state.pt cut short (first half of a torch zip file) or
    empty, as a crash of a non-atomic writer leaves it. Required: rerunning quantize either stops with
    one line 'qdrop: error: ...' naming recon_state.pt and the fix (remove it), exit 2, or restarts
    safely and produces exactly the uninterrupted run's result; never a traceback."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    out.mkdir()
    blob = (reference["out"] / "model.pt").read_bytes()
    (out / "recon_state.pt").write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"")
    res = qdrop([*QUANTIZE, "--out", out], logs, "corrupt-state")
    print("stderr:", message_lines(res.stderr)[-3:])
    if res.rc == 0:
        assert_ok(res)
        assert_same_result(out, reference)
        assert leftovers(out) == []
    else:
        line = assert_one_line_error(res, "recon_state.pt")
        assert res.rc == 2
        assert re.search(r"\b(remove|delete|rm)\b", line), f"the error does not say how to fix it: {line}"


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A finished 2-run sweep (cifar10_resnet20 naive, w4a4 and w8a8); tests work on copies of it."""
    base = tmp_path_factory.mktemp("sweep")
    cfg = write_sweep(base / "sweep.yaml", base / "out")
    assert_ok(qdrop(["bench", cfg, "--no-progress"], base / "logs", "sweep"))
    runs = [("w4a4", "naive"), ("w8a8", "naive")]
    assert_one_ok_record_per_run(base / "out" / "results.jsonl", runs)
    return dict(cfg=cfg, out=base / "out", runs=runs)


def test_torn_last_line_of_results_jsonl(finished_sweep, tmp_path):
    """Fault: results.jsonl's last line is half a JSON record (a kill in the middle of an append).
    Required: `qdrop report` and `qdrop bench` do not crash (no traceback; the torn line is skipped,
    or a clear one-line error); after `qdrop bench` every run has exactly one complete ok record and
    the torn half is never merged with a new record; `qdrop report` then lists both runs."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    shutil.copytree(finished_sweep["out"], out)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    results.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # no newline: cut mid-record

    rep = qdrop(["report", out, "--no-plots"], logs, "report-torn")
    print("report stderr:", message_lines(rep.stderr)[-3:])
    if rep.rc != 0:
        assert_one_line_error(rep, "results.jsonl")
    assert "Traceback" not in rep.stderr

    res = qdrop(["bench", finished_sweep["cfg"], "--out", out, "--no-progress"], logs, "bench-torn")
    print("bench stderr:", message_lines(res.stderr)[-3:])
    assert_ok(res)
    recs, torn = jsonl_records(results)
    assert torn <= 1  # the old torn half may stay, on its own line
    assert sorted((r["config"]["bits"], r["config"]["algo"]) for r in recs) == sorted(finished_sweep["runs"])
    assert all(r["status"] == "ok" for r in recs)

    rep = qdrop(["report", out, "--no-plots"], logs, "report-after")
    assert_ok(rep)
    md = (out / "report.md").read_text()
    assert "2 finished runs" in md or ("4/4" in md and "8/8" in md), md[:2000]


CORRUPTIONS = {
    "truncated": lambda blob: blob[: len(blob) // 2],
    "garbage": lambda blob: bytes(range(256)) * 16,
    "empty": lambda blob: b"",
    "not-a-checkpoint": None,  # a valid torch file holding a list
}


# both commands read the checkpoint with the same function: every damage through eval, two through export
@pytest.mark.parametrize("damage, command", [(d, "eval") for d in CORRUPTIONS] + [("truncated", "export"), ("garbage", "export")])
def test_corrupted_checkpoint_given_to_eval_and_export(damage, command, reference, tmp_path):
    """Fault: the model.pt given to `qdrop eval --checkpoint` / `qdrop export --checkpoint` is cut in
    half, random bytes, empty, or a torch file that is not a qdrop checkpoint. Required: exit 2, one
    line 'qdrop: error: ...' naming model.pt, no traceback; export writes no model.onnx and no
    temporary file."""
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    ckpt.mkdir()
    if CORRUPTIONS[damage] is None:
        torch.save([1, 2, 3], ckpt / "model.pt")
    else:
        (ckpt / "model.pt").write_bytes(CORRUPTIONS[damage]((reference["out"] / "model.pt").read_bytes()))
    if command == "eval":
        args = ["eval", "--model", "cifar10_resnet20", "--data", CIFAR, "--checkpoint", ckpt, "--eval-limit", "200",
                "--threads", "1"]
    else:
        args = export_args(ckpt, check=False)
    res = qdrop(args, logs, f"{command}-{damage}")
    print("stderr:", message_lines(res.stderr)[-3:])
    assert_one_line_error(res, "model.pt")
    assert res.rc == 2
    assert not (ckpt / "model.onnx").exists()
    assert leftovers(ckpt) == []


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof that loading executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("command", ["eval", "export", "quantize-resume"])
def test_checkpoint_with_pickled_code_is_refused(command, reference, tmp_path):
    """Fault: a model.pt (eval, export) or recon_state.pt (quantize resuming) that holds, next to the
    real content, a pickled object whose unpickling runs code (here os.mkdir of a marker folder).
    Required: the code never runs (torch.load with weights_only=True); the file is refused with one
    line 'qdrop: error: ...' naming it, exit 2, no traceback - or, for the state file only, ignored:
    a safe restart that ends with the uninterrupted run's result."""
    folder, logs, marker = tmp_path / "ckpt", tmp_path / "logs", tmp_path / "code-ran"
    folder.mkdir()
    if command == "quantize-resume":
        name = "recon_state.pt"
        torch.save(dict(meta={}, done=0, state_dict=reference["state_dict"], unit_reports=[], note=_Payload(marker)),
                   folder / name)
        args = [*QUANTIZE, "--out", folder]
    else:
        name = "model.pt"
        ckpt = load_pt(reference["out"] / "model.pt")
        torch.save(dict(ckpt, note=_Payload(marker)), folder / name)
        args = (["eval", "--model", "cifar10_resnet20", "--data", CIFAR, "--checkpoint", folder, "--eval-limit", "200",
                 "--threads", "1"] if command == "eval" else export_args(folder, check=False))
    res = qdrop(args, logs, f"unsafe-{command}")
    print("stderr:", message_lines(res.stderr)[-3:], "code ran:", marker.exists())
    assert not marker.exists(), f"loading {name} ran code from the file"
    if command == "quantize-resume" and res.rc == 0:  # the state file ignored: a safe restart from the first unit
        assert_ok(res)
        assert_same_result(folder, reference)
        assert leftovers(folder) == []
    else:
        assert_one_line_error(res, name)
        assert res.rc == 2


# ---- 6. two qdrop bench processes on one folder ----------------------------------------------------

def test_second_bench_on_the_same_folder_refuses_or_waits(finished_sweep, tmp_path):
    """Fault: a second `qdrop bench` on a results folder while the first holds it (the first is
    stopped with SIGSTOP right after it claimed the folder, so the two surely overlap). Required: the
    second refuses (exit 2, one line 'qdrop: error: ...', no traceback) or waits for the first;
    when both are done every run has exactly one ok record."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    cfg = finished_sweep["cfg"]
    first = Qdrop(["bench", cfg, "--out", out, "--no-progress"], logs, "bench-first")
    first.wait_for(lambda: (out / "sweep.json").exists(), "sweep.json (the folder claimed)")
    first.p.send_signal(signal.SIGSTOP)
    try:
        second = Qdrop(["bench", cfg, "--out", out, "--no-progress"], logs, "bench-second")
        try:
            second.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass  # it waits for the first: let the first go on
    finally:
        first.p.send_signal(signal.SIGCONT)
    assert_ok(first.finish())
    res = second.finish()
    print("second stderr:", message_lines(res.stderr)[-3:])
    if res.rc != 0:
        assert_one_line_error(res)
        assert res.rc == 2
    assert "Traceback" not in res.stderr
    assert_one_ok_record_per_run(out / "results.jsonl", finished_sweep["runs"])


def test_second_bench_that_read_results_before_the_first_finished(finished_sweep, launcher, tmp_path):
    """Fault: a second `qdrop bench` reads results.jsonl while the first is still running, is then
    descheduled just before it takes the folder's lock (the launcher holds it there), and gets the
    lock only after the first has finished every run. Required: it must not run or record those
    runs again: every run has exactly one ok record at the end."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    cfg = finished_sweep["cfg"]
    ready, go = tmp_path / "second-ready", tmp_path / "second-go"
    first = Qdrop(["bench", cfg, "--out", out, "--no-progress"], logs, "bench-first")
    first.wait_for(lambda: (out / "sweep.json").exists(), "sweep.json (the folder claimed)")
    first.p.send_signal(signal.SIGSTOP)
    try:
        env = _env(QDROP_FAULT_LOCK_DIR=str(out), QDROP_FAULT_READY=str(ready), QDROP_FAULT_GO=str(go))
        second = Qdrop(["bench", cfg, "--out", out, "--no-progress"], logs, "bench-second", env=env, launcher=launcher)
        second.wait_for(ready.exists, "the second process at the lock")
    finally:
        first.p.send_signal(signal.SIGCONT)
    assert_ok(first.finish())
    go.touch()
    res = second.finish()
    print("second stderr:", message_lines(res.stderr)[-3:])
    assert "Traceback" not in res.stderr
    assert_one_ok_record_per_run(out / "results.jsonl", finished_sweep["runs"])
