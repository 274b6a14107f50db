"""One reconstruction loop; adaround, brecq and qdrop are configurations of it.

For unit k (in graph order) the loop needs the unit's input in the quantized model,
its input in the FP model and its FP output, on every calibration sample. They are
carried along the chain of block units: after unit k is reconstructed, one pass of
unit k alone (quantized) gives unit k+1's quantized input, and its FP output is unit
k+1's FP input. The cost is two passes of each unit over the calibration set, never
a pass of the full model per unit.

The FP model is the prepared model with every quantizer off (it computes the original
function; tested), so the FP and quantized passes share modules and code.

Where the units come from is a partition (duck-typed, see GraphPartition): torch.fx graphs
here (graph/units.py), transformer blocks by module scope in qdrop.nlp.units. A partition
gives the first unit's inputs as groups of samples (one tensor for a CNN; per calibration
batch for a transformer, with its token mask), each unit's extra arguments per group (attention
masks, position embeddings: whatever the block's forward receives besides the hidden states),
and callables that run a unit or one layer. The loop below is the same for both.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .. import distributed as qdist
from ..errors import DataError, ReconstructionError, UsageError
from ..io import atomic_torch_save, load_torch_file
from ..graph.units import Unit, block_units, layer_units, subgraph
from ..quant.state import quant_mode, quantizers  # noqa: F401 (quant_mode: re-exported by qdrop.recon)
from ..quant.layers import QuantLayer
from ..quant.quantizer import bernoulli_mask
from .configs import Algorithm, ReconConfig, Stage, get_algorithm


def default_lambda(qmodel: nn.Module) -> float:
    """Rounding-loss weight from the architecture's structure (the QDrop paper's values):
    no depthwise conv (ResNet/RegNet-like) 0.01; depthwise convs all 3x3 (MobileNetV2-like)
    0.1; depthwise convs with larger kernels (MNasNet/EfficientNet-like) 0.2."""
    dw_kernels = [
        max(m.layer.kernel_size)
        for m in qmodel.modules()
        if isinstance(m, QuantLayer) and isinstance(m.layer, nn.modules.conv._ConvNd)
        and m.layer.groups > 1 and m.layer.groups == m.layer.in_channels
    ]
    if not dw_kernels:
        return 0.01
    return 0.2 if max(dw_kernels) > 3 else 0.1


@torch.no_grad()
def run_chunks(module, x: torch.Tensor, device, chunk: int = 128, out_dtype=None, args=(), kwargs=None) -> torch.Tensor:
    """module(x, *args, **kwargs) over x in chunks of rows; per-sample arguments (tensors whose
    first dimension is x's) are sliced along with x, the others passed whole."""
    outs = []
    n = x.shape[0]
    for i in range(0, n, chunk):
        a, kw = rows_of((args, kwargs or {}), n, slice(i, i + chunk))
        y = module(x[i : i + chunk].to(device, non_blocking=True).float(), *a, **kw)
        outs.append(y.to(out_dtype or y.dtype) if x.device == y.device else y.to(x.device, out_dtype or y.dtype))
    return torch.cat(outs)


def rows_of(tree, n: int, index):
    """The rows `index` of every tensor in `tree` whose first dimension is n (per-sample)."""
    return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t, tree)


def run_groups(fn, xs: list, extras: list, device, out_dtype=None) -> list:
    return [run_chunks(fn, x, device, out_dtype=out_dtype, args=a, kwargs=kw) for x, (a, kw) in zip(xs, extras)]


