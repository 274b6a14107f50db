"""Every file qdrop writes goes through here: written to a temporary name beside the target, flushed
to disk, then renamed over it, so a reader (or a rerun after a kill) sees the old file or the new
one, never half of one. A failed write (full disk, file-size limit) removes its temporary file and
raises WriteError naming the path. Also: durable JSONL appends, and what a result records about
where it came from (environment, git state, package versions, peak memory), and the thread count a run holds.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from .errors import WriteError

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
TMP_MARK = ".qdrop-tmp"  # .NAME.qdrop-tmpPID: qdrop's own temporary files, and only those are ever cleaned up


def _write_error(path, err: OSError) -> WriteError:
    why = os.strerror(err.errno) if err.errno else str(err)
    fix = "free disk space (or raise the file-size limit) and rerun" if err.errno in _FULL else "check the path and its permissions"
    return WriteError(f"could not write {path}: {why}; nothing was written there - {fix}")


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = False) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, and rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that atomic_write left in `folder` when its process was killed
    mid-write (.NAME.qdrop-tmpPID of a PID that no longer runs on this machine). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_MARK}*"):
        pid = p.name.rpartition(TMP_MARK)[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, default=str)))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_torch_file(path: str | os.PathLike, what: str, fix: str = "", map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain containers only, so a file from
    someone else cannot run code when loaded. A file that is torn, not a torch file, or holds
    pickled objects raises CheckpointError naming the file, the reason and `fix`."""
    import pickle

    import torch

    from .errors import CheckpointError

    fix = f"; {fix}" if fix else ""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        found = next((l for l in lines if "GLOBAL" in l), None)
        if found:  # weights_only refused an object that unpickling would have constructed (code could run)
            raise CheckpointError(f"{path} holds pickled Python objects, which qdrop does not load ({found}): "
                                  f"it is not a plain-data {what}{fix}") from None
        detail = next((l for l in lines if "Unsupported" in l or "error" in l.lower() and "WeightsUnpickler" not in l),
                      lines[-1] if lines else "")
        raise CheckpointError(f"{path} is not a readable {what} (damaged: {detail}){fix}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # torn zip, truncated, not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable {what} (truncated or damaged: {first}){fix}") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written like every other file (temporary name, then rename)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and make it durable (flush + fsync). A line left half-written by a kill is
    closed with a newline first, so it never merges with the next record."""
    try:
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.rstrip("\n").encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _write_error(path, err) from err


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to n inside the block and restored after it (n None or 0: unchanged).
    A command run in-process (a test, a notebook) must not leave the caller on its thread count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment() -> dict:
    """The machine a result was measured on: versions, CPU, threads, GPU."""
    import numpy
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
               machine=platform.machine(), processor=platform.processor() or platform.machine(),
               cpu=_cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def _cpu_model() -> str | None:
    # also in qdrop.export.x86.cpu_model: that file must load on its own inside the CPU emulator, and
    # this low-level module must not import export/
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


PACKAGES = ("qdrop", "torch", "torchvision", "numpy", "pillow", "pyyaml", "efficientnet-lite-pytorch", "transformers")


def git_info(path: str | Path | None = None) -> dict | None:
    """{'commit', 'dirty', 'changed'} of the git checkout holding `path` (default: the qdrop
    package), or None when it is not in a git repository or git is missing."""
    if path is None:  # this file's folder is the package's (no `import qdrop`: io sits below every other module)
        path = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()] if status.returncode == 0 else []
    return dict(commit=commit.stdout.strip(), dirty=bool(changed) if status.returncode == 0 else None, changed=changed[:20])


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        # torch: the running build's own version (2.x+cu130 vs +cpu matters), always imported here; the
        # others from their installed metadata, so that a record does not depend on what this process
        # happened to import (a Ray worker and the driver wrote different torchvision strings otherwise)
        version = None
        if name == "torch":
            import torch

            version = torch.__version__
        else:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        out[name] = str(version)
    return out


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_bytes() is not None
    except OSError:
        return False


class PeakMemory:
    """Peak host RSS and CUDA memory over a `with` block.

    On Linux the peak RSS counter (VmHWM) is reset at the start, so the number is this run's
    own peak; elsewhere it is getrusage's ru_maxrss, the process's peak since it started
    (an upper bound for the run; `rss_scope` says which)."""

    def __enter__(self):
        import torch

        self.per_run = _reset_hwm()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        return False

    def result(self) -> dict:
        if self.per_run:
            rss, scope = _vm_hwm_bytes(), "run"
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss, scope = (maxrss if sys.platform == "darwin" else maxrss * 1024), "process"
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return dict(rss_bytes=rss, rss_scope=scope, cuda_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None)
