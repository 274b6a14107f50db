"""What a benchmark record says about where it came from: git state, package versions, memory."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("qdrop", "torch", "torchvision", "numpy", "pillow", "pyyaml", "efficientnet-lite-pytorch", "transformers")


def git_info(path: str | Path | None = None) -> dict | None:
    """{'commit', 'dirty', 'changed'} of the git checkout holding `path` (default: the qdrop
    package), or None when it is not in a git repository or git is missing."""
    if path is None:
        import qdrop

        path = Path(qdrop.__file__).resolve().parent
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
    modules = {"pillow": "PIL", "pyyaml": "yaml"}
    for name in PACKAGES:
        module = sys.modules.get(modules.get(name, name).replace("-", "_"))
        version = getattr(module, "__version__", None)  # the running module's own (e.g. torch 2.x+cu130)
        if version is None:
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
        self.per_run = _reset_hwm()
        self.cuda = False
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
        except Exception:
            pass
        return self

    def __exit__(self, *exc):
        return False

    def result(self) -> dict:
        if self.per_run:
            rss, scope = _vm_hwm_bytes(), "run"
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss, scope = (maxrss if sys.platform == "darwin" else maxrss * 1024), "process"
        out = dict(rss_bytes=rss, rss_scope=scope, cuda_bytes=None)
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
        except Exception:
            pass
        return out


def fsync_append(path: Path, line: str) -> None:
    """Append one line and make it durable (flush + fsync). A line left half-written by a
    kill is closed with a newline first, so it never merges with the next record."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.rstrip("\n").encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