class GraphPartition:
    """The torch.fx path: block and layer units of graph/units.py; the calibration set is one
    tensor (one group), units take one tensor, the reconstruction error sums channels (dim 1)."""

    feature_dim = 1

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.blocks = block_units(gm)

    def start(self, calib: torch.Tensor, device):
        if not isinstance(calib, torch.Tensor):
            raise UsageError("calib_data must be a tensor of calibration inputs [N, ...]")
        if not torch.isfinite(calib).all():
            raise DataError("calibration data contains NaN or Inf values")
        return [calib], [None]

    def extras(self, k: int) -> list:
        return [((), {})]

    def block_fn(self, k: int):
        b = self.blocks[k]
        return subgraph(self.gm, b.nodes, b.input, [b.output])

    def layer_units(self, k: int) -> list:
        return layer_units(self.gm, self.blocks[k])

    def layer_fn(self, k: int, lu: Unit):
        return subgraph(self.gm, lu.nodes, lu.input, [lu.output])

    def layer_io(self, k: int, lu: Unit, xs: list, extras: list, device, out_dtype, with_output: bool, run_groups=None):
        """The layer's inputs (and FP outputs) inside block k, from the block's inputs xs."""
        b = self.blocks[k]
        if not with_output:
            to_in = subgraph(self.gm, b.nodes, b.input, [lu.input])
            return [run_chunks(to_in, xs[0], device, out_dtype=out_dtype)], None
        to_in_out = subgraph(self.gm, b.nodes, b.input, [lu.input, lu.output])
        with torch.no_grad():
            pairs = [to_in_out(xs[0][i : i + 128].to(device).float()) for i in range(0, xs[0].shape[0], 128)]
        return [torch.cat([p[0] for p in pairs]).to(out_dtype)], [torch.cat([p[1] for p in pairs]).to(out_dtype)]


def _unit_seed(seed: int, stage: int, unit: int, sub: int = 0) -> int:
    return (seed * 1_000_003 + stage * 10_007 + unit * 101 + sub) % (2**31)


def _load_state(state_path: str, device):
    """The progress file of an interrupted run, or None when it is unreadable: it is only a cache
    of finished units (written atomically, so torn only by outside damage), and starting over
    gives the same result, so a damaged one is set aside with a warning instead of failing the run."""
    from ..errors import CheckpointError

    try:
        saved = load_torch_file(state_path, "reconstruction state", map_location=device)
        if not isinstance(saved, dict) or not {"meta", "done", "state_dict", "unit_reports"} <= set(saved):
            raise CheckpointError(f"{state_path} does not hold a reconstruction state")
    except CheckpointError as err:
        print(f"qdrop: warning: {err}; it is removed and reconstruction starts from the first unit", file=sys.stderr)
        os.unlink(state_path)
        return None
    return saved


class _Cache:
    """Where unit inputs/outputs live: the compute device when they fit under the cap,
    otherwise CPU (pinned when computing on CUDA), in half precision if needed."""

    def __init__(self, device: torch.device, max_bytes: int | None):
        self.device, self.max_bytes = device, max_bytes

    def placement_of(self, numel: int, copies: int = 3):
        """Where `copies` tensors of `numel` elements each go."""
        per = numel * copies
        if self.max_bytes is None or per * 4 <= self.max_bytes:
            return self.device, torch.float32
        if per * 2 <= self.max_bytes:
            return torch.device("cpu") if self.device.type == "cuda" else self.device, torch.float16
        raise ReconstructionError(
            f"memory cap {self.max_bytes} bytes is too small: caching {copies} tensors "
            f"of {numel} elements needs at least {per * 2} bytes in half precision"
        )


