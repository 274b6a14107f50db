"""Data-parallel runs: `torchrun --nproc-per-node N -m qdrop quantize ...`.

torchrun starts N copies of the command and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init_from_env` is the one place that starts
the process group (gloo on CPU, nccl on CUDA); nothing here runs a collective unless a group of
two or more processes is initialised, so a plain run never touches torch.distributed.

What the ranks share and what they split (qdrop.recon.engine, qdrop.pipeline):
  - the calibration samples used by reconstruction and their cached unit inputs/outputs are
    split in N contiguous shards; `--batch-size` is the global batch, each rank draws its share
    of it from its own shard, and the gradients of the learned rounding variables and step sizes
    are averaged (weighted by each rank's share of the batch) before every optimizer step, so
    all ranks keep identical parameters;
  - activation calibration runs on the same (full) calibration subset on every rank: MSE and
    percentile observers need the data itself, not only statistics (qdrop.quant.calibration
    reduces min/max and checks that the ranks end with identical ranges);
  - rank 0 alone writes files and prints; the others meet it at a barrier.

This is a bottom-layer module: it imports nothing of qdrop but its errors.
"""
from __future__ import annotations

import os
import resource

import torch

from .errors import UsageError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of two or more."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def active() -> bool:
    """Whether a process group of two or more processes is initialised (collectives run)."""
    dist = _dist()
    return bool(dist and dist.is_initialized() and dist.get_world_size() > 1)


def world_size() -> int:
    """Processes sharing the work: the group's size when one is initialised, else 1."""
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    """This process's rank: the group's, or the launcher's (RANK) before the group exists, else 0."""
    if active():
        return _dist().get_rank()
    if launched():
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0
    return 0


def is_main() -> bool:
    """The process that writes files and prints (always true outside torchrun)."""
    return rank() == 0


def init_from_env(device: str | torch.device) -> torch.device:
    """Start the process group when launched by torchrun (once per process; later calls only
    return the device). Returns the device this rank computes on: CUDA ranks take the GPU of
    their LOCAL_RANK unless the device names one."""
    device = torch.device(device)
    if not launched():
        return device
    dist = _dist()
    if dist is None:
        raise UsageError("this PyTorch build has no torch.distributed: run qdrop as one process (without torchrun)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: launch data-parallel runs with torchrun "
                             "--nproc-per-node N -m qdrop ...")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group (after a last barrier when every rank got here)."""
    dist = _dist()
    if dist and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


# ---- sharding ---------------------------------------------------------------------------------
def shard_sizes(n: int, world: int) -> list[int]:
    """How n items split over `world` ranks (torch.tensor_split's sizes: the first n % world get one more)."""
    return [n // world + (r < n % world) for r in range(world)]


def check_shards(n_samples: int, batch_size: int, world: int | None = None) -> None:
    """Refuse a world that cannot split the calibration set or the batch: every rank needs at
    least one sample of each (and, given n_samples >= batch_size, then a shard as large as its
    share of the batch)."""
    world = world_size() if world is None else world
    if world <= 1:
        return
    if world > n_samples:
        raise UsageError(f"torchrun started {world} processes but the calibration set has {n_samples} samples: every process "
                         f"needs its own share of them; use at most --nproc-per-node {n_samples}, or a larger --calib")
    if world > batch_size:
        raise UsageError(f"torchrun started {world} processes but the batch size is {batch_size}: the batch is split across "
                         f"the processes and every one needs at least one sample of it; use at most --nproc-per-node "
                         f"{batch_size}, or a larger --batch-size")


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of x's rows (all of x outside a group)."""
    return torch.tensor_split(x, world_size())[rank()] if active() else x


# ---- collectives ---------------------------------------------------------------------------------
def average_gradients(params, weight: float) -> None:
    """grad <- sum over ranks of weight_r * grad_r, in one all-reduce; `weight` is this rank's
    share (the weights sum to 1 over the ranks). Parameters without a gradient are skipped (the
    loop is the same on every rank, so they are the same parameters everywhere)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not active():
        return
    for g, total in zip(grads, all_reduce_each([g * weight for g in grads])):
        g.copy_(total)


def all_reduce_each(tensors: list, op: str = "sum") -> list:
    """Each tensor reduced over the ranks (sum | min | max), in one all-reduce of their
    concatenation: new tensors shaped and placed like the inputs."""
    if not tensors:
        return []
    dev = tensors[0].device
    flat = all_reduce(torch.cat([t.reshape(-1).to(dev) for t in tensors]), op)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.device))
        offset += t.numel()
    return out


def _on_comm_device(t: torch.Tensor, collective) -> torch.Tensor:
    """Run collective(buffer) on a copy of t where the backend wants it (nccl: the current GPU,
    gloo: CPU) and write the result back into t."""
    dev = torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else torch.device("cpu")
    buf = t if t.device == dev and t.is_contiguous() else t.contiguous().to(dev)
    collective(buf)
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over the ranks (sum | min | max); unchanged outside a group."""
    if active():
        dist = _dist()
        red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        _on_comm_device(t, lambda b: dist.all_reduce(b, op=red))
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's t, in place on every rank."""
    if active():
        _on_comm_device(t, lambda b: _dist().broadcast(b, src))
    return t


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank (picklable objects; tensors come back on CPU or the current GPU)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] outside a group)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def peak_memory_mb(device: torch.device | str | None = None) -> dict:
    """This process's peak resident memory (and peak CUDA allocation on a CUDA device), in MiB."""
    out = dict(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if device is not None and torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
