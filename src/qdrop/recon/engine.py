"""One reconstruction loop; adaround, brecq and qdrop are configurations of it.

For unit k (in graph order) the loop needs the unit's input in the quantized model,
its input in the FP model and its FP output, on every calibration sample. They are
carried along the chain of block units: after unit k is reconstructed, one pass of
unit k alone (quantized) gives unit k+1's quantized input, and its FP output is unit
k+1's FP input. The cost is two passes of each unit over the calibration set, never
a pass of the full model per unit.

The FP model is the prepared model with every quantizer off (it computes the original
function; tested), so the FP and quantized passes share modules and code.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..errors import DataError, ReconstructionError, UsageError
from ..io import atomic_torch_save, load_torch_file
from ..graph.prepare import quant_mode, quantizers  # noqa: F401 (quant_mode: re-exported by qdrop.recon)
from ..graph.units import Unit, block_units, layer_units, subgraph
from ..quant.layers import QuantLayer
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
def run_chunks(module: nn.Module, x: torch.Tensor, device, chunk: int = 128, out_dtype=None) -> torch.Tensor:
    outs = []
    for i in range(0, x.shape[0], chunk):
        y = module(x[i : i + chunk].to(device, non_blocking=True).float())
        outs.append(y.to(out_dtype or y.dtype) if x.device == y.device else y.to(x.device, out_dtype or y.dtype))
    return torch.cat(outs)


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

    def __init__(self, device: torch.device, n: int, max_bytes: int | None):
        self.device, self.n, self.max_bytes = device, n, max_bytes

    def placement(self, sample_shape, copies: int = 3):
        per = math.prod(sample_shape) * self.n * copies
        if self.max_bytes is None or per * 4 <= self.max_bytes:
            return self.device, torch.float32
        if per * 2 <= self.max_bytes:
            return torch.device("cpu") if self.device.type == "cuda" else self.device, torch.float16
        raise ReconstructionError(
            f"memory cap {self.max_bytes} bytes is too small: caching {copies} tensors of shape "
            f"{tuple(sample_shape)} for {self.n} samples needs at least {per * 2} bytes in half precision"
        )


def reconstruct(
    qmodel: fx.GraphModule,
    fp_model: nn.Module | None,
    calib_data: torch.Tensor,
    algo: str | Algorithm = "qdrop",
    iters: int = 20000,
    batch_size: int = 32,
    lam: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    state_path: str | None = None,
    progress: bool = True,
    compile: bool = False,
    max_cache_bytes: int | None = None,
    on_unit_done=None,
) -> dict:
    """Reconstruct `qmodel` (prepared and calibrated) in place; returns a report.

    fp_model is optional: when given it is only checked against the prepared model with
    quantizers off (the FP reference the loop uses). state_path: a file where the model
    state is saved after every unit; rerunning the same call resumes after the last
    finished unit and gives the same result as an uninterrupted run.
    """
    algorithm = get_algorithm(algo) if isinstance(algo, str) else algo
    cfg = ReconConfig(iters=iters, batch_size=batch_size, lam=lam, seed=seed, compile=compile,
                      max_cache_bytes=max_cache_bytes)
    if not isinstance(iters, int) or iters <= 0:
        raise UsageError(f"iters must be a positive integer, got {iters!r}")
    if not isinstance(calib_data, torch.Tensor):
        raise UsageError("calib_data must be a tensor of calibration inputs [N, ...]")
    if calib_data.shape[0] < batch_size:
        raise DataError(f"calibration set has {calib_data.shape[0]} samples, fewer than the batch size {batch_size}")
    if not torch.isfinite(calib_data).all():
        raise DataError("calibration data contains NaN or Inf values")
    qs = quantizers(qmodel)
    if not qs or not all(q.calibrated for _, q in qs if q.role == "weight") or not any(q.calibrated for _, q in qs if q.role == "act"):
        raise ReconstructionError("model is not calibrated: run qdrop.calibrate(qmodel, batches) before reconstruct")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    qmodel.to(device).eval()
    lam = default_lambda(qmodel) if cfg.lam is None else cfg.lam
    if fp_model is not None:
        _check_fp(qmodel, fp_model, calib_data[: min(8, len(calib_data))], device)

    blocks = block_units(qmodel)
    total_units = len(blocks) * len(algorithm.stages)
    meta = dict(algo=algorithm.name, iters=iters, batch_size=batch_size, lam=lam, seed=seed, units=[u.name for u in blocks],
                n_calib=int(calib_data.shape[0]))
    done = -1
    report = dict(meta, lam=lam, unit_reports=[], device=str(device))
    saved = _load_state(state_path, device) if state_path and os.path.exists(state_path) else None
    if saved is not None:
        if saved["meta"] != meta:
            raise ReconstructionError(f"{state_path} was written by a different run ({saved['meta']}); remove it or use another output")
        qmodel.load_state_dict(saved["state_dict"])
        done = saved["done"]
        report["unit_reports"] = saved["unit_reports"]

    cache = _Cache(device, calib_data.shape[0], max_cache_bytes)
    per_block = [len(layer_units(qmodel, b)) if algorithm.units == "layer" else 1 for b in blocks]
    bar = tqdm(total=sum(max(1, int(round(iters * s.iters_scale))) for s in algorithm.stages) * sum(per_block),
               disable=not progress,
               desc=f"{algorithm.name}", unit="it", dynamic_ncols=True)
    bar.update(sum(r["iters"] for r in report["unit_reports"]) if done >= 0 else 0)
    try:  # the bar is closed on errors too, so that an error message starts on its own line
        step = 0
        for s_idx, stage in enumerate(algorithm.stages):
            stage_iters = max(1, int(round(iters * stage.iters_scale)))
            x_dev, x_dtype = cache.placement(calib_data.shape[1:])
            x_fp = calib_data.to(x_dev, x_dtype)
            x_q = x_fp
            for k, block in enumerate(blocks):
                mod = subgraph(qmodel, block.nodes, block.input, [block.output])
                if step <= done:  # finished before a restart: only move the caches along
                    with quant_mode(qmodel, weights=False, acts=False):
                        y_fp = run_chunks(mod, x_fp, device, out_dtype=x_dtype)
                else:
                    y_fp = _reconstruct_block(qmodel, block, mod, x_q, x_fp, algorithm, stage, s_idx, k, stage_iters,
                                              cfg, lam, device, cache, bar, report, total_units, step)
                    if state_path:
                        atomic_torch_save(dict(meta=meta, done=step, state_dict=qmodel.state_dict(),
                                          unit_reports=report["unit_reports"]), state_path)
                    if on_unit_done is not None:
                        on_unit_done(step, block.name)
                with quant_mode(qmodel, weights=True, acts=stage.act_quant):
                    x_q = run_chunks(mod, x_q, device, out_dtype=x_dtype)
                x_fp = y_fp
                step += 1
    finally:
        bar.close()
    # every activation quantizer on, probabilities back to 1
    for _, q in quantizers(qmodel):
        if q.calibrated:
            q.state = "quant"
        q.prob = 1.0
    report["seconds"] = sum(r["seconds"] for r in report["unit_reports"])
    return report


def _check_fp(qmodel, fp_model, x, device):
    with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
        a = qmodel(x.to(device))
        b = fp_model.to(device).eval()(x.to(device))
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item()):
        raise ReconstructionError("fp_model does not compute the same function as the prepared model with quantizers off")


def _reconstruct_block(qmodel, block: Unit, mod, x_q, x_fp, algorithm: Algorithm, stage: Stage, s_idx, k, stage_iters,
                       cfg: ReconConfig, lam, device, cache, bar, report, total_units, step):
    """Reconstruct one block (as a block unit, or layer by layer); returns its FP output."""
    with quant_mode(qmodel, weights=False, acts=False):
        y_fp = run_chunks(mod, x_fp, device, out_dtype=x_fp.dtype)
    label = f"{step + 1}/{total_units} {block.name}"
    if algorithm.units == "block":
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            r = _optimize(qmodel, block, mod, x_q, x_fp, y_fp, stage, stage_iters, cfg, lam, device,
                          _unit_seed(cfg.seed, s_idx, k), bar, label)
        report["unit_reports"].append(r)
        return y_fp
    for j, lu in enumerate(layer_units(qmodel, block)):
        # the layer's inputs and FP output, computed inside the block from the cached block inputs
        to_in = subgraph(qmodel, block.nodes, block.input, [lu.input])
        to_in_out = subgraph(qmodel, block.nodes, block.input, [lu.input, lu.output])
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            lx_q = run_chunks(to_in, x_q, device, out_dtype=x_q.dtype)
        with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
            pairs = [to_in_out(x_fp[i : i + 128].to(device).float()) for i in range(0, x_fp.shape[0], 128)]
        lx_fp = torch.cat([p[0] for p in pairs]).to(x_fp.dtype)
        ly_fp = torch.cat([p[1] for p in pairs]).to(x_fp.dtype)
        lmod = subgraph(qmodel, lu.nodes, lu.input, [lu.output])
        with quant_mode(qmodel, weights=True, acts=stage.act_quant):
            r = _optimize(qmodel, lu, lmod, lx_q, lx_fp, ly_fp, stage, stage_iters, cfg, lam, device,
                          _unit_seed(cfg.seed, s_idx, k, j + 1), bar, f"{label} [{lu.name}]")
        report["unit_reports"].append(r)
    return y_fp


def _optimize(qmodel, unit: Unit, mod, x_q, x_fp, y_fp, stage: Stage, iters, cfg: ReconConfig, lam, device, seed, bar, label):
    torch.manual_seed(seed)
    layers = [qmodel.get_submodule(t) for t in unit.layers]
    acts = [qmodel.get_submodule(t) for t in unit.act_quants]
    acts = [q for q in acts if q.state == "quant"]
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
        q.prob = stage.drop_prob
        q.train()
    # w_lr / act_lr are meant for at least lr_iters iterations: a shorter budget gets them scaled up
    lr_scale = max(1.0, stage.lr_iters / iters) if stage.lr_iters else 1.0
    opt_w = torch.optim.Adam(w_params, lr=stage.w_lr * lr_scale) if w_params else None
    opt_a = torch.optim.Adam(a_params, lr=stage.act_lr * lr_scale) if a_params else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0.0) if opt_a else None
    run = torch.compile(mod) if cfg.compile else mod
    warm = int((cfg.warmup if stage.warmup is None else stage.warmup) * iters)
    b_start = cfg.b_start if stage.b_start is None else stage.b_start
    b_end = cfg.b_end if stage.b_end is None else stage.b_end
    soft_end = iters - int(stage.hard_tail * iters)  # from here on the rounding is hard and V frozen
    n = x_q.shape[0]
    # row 0: the reconstruction error; row 1: the objective (+ lambda * rounding regulariser)
    log_losses = torch.zeros(2, cfg.log_every, device=device)
    curve, curve_total = [], []
    t0 = time.perf_counter()
    try:
        for it in range(iters):
            idx = torch.randperm(n, device=x_q.device)[: cfg.batch_size]
            xb = x_q[idx].to(device, non_blocking=True).float()
            if stage.input_mix < 1.0:
                xf = x_fp[idx].to(device, non_blocking=True).float()
                xb = torch.where(torch.rand_like(xb) < stage.input_mix, xb, xf)
            yb = y_fp[idx].to(device, non_blocking=True).float()
            if w_params and it == soft_end:
                for layer in layers:
                    layer.weight_quant.hard_round = True
            out = run(xb)
            rec = (out - yb).pow(2).sum(1).mean()
            loss = rec
            if w_params and warm <= it < soft_end:
                beta = b_end + (b_start - b_end) * max(0.0, 1.0 - (it - warm) / max(1, soft_end - warm))
                loss = loss + lam * sum(layer.weight_quant.round_loss(beta) for layer in layers)
            if opt_w:
                opt_w.zero_grad(set_to_none=True)
            if opt_a:
                opt_a.zero_grad(set_to_none=True)
            if loss.requires_grad:  # not in a hard tail with nothing but V to learn
                loss.backward()
            if opt_w:
                opt_w.step()
            if opt_a:
                opt_a.step()
                sched.step()
            log_losses[0, it % cfg.log_every] = rec.detach()
            log_losses[1, it % cfg.log_every] = loss.detach()
            if (it + 1) % cfg.log_every == 0 or it + 1 == iters:
                m = (it % cfg.log_every) + 1
                window = log_losses[:, :m]
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
            q.prob = 1.0
            q.eval()
            if stage.learn_acts:
                q.stop_learning()
    seconds = time.perf_counter() - t0
    for layer in layers:
        if layer.weight_quant.alpha is not None:
            layer.weight_quant.fix_rounding()
    return dict(unit=unit.name, kind=unit.kind, iters=iters, seconds=seconds, ms_per_iter=1000 * seconds / iters,
                final_loss=curve[-1][1] if curve else None, curve=curve, curve_total=curve_total)