def reconstruct(
    qmodel: nn.Module,
    fp_model: nn.Module | None,
    calib_data,
    algo: str | Algorithm = "qdrop",
    iters: int = 20000,
    batch_size: int = 32,
    lam: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    state_path: str | None = None,
    progress: bool = True,
    compile: bool = False,
    cuda_graph: bool = False,
    max_cache_bytes: int | None = None,
    on_unit_done=None,
    partition=None,
) -> dict:
    """Reconstruct `qmodel` (prepared and calibrated) in place; returns a report.

    fp_model is optional: when given it is only checked against the prepared model with
    quantizers off (the FP reference the loop uses). state_path: a file where the model
    state is saved after every unit; rerunning the same call resumes after the last
    finished unit and gives the same result as an uninterrupted run. partition: where the
    units come from (default: the torch.fx graph; qdrop.reconstruct passes the transformer
    one for Hugging Face models, with calib_data a list of tokenized batches).

    Inside an initialised process group of N ranks (torchrun, qdrop.distributed), every rank
    passes the same calib_data and keeps 1/N of it (a contiguous shard, with its caches);
    batch_size is the global batch, split across the ranks, and the gradients are averaged
    every iteration, so the ranks keep identical parameters. Rank 0 alone writes state_path;
    every rank resumes from it. The torch.fx path only.

    cuda_graph: on CUDA, replay each iteration as a CUDA graph (see _CudaGraphStep) where a unit
    allows it (its caches on the GPU, one group of samples, one process); others run eagerly.
    Off by default until it is measured on a GPU (README, Scaling).
    """
    algorithm = get_algorithm(algo) if isinstance(algo, str) else algo
    cfg = ReconConfig(iters=iters, batch_size=batch_size, lam=lam, seed=seed, compile=compile, cuda_graph=cuda_graph,
                      max_cache_bytes=max_cache_bytes)
    if not isinstance(iters, int) or iters <= 0:
        raise UsageError(f"iters must be a positive integer, got {iters!r}")
    qs = quantizers(qmodel)
    if not qs or not all(q.calibrated for _, q in qs if q.role == "weight") or not any(q.calibrated for _, q in qs if q.role == "act"):
        raise ReconstructionError("model is not calibrated: run qdrop.calibrate(qmodel, batches) before reconstruct")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graph and device.type != "cuda":
        raise UsageError(f"cuda_graph replays CUDA graphs and needs a CUDA device, not {device}; drop it (--cuda-graph) on CPU")
    qmodel.to(device).eval()
    part = GraphPartition(qmodel) if partition is None else partition
    world, rank = qdist.world_size(), qdist.rank()
    if world > 1 and not isinstance(part, GraphPartition):
        raise ReconstructionError("data-parallel reconstruction (torchrun) covers the torch.fx path only; "
                                  "reconstruct transformers in one process")
    with quant_mode(qmodel, weights=False, acts=False):
        xs0, masks = part.start(calib_data, device)
    n_calib = sum(int(x.shape[0]) for x in xs0)
    if len(xs0) == 1 and n_calib < batch_size:  # (groups of a transformer's batches may be smaller: one group a step)
        raise DataError(f"calibration set has {n_calib} samples, fewer than the batch size {batch_size}")
    n_rank = n_calib
    if world > 1:  # this rank's shard of the samples; every cache below holds only it
        qdist.check_shards(n_calib, batch_size, world)
        xs0 = [qdist.shard(xs0[0])]
        n_rank = int(xs0[0].shape[0])
    lam = default_lambda(qmodel) if cfg.lam is None else cfg.lam
    if fp_model is not None:
        _check_fp(qmodel, fp_model, calib_data[: min(8, len(calib_data))], device)

    blocks = part.blocks
    total_units = len(blocks) * len(algorithm.stages)
    # the stages too: a resumed run must be the same configuration, not just the same name
    meta = dict(algo=algorithm.name, iters=iters, batch_size=batch_size, lam=lam, seed=seed, units=[u.name for u in blocks],
                n_calib=n_calib, stages=[asdict(s) for s in algorithm.stages])
    if world > 1:
        meta["world"] = world  # a resumed run must split the samples and batches the same way
    done = -1
    report = dict(meta, lam=lam, unit_reports=[], device=str(device))
    if world == 1:
        saved = _load_state(state_path, device) if state_path and os.path.exists(state_path) else None
    else:  # rank 0 reads (and may discard) the file; every rank gets what it read
        saved = _load_state(state_path, "cpu") if state_path and rank == 0 and os.path.exists(state_path) else None
        saved = qdist.broadcast_object(saved)
    if saved is not None:
        if saved["meta"] != meta:
            raise ReconstructionError(f"{state_path} was written by a different run ({saved['meta']}); remove it or use another output")
        qmodel.load_state_dict(saved["state_dict"])
        done = saved["done"]
        report["unit_reports"] = saved["unit_reports"]

    cache = _Cache(device, max_cache_bytes)
    per_block = [len(part.layer_units(k)) if algorithm.units == "layer" else 1 for k in range(len(blocks))]
    bar = tqdm(total=sum(max(1, int(round(iters * s.iters_scale))) for s in algorithm.stages) * sum(per_block),
               disable=not progress or rank != 0,
               desc=f"{algorithm.name}", unit="it", dynamic_ncols=True)
    bar.update(sum(r["iters"] for r in report["unit_reports"]) if done >= 0 else 0)
    cache_bytes = 0  # the most bytes of cached unit inputs/outputs held at once
    try:  # the bar is closed on errors too, so that an error message starts on its own line
        step = 0
        for s_idx, stage in enumerate(algorithm.stages):
            stage_iters = max(1, int(round(iters * stage.iters_scale)))
            # (with shards, sized for the largest one: every rank caches in the same place and precision)
            x_dev, x_dtype = cache.placement_of(sum(x.numel() for x in xs0) if world == 1 else
                                                xs0[0][:1].numel() * max(qdist.shard_sizes(n_calib, world)))
            x_fp = [x.to(x_dev, x_dtype) for x in xs0]
            x_q = x_fp
            for k, block in enumerate(blocks):
                fn = part.block_fn(k)
                extras = part.extras(k)
                if step <= done:  # finished before a restart: only move the caches along
                    with quant_mode(qmodel, weights=False, acts=False):
                        y_fp = run_groups(fn, x_fp, extras, device, out_dtype=x_dtype)
                else:
                    y_fp = _reconstruct_block(qmodel, part, k, fn, extras, masks, x_q, x_fp, algorithm, stage, s_idx,
                                              stage_iters, cfg, lam, device, bar, report, total_units, step)
                    if state_path and rank == 0:
                        atomic_torch_save(dict(meta=meta, done=step, state_dict=qmodel.state_dict(),
                                          unit_reports=report["unit_reports"]), state_path)
                    if on_unit_done is not None:
                        on_unit_done(step, block.name)
                cache_bytes = max(cache_bytes, _nbytes(x_q, x_fp, y_fp))
                with quant_mode(qmodel, weights=True, acts=stage.act_quant):
                    x_q = run_groups(fn, x_q, extras, device, out_dtype=x_dtype)
                x_fp = y_fp
                step += 1
    finally:
        bar.close()
    # every calibrated quantizer on, probabilities back to 1
    for _, q in quantizers(qmodel):
        if q.calibrated:
            q.set_state("quant")
        q.set_drop(1.0)
    report["seconds"] = sum(r["seconds"] for r in report["unit_reports"])
    report["cache_bytes"] = cache_bytes
    if world > 1:
        report.update(rank=rank, n_calib_rank=n_rank)
        report["ranks"] = qdist.gather_objects(dict(rank=rank, n_calib=n_rank, cache_bytes=cache_bytes,
                                                    seconds=round(report["seconds"], 2), **qdist.peak_memory_mb(device)))
    return report


