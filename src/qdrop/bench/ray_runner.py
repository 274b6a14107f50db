"""`qdrop bench CONFIG --ray [ADDRESS]`: the pending runs of a sweep as Ray tasks.

This is only the execution step of runner.run_sweep: the sweep is planned, locked and claimed
there, and its records are written there, by the driver alone, one line as each task finishes
(ray.wait). A task is runner.run_job on a Ray worker: it writes RESULTS_DIR/runs/<run_id>/ itself
and returns the run's record, so every node must see RESULTS_DIR, the data and the model files
at the same paths as the driver (a shared filesystem), and have qdrop installed.

Each task asks for one GPU where the cluster has GPUs (none for `device: cpu` runs and for runs
only to deploy) and for `threads` CPUs (default 1). A task whose worker process dies is retried
by Ray (MAX_RETRIES); a task that still fails becomes a failed record, retried by the next
invocation like any failed run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from ..errors import QdropError

INSTALL_HINT = "pip install 'qdrop[ray]'"
MAX_RETRIES = 3  # Ray's retries of a task whose worker died (killed, out of memory, node lost)
CONNECT_TIMEOUT_S = 5  # a Ray address that does not accept a TCP connection within this is refused
# Ray's py_gcs_connect_timeout_s for a cluster that answers but does not let the driver in (e.g. a
# token authentication mismatch): ray.init then gives up after about twice this (21 s seen), not minutes.
GCS_CONNECT_TIMEOUT_S = "10"


class RayUnavailable(QdropError, RuntimeError):
    """--ray cannot be served: Ray is not installed, or its cluster does not answer."""


def require_ray():
    """The ray module, or RayUnavailable naming the fix."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address ('host:port', 'ray://host:port', '[::1]:port'); None when it
    names no port ('auto', 'local')."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _probe(address: str) -> None:
    """Refuse an address that accepts no TCP connection within CONNECT_TIMEOUT_S (ray.init would
    retry for minutes)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, (socket.timeout, TimeoutError)) else (err.strerror or str(err))
        raise RayUnavailable(f"the Ray cluster at {address!r} does not answer ({reason} within {CONNECT_TIMEOUT_S} s): "
                             "start it (`ray start --head`) or check the address") from None


@contextlib.contextmanager
def session(address: str | None):
    """The connected ray module: a Ray this process already initialised is used as it is (an
    address must still answer); else, without an address, ray.init() (a new local Ray, or the
    cluster RAY_ADDRESS names); else the cluster at the address ('auto', 'host:port',
    'ray://host:port'). What this opened is shut down on exit."""
    ray = require_ray()
    if ray.is_initialized():
        if address:
            _probe(address)
        yield ray
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        _probe(target)
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", GCS_CONNECT_TIMEOUT_S)
    kwargs = dict(logging_level=logging.WARNING)
    if not target:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address or None, **kwargs)
    except Exception as err:  # ConnectionError, ValueError (bad address), RuntimeError, ...
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever a failed start left behind
        lines = str(err).strip().splitlines()
        what = f"cannot connect to the Ray cluster at {target!r}" if target else "cannot start a local Ray"
        hint = (" (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token)"
                if target and "RAY_AUTH_MODE" not in os.environ else "")
        raise RayUnavailable(f"{what}: {type(err).__name__}: {lines[0] if lines else ''}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- tasks --------------------------------------------------------------------------------

def _task(execute, run, results_dir: str, sweep_name: str, kwargs: dict, cwd: str, env: dict) -> dict:
    """Runs on a Ray worker: the run in the driver's working folder and QDROP_* settings.
    execute is the runner's run_job (passed in: this module does not import the runner, which
    imports it)."""
    os.environ.update(env)
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative data or model paths of the config mean what they mean to the driver
    return execute(run, Path(results_dir), sweep_name, **kwargs)


def _failed(run, sweep_name: str, kwargs: dict, err: BaseException, schema: int, now) -> dict:
    """The record of a task Ray gave up on (its worker died MAX_RETRIES + 1 times, qdrop missing
    on the node, ...): a failed run, or a failed deployment of a finished one (schema and now():
    the runner's record format)."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    recorded = kwargs.get("recorded")
    if recorded is not None:
        c = run.config
        return dict(recorded, config={**recorded["config"], "deploy": c["deploy"]},
                    deploy=dict(runtime=c["deploy"], error=f"{type(err).__name__}: {message}", finished=now()))
    return dict(schema=schema, run_id=run.run_id, sweep=sweep_name, kind=run.kind, config=run.config,
                out_dir=str(Path("runs") / run.run_id), finished=now(), status="failed",
                error=dict(type=type(err).__name__, message=str(err)[:4000], traceback=""))


def _options(run, kwargs: dict, max_cpus: float, has_gpu: bool) -> dict:
    c = run.config
    cpus = float(c.get("threads") or 1)
    if max_cpus >= 1:
        cpus = min(cpus, max_cpus)  # never a task that no node can take
    on_cpu = str(c.get("device") or "auto").startswith("cpu") or kwargs.get("recorded") is not None
    return dict(num_cpus=cpus, num_gpus=1 if has_gpu and not on_cpu else 0, max_retries=MAX_RETRIES,
                retry_exceptions=False, name=f"qdrop bench {run.run_id}")


def run_tasks(ray, runs: list, job, results_dir: Path, sweep_name: str, execute, schema: int, now):
    """Submit every run as a task (job(run): the arguments of execute, the runner's run_job); yield
    (run, record) as each finishes. Tasks still running when the caller stops (interrupt, error) are
    cancelled. schema, now: the runner's record format, for runs Ray gave up on."""
    remote = ray.remote(_task)
    env = {k: v for k, v in os.environ.items() if k.startswith("QDROP_")}
    cwd = os.getcwd()
    results = str(Path(results_dir).resolve())
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    max_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    has_gpu = any(r.get("GPU", 0) > 0 for r in nodes)
    waiting = {}
    for run in runs:
        kwargs = job(run)
        ref = remote.options(**_options(run, kwargs, max_cpus, has_gpu)).remote(execute, run, results, sweep_name, kwargs, cwd, env)
        waiting[ref] = (run, kwargs)
    try:
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1)
            for ref in done:
                run, kwargs = waiting.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as err:
                    record = _failed(run, sweep_name, kwargs, err, schema, now)
                yield run, record
    finally:
        for ref in waiting:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