def _nbytes(*groups) -> int:
    """Bytes of the distinct tensors in lists of tensors (the first unit's x_q is x_fp)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for g in groups for t in g}
    return sum(seen.values())


def _check_fp(qmodel, fp_model, x, device):
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        a = qmodel(x.to(device))
        b = fp_model.to(device).eval()(x.to(device))
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item()):
        raise ReconstructionError("fp_model does not compute the same function as the prepared model with quantizers off")


def _reconstruct_block(qmodel, part, k, fn, extras, masks, x_q, x_fp, algorithm: Algorithm, stage: Stage, s_idx,
                       stage_iters, cfg: ReconConfig, lam, device, bar, report, total_units, step):
    """Reconstruct one block (as a block unit, or layer by layer); returns its FP output."""
    block = part.blocks[k]
    dtype = x_fp[0].dtype
    with quant_mode(qmodel, weights=False, acts=False):
        y_fp = run_groups(fn, x_fp, extras, device, out_dtype=dtype)
    label = f"{step + 1}/{total_units} {block.name}"
    fdim = part.feature_dim
    if algorithm.units == "block":
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            r = _optimize(qmodel, block, fn, x_q, x_fp, y_fp, stage, stage_iters, cfg, lam, device,
                          _unit_seed(cfg.seed, s_idx, k), bar, label, extras=extras, masks=masks, feature_dim=fdim)
        report["unit_reports"].append(r)
        return y_fp
    for j, lu in enumerate(part.layer_units(k)):
        # the layer's inputs and FP output, computed inside the block from the cached block inputs
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            lx_q, _ = part.layer_io(k, lu, x_q, extras, device, dtype, False, run_groups)
        with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
            lx_fp, ly_fp = part.layer_io(k, lu, x_fp, extras, device, dtype, True, run_groups)
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            r = _optimize(qmodel, lu, part.layer_fn(k, lu), lx_q, lx_fp, ly_fp, stage, stage_iters, cfg, lam, device,
                          _unit_seed(cfg.seed, s_idx, k, j + 1), bar, f"{label} [{lu.name}]", masks=masks, feature_dim=fdim)
        report["unit_reports"].append(r)
    return y_fp


def _optimize(qmodel, unit: Unit, fn, x_q, x_fp, y_fp, stage: Stage, iters, cfg: ReconConfig, lam, device, seed, bar, label,
              extras=None, masks=None, feature_dim: int = 1):
    """Learn one unit. x_q / x_fp / y_fp: its quantized input, FP input and FP output over the
    calibration set, as one tensor or as groups (lists of tensors; a step samples its batch from
    one group, chosen in proportion to size). extras: per group, the unit's other arguments;
    masks: per group, which positions count in the error (None: all).

    An iteration never waits for the device: the batch indices are drawn on the cache's device and
    the losses go to a device buffer read once per log window. The schedules (rounding-loss beta
    and weight, the step sizes' cosine learning rate) are numbers computed on the host, or, with
    cfg.cuda_graph on CUDA, device ops on an iteration counter: the same step is then captured once
    as a CUDA graph and replayed without host work (_CudaGraphStep)."""
    if isinstance(x_q, torch.Tensor):
        x_q, x_fp, y_fp = [x_q], [x_fp], [y_fp]
    extras = extras or [((), {})] * len(x_q)
    masks = masks or [None] * len(x_q)
    device = torch.device(device)
    world = qdist.world_size()
    batch, share = cfg.batch_size, 1.0
    if world > 1:  # this rank's part of the global batch, drawn from its shard with its own seed
        batch = qdist.shard_sizes(cfg.batch_size, world)[qdist.rank()]
        share = batch / cfg.batch_size
        seed = (seed + 1_000_033 * qdist.rank()) % (2**31)
    torch.manual_seed(seed)
    layers = [qmodel.get_submodule(t) for t in unit.layers]
    acts = [qmodel.get_submodule(t) for t in unit.act_quants]
    acts = [q for q in acts if q.state == "quant" and q.role == "act"]  # static ranges only (not per-token dynamic)
    w_params, a_params = [], []
    if stage.learn_weights:
        for layer in layers:
            layer.weight_quant.init_adaround(layer.layer.weight)
            w_params.append(layer.weight_quant.alpha)
    if stage.learn_acts:
        for q in acts:
            q.learn_scale()
            a_params.append(q.scale)
    for q in acts:
        q.set_drop(stage.drop_prob)
        q.train()
    # w_lr / act_lr are meant for at least lr_iters iterations: a shorter budget gets them scaled up
    lr_scale = max(1.0, stage.lr_iters / iters) if stage.lr_iters else 1.0
    act_lr = stage.act_lr * lr_scale
    graph = False
    if cfg.cuda_graph and device.type == "cuda":
        why_not = _why_not_graphable(x_q, x_fp, y_fp, extras, masks, device, world)
        if why_not:
            print(f"qdrop: unit {unit.name}: eager loop ({why_not})", file=sys.stderr)
        graph = why_not is None
    # One Adam, a parameter group each for V and the step sizes. CUDA: its step count and state on the
    # device, safe to capture; CPU: the fused kernel (one op per parameter instead of ~15). The step
    # sizes' rate is cosine-annealed to 0 over the unit: set as a number each iteration, or, in a
    # graph, held in a device tensor the graph rewrites (a number would be frozen into the capture).
    groups = [dict(params=w_params, lr=stage.w_lr * lr_scale)] if w_params else []
    if a_params:
        groups.append(dict(params=a_params, lr=torch.tensor(act_lr, device=device) if graph else act_lr))
    opt = torch.optim.Adam(groups, **(dict(capturable=True) if device.type == "cuda" else dict(fused=True))) if groups else None
    run = torch.compile(fn) if cfg.compile else fn
    warm = int((cfg.warmup if stage.warmup is None else stage.warmup) * iters)
    b_start = cfg.b_start if stage.b_start is None else stage.b_start
    b_end = cfg.b_end if stage.b_end is None else stage.b_end
    soft_end = iters - int(stage.hard_tail * iters)  # from here on the rounding is hard and V frozen
    sizes = [x.shape[0] for x in x_q]
    weights = torch.tensor(sizes, dtype=torch.float)
    # row 0: the reconstruction error; row 1: the objective (+ lambda * rounding regulariser)
    log_losses = torch.zeros(2, cfg.log_every, device=device)
    counter = torch.zeros((), device=device)  # the iteration inside a graph (a float: exact far beyond any budget)

    def step(g: int, hard: bool, t):
        """One iteration on group g. hard: past soft_end (rounding hard, no rounding loss). t: the
        iteration, an int, or in a graph the counter tensor (the schedules then become device ops)."""
        on_device = isinstance(t, torch.Tensor)
        idx = torch.rand(sizes[g], device=x_q[g].device).argsort()[:batch]  # a batch without replacement
        xb = x_q[g][idx].to(device, non_blocking=True).float()
        if stage.input_mix < 1.0:  # each input element from the quantized model with probability input_mix
            xf = x_fp[g][idx].to(device, non_blocking=True).float()
            xb = torch.lerp(xf, xb, bernoulli_mask(xb, stage.input_mix))
        yb = y_fp[g][idx].to(device, non_blocking=True).float()
        a, kw = rows_of(extras[g], sizes[g], idx)
        err = (run(xb, *a, **kw) - yb).pow(2).sum(feature_dim)
        if masks[g] is None:
            rec = err.mean()
        else:  # padding positions do not count
            m = masks[g][idx].to(device, err.dtype)
            rec = (err * m).sum() / m.sum().clamp(min=1)
        loss = rec
        if w_params and not hard and (on_device or t >= warm):  # the rounding loss from `warm` on,
            progress = (t - warm) / max(1, soft_end - warm)      # its beta annealed from b_start to b_end
            progress = progress.clamp(0, 1) if on_device else min(max(progress, 0.0), 1.0)
            beta = b_end + (b_start - b_end) * (1 - progress)
            weight = lam * (t >= warm).to(rec.dtype) if on_device else lam
            loss = loss + weight * sum(layer.weight_quant.round_loss(beta) for layer in layers)
        if a_params:
            cosine = 0.5 * (1 + (torch.cos(t * (math.pi / iters)) if on_device else math.cos(t * math.pi / iters)))
            if on_device:
                opt.param_groups[-1]["lr"].copy_(act_lr * cosine)
            else:
                opt.param_groups[-1]["lr"] = act_lr * cosine
        if opt:
            opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not in a hard tail with nothing but V to learn
            loss.backward()
        if world > 1:  # the global batch's gradient on every rank: identical steps, identical parameters
            qdist.average_gradients(w_params + a_params, share)
        if opt:
            opt.step()
        if on_device:
            slot = (t % cfg.log_every).long().view(1)
            log_losses.index_copy_(1, slot, torch.stack([rec.detach(), loss.detach()]).view(2, 1))
            counter.add_(1)
        else:
            log_losses[0, t % cfg.log_every] = rec.detach()
            log_losses[1, t % cfg.log_every] = loss.detach()

    graphed = _CudaGraphStep(lambda g, hard: step(g, hard, counter)) if graph else None
    curve, curve_total = [], []
    t0 = time.perf_counter()
    try:
        for it in range(iters):
            g = 0 if len(sizes) == 1 else int(torch.multinomial(weights, 1))
            hard = bool(w_params) and it >= soft_end
            if w_params and it == soft_end:
                for layer in layers:
                    layer.weight_quant.harden()
            if graphed is not None:
                graphed(g, hard)
            else:
                step(g, hard, it)
            if (it + 1) % cfg.log_every == 0 or it + 1 == iters:
                m = (it % cfg.log_every) + 1
                window = log_losses[:, :m]
                if world > 1:  # the global batch's losses; a NaN on any rank stops every rank at once
                    window = qdist.all_reduce(window * share)
                if not torch.isfinite(window).all():  # one host sync per log window
                    bad = int(torch.nonzero(~torch.isfinite(window).all(0))[0]) + it + 1 - m
                    raise ReconstructionError(f"unit {unit.name}: loss became NaN/Inf at iteration {bad}")
                mean, mean_total = window.mean(1).tolist()
                curve.append((it + 1, mean))
                curve_total.append((it + 1, mean_total))
                bar.update(m)
                bar.set_postfix_str(f"unit {label} loss {mean:.4g}")
    finally:
        for q in acts:
            q.set_drop(1.0)
            q.eval()
            if stage.learn_acts:
                q.stop_learning()
    seconds = time.perf_counter() - t0
    for layer in layers:
        if layer.weight_quant.alpha is not None:
            layer.weight_quant.fix_rounding()
    return dict(unit=unit.name, kind=unit.kind, iters=iters, seconds=seconds, ms_per_iter=1000 * seconds / iters,
                final_loss=curve[-1][1] if curve else None, curve=curve, curve_total=curve_total,
                loop="cuda-graph" if graphed is not None else "eager")


def _why_not_graphable(x_q, x_fp, y_fp, extras, masks, device, world) -> str | None:
    """Why this unit's iteration cannot be one CUDA graph (None: it can)."""
    if world > 1:
        return "data-parallel: the all-reduce runs between iterations"
    if len(x_q) > 1 or extras[0] != ((), {}) or masks[0] is not None:
        return "groups of transformer batches are chosen on the host"
    if any(t.device != device for t in (*x_q, *x_fp, *y_fp)):
        return "the cached inputs are not on the GPU (--max-cache-mb)"
    return None


class _CudaGraphStep:
    """Replays step(g, hard) as a CUDA graph: the kernels of one iteration (batch gather, unit
    forward with QDrop's masks, loss, backward, both Adam steps, schedules) are launched by one
    graph replay instead of hundreds of host launches. The first WARMUP iterations of each
    structure (soft / hard rounding) run eagerly on a side stream (allocations, Adam's state,
    cuDNN's algorithm choice), then the next is captured and replayed from then on. Those eager
    iterations are real ones: the result is the same iterations in the same order. The RNG (batch
    indices, QDrop masks) advances through the graph's Philox offsets: a run is reproducible from
    its seed on the same device, so resuming stays exact."""

    WARMUP = 3

    def __init__(self, step):
        self.step, self.graphs, self.eager_runs = step, {}, {}

    def __call__(self, g: int, hard: bool) -> None:
        key = (g, hard)
        if key in self.graphs:
            self.graphs[key].replay()
            return
        done = self.eager_runs.get(key, 0)
        if done < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(g, hard)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_runs[key] = done + 1
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(g, hard)
        graph.replay()  # capture records without running: this replay is the iteration itself
        self.graphs[key] = graph
