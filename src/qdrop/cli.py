"""Command line: qdrop quantize | eval | inspect | demo.

Every error that is the user's (bad flag value, missing data, untraceable model) is
printed as one line 'qdrop: error: ...' with exit status 2; nothing half-written is left.

`torchrun --nproc-per-node N -m qdrop quantize ...` runs a vision quantization data-parallel
(qdrop.distributed): rank 0 prints and writes; the other ranks print nothing, not even the
errors every rank meets alike (qdrop's checks see the same arguments and data on every rank).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from . import distributed as qdist
from .api import is_transformer_spec
from .errors import QdropError, UsageError
from .io import torch_threads
from .recon.configs import ALGORITHMS, CANDIDATES, RESEARCH_ALGOS, SHIPPED, UNIT_LOSSES


def _bits(text: str) -> str:
    from .quant.scheme import parse_bits

    try:
        parse_bits(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.lower()


def _mixed_bits(text: str) -> str:
    from .quant.scheme import parse_mixed_bits

    try:
        parse_mixed_bits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.lower()


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="cifar10_resnet20|32|44|56, efficientnet_lite0, fmnist_resnet, "
                   "torchvision:NAME, module:path.py:factory")
    p.add_argument("--data", default=None, help="dataset folder or data root (default: $QDROP_DATA or ../shared/data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--eval-limit", type=_positive, default=None, help="evaluate on a fixed subset of this many test samples")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    from .export.x86 import EMULATED_CPUS
    from .graph.prepare import PRESETS, TARGET_CPUS
    from .nlp.pipeline import NLP_ALGOS
    from .nlp_pipeline import INITS
    from .pipeline import EXPORT_FORMATS

    parser = argparse.ArgumentParser(prog="qdrop", description="Post-training quantization: naive, AdaRound, BRECQ, QDrop")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, evaluate it, save checkpoint and metrics.json")
    _common(q)
    q.add_argument("--bits", type=_mixed_bits, required=True,
                   help="e.g. w4a4, w2a4, w8a8 (2..8 bits); w2.5a4: per-layer weight bits averaging 2.5 (mixed precision)")
    q.add_argument("--budget", default=None, metavar="KIND=VALUE",
                   help="mixed precision under a budget: size=MB (integer weights, 10^6 bytes) or bops=G; --bits gives "
                   "the activation bits")
    q.add_argument("--sensitivity", choices=("output", "hessian"), default=None,
                   help="mixed precision: per-layer sensitivity measure (default output: error at the unit's output; "
                   "hessian: HAWQ-v2 trace x perturbation)")
    q.add_argument("--algo", choices=RESEARCH_ALGOS + tuple(a for a in NLP_ALGOS if a not in RESEARCH_ALGOS), default="naive",
                   help="vision: naive|adaround|brecq|qdrop (the papers' algorithms), "
                   f"{'|'.join(SHIPPED)} (beats qdrop at every bit-width measured: docs/algorithms/beyond.md), "
                   "or a candidate measured in docs/algorithms/ "
                   f"({'|'.join(c for c in CANDIDATES if c not in SHIPPED)}); transformers (--model hf:...): "
                   "naive|os|smoothquant|osplus, or adaround|brecq|qdrop (block reconstruction, after --init)")
    q.add_argument("--init", choices=INITS, default=None,
                   help="transformers with adaround|brecq|qdrop: what runs before reconstruction (naive: observers only; "
                   "smoothquant|osplus|os: that equivalent transform and its calibration; default naive)")
    q.add_argument("--units", default=None, metavar="MODULE",
                   help="transformers: the container of the repeated blocks, one reconstruction unit each (default: found "
                   "from the structure, e.g. model.layers)")
    q.add_argument("--split-blocks", action="store_true",
                   help="transformers with adaround|brecq|qdrop: one reconstruction unit per part of each block (its "
                   "attention, its MLP) instead of one per block")
    q.add_argument("--task", choices=("sts", "lm"), default=None,
                   help="transformers: sts (sentence embeddings, Spearman on STS-B) or lm (perplexity on WikiText-2)")
    q.add_argument("--act-granularity", choices=("per_tensor", "per_token"), default="per_tensor",
                   help="transformers: static per-tensor or dynamic per-token activation ranges")
    q.add_argument("--max-windows", type=_positive, default=None, help="lm: evaluate on the first N 1024-token windows")
    q.add_argument("--calib-len", type=_positive, default=None,
                   help="lm: tokens per calibration segment (default 128; the evaluation windows are 1024 tokens, and short "
                   "segments calibrate on more attention-sink starts than those windows hold)")
    q.add_argument("--calib-batch", type=_positive, default=None, metavar="N",
                   help="transformers: samples per calibration batch (default: --batch-size; lm: at most 8). The MSE "
                   "observers and OS+ sample per batch, so the batching changes the calibrated model: pin it to compare "
                   "runs of different --batch-size")
    q.add_argument("--onnx", action="store_true",
                   help="transformers: also export OUT/model.onnx (QDQ) and score it in ONNX Runtime on the same data")
    q.add_argument("--fine-lr", type=float, default=None,
                   help="os: Adam learning rate of token-wise clipping's LSQ+ fine stage (default 1e-2; the paper's 1e-5 "
                   "barely moves the ranges in 3 epochs over 256 samples)")
    q.add_argument("--down-proj", action="store_true",
                   help="smoothquant/osplus on Llama: also scale up_proj -> down_proj (the MLP's inner activation, "
                   "whose outliers the published methods leave to the quantizer)")
    q.add_argument("--rotate", choices=("mlp", "all"), default=None,
                   help="transformers: rotate Linear inputs by a randomized Hadamard matrix, applied online, after the "
                   "transform (exact; spreads outlier channels; docs/nlp.md): mlp = every MLP's inner activation "
                   "(down_proj / output.dense input), all = every quantized Linear's input")
    q.add_argument("--rotate-mlp", dest="rotate", action="store_const", const="mlp",
                   help="the same as --rotate mlp (kept: earlier results name it)")
    q.add_argument("--keep-fp", action="append", default=None, metavar="PATTERN",
                   help="transformers: keep the Linears whose names match this fnmatch pattern in floating point "
                   "(repeatable; e.g. lm_head, as GPTQ/AWQ/QuaRot's published W4 results do); recorded in metrics.json")
    q.add_argument("--w-rounding", choices=("nearest", "gptq"), default=None,
                   help="transformers: weight codes by nearest rounding (default) or by GPTQ, chosen block by block "
                   "against each Linear's calibration inputs; with a reconstruction --algo, it starts from GPTQ's codes "
                   "(docs/nlp.md)")
    q.add_argument("--gptq-calib", type=_positive, default=None, metavar="N",
                   help="with --w-rounding gptq: GPTQ's input statistics from N calibration samples (lm: the file's last N "
                   "segments) while the transform and the ranges keep --calib's (default: --calib's)")
    q.add_argument("--gptq-damp", type=float, default=None, metavar="F",
                   help="with --w-rounding gptq: GPTQ's damping, a fraction of H's mean diagonal (default 0.01, the paper's)")
    q.add_argument("--gptq-search", action="store_const", const=True, default=None,
                   help="with --w-rounding gptq: each weight row's step chosen among 0.75-1.1x the observer's by GPTQ's "
                   "output error on the calibration inputs (docs/nlp.md)")
    q.add_argument("--e2e-steps", type=_positive, default=None, metavar="N",
                   help="transformers: last, N Adam steps that learn every weight's per-channel step size against the FP "
                   "model's prediction (LM: KL of the logits; encoders: the last hidden state's error), the integer codes held; one calibration batch a step "
                   "(docs/nlp.md)")
    q.add_argument("--e2e-lr", type=float, default=None, metavar="F",
                   help="with --e2e-steps: Adam's learning rate on log(step / initial step) (default 1e-2)")
    q.add_argument("--backend", choices=sorted(PRESETS), default="academic")
    q.add_argument("--calib", type=_positive, default=None,
                   help="calibration samples from the training split (default: 1024; transformers: 256)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--iters", type=_positive, default=20000, help="reconstruction iterations per unit")
    q.add_argument("--batch-size", type=_positive, default=32)
    q.add_argument("--lr-iters", type=_positive, default=None, metavar="N",
                   help="engine option for any reconstruction algorithm: below N iterations per unit both learning rates "
                   "are scaled by N/iters, so that a short budget can finish the rounding (docs/algorithms/qdrop-plus.md; "
                   "default: the paper's rates)")
    q.add_argument("--recon-loss", choices=UNIT_LOSSES, default=None,
                   help="Hugging Face models: the blocks' output error, mse (default) or capped (positions of outsized "
                   "FP output count by their relative error; docs/nlp.md)")
    q.add_argument("--lambda", dest="lam", type=float, default=None, help="rounding-loss weight (default: from the architecture)")
    q.add_argument("--leaf", action="append", default=[], help="module to keep in FP as a traced leaf (repeatable)")
    q.add_argument("--w-observer", default=None, help="override the preset's weight observer (minmax|ema_minmax|percentile|mse)")
    q.add_argument("--a-observer", default=None, help="override the preset's activation observer")
    q.add_argument("--int32-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="simulate the integer runtime's int32 bias (codes at s_x*s_w) in every layer fed by a per-tensor "
                   "activation quantizer (default: the preset's choice; on for onnxruntime and qnn)")
    q.add_argument("--target-cpu", choices=sorted(TARGET_CPUS), default=None,
                   help="onnxruntime preset: x86 CPUs the integer model must be exact on. avx2 (default): 7-bit weights, "
                   "exact on every x86-64 CPU; vnni: full int8 weights, exact only with AVX-512 VNNI / AVX-VNNI / AMX "
                   "(saturates on AVX2)")
    q.add_argument("--eval-integer", action="store_true",
                   help="onnxruntime preset: also score the model as ONNX Runtime's integer kernels compute it (exact "
                   "integer sums and the runtime's requantisation, replayed in PyTorch; no runtime needed): the top-1 "
                   "the deployed model delivers on x86 (with --target-cpu vnni: on VNNI/AMX CPUs only), beside the "
                   "simulation's")
    q.add_argument("--compile", action="store_true", help="torch.compile each unit during reconstruction")
    q.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: replay each reconstruction iteration as a CUDA graph (no host launches per kernel)")
    q.add_argument("--max-cache-mb", type=_positive, default=None,
                   help="cap on cached unit inputs/outputs in memory (beyond it: half precision, then a temporary file "
                   "in --out)")
    q.add_argument("--out", required=True, help="output directory")

    e = sub.add_parser("eval", help="evaluate the FP model and, with --checkpoint, a quantized one on the test split")
    _common(e)
    e.add_argument("--checkpoint", default=None, help="a quantize --out directory or its model.pt")

    i = sub.add_parser("inspect", help="show what is quantized: layers, weight schemes, activation quantizers, units")
    i.add_argument("model", help="a model name, or a `qdrop quantize` output folder (its checkpoint, mixed bits included)")
    i.add_argument("--bits", type=_bits, default="w4a4")
    i.add_argument("--backend", choices=sorted(PRESETS), default="academic")
    i.add_argument("--units", action="store_true", help="print the block and layer reconstruction units")
    i.add_argument("--leaf", action="append", default=[])
    i.add_argument("--data", default=None)
    i.add_argument("--random", action="store_true", help="random weights (no pretrained download needed)")
    i.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="export a quantized checkpoint: QDQ ONNX, TensorRT ranges, QNN/AIMET encodings")
    x.add_argument("--checkpoint", required=True, help="a quantize --out directory or its model.pt")
    x.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, default="onnx",
                   help="onnx: QDQ ONNX; tensorrt: QDQ ONNX + .ranges.json; qnn: FP32 ONNX + .encodings.json (AIMET)")
    x.add_argument("--out", default=None, help="output .onnx path (default: CHECKPOINT_DIR/model.onnx)")
    x.add_argument("--int4", action="store_true", help="write INT4/UINT4 Q/DQ (opset 21) for grids of <= 4 bits")
    x.add_argument("--check", nargs="?", const=True, default=None, metavar="DATA",
                   help="run ONNX Runtime next to the simulation on the test split (DATA: dataset folder; "
                        "default: the model's data) and write parity.json beside the model")
    x.add_argument("--target-cpu", choices=sorted(TARGET_CPUS), default=None,
                   help="refuse the export unless the model is exact on these x86 CPUs (avx2: every x86-64 CPU); "
                   "default: the checkpoint's own target, with a warning when it can saturate without VNNI")
    x.add_argument("--emulate-cpu", choices=sorted(EMULATED_CPUS), default=None,
                   help="with --check: run ONNX Runtime as an AVX2 CPU without VNNI would (QEMU qemu-x86_64 -cpu Haswell)")
    x.add_argument("--data", default=None, help="data root for loading the model (default: $QDROP_DATA or ../shared/data)")
    x.add_argument("--eval-limit", type=_positive, default=None, help="check on a fixed subset of this many test samples")
    x.add_argument("--threads", type=_positive, default=None)

    # bench / report / analyze have their own parsers (qdrop.bench); listed here for --help
    for name, text in (("bench", "run a sweep from a YAML config (resumable): qdrop bench CONFIG.yaml [--dry-run] [--only k=v,...] [--ray [ADDRESS]]"),
                       ("report", "render a sweep's results as Markdown tables and plots: qdrop report RESULTS_DIR"),
                       ("analyze", "per-unit error and loss-flatness view of quantized checkpoints: qdrop analyze RUN_DIR ...")):
        sub.add_parser(name, help=text, add_help=False)

    d = sub.add_parser("demo", help="Fashion-MNIST: train a small ResNet (cached), quantize, print a table")
    d.add_argument("--iters", type=_positive, default=500, help="QDrop iterations per unit")
    d.add_argument("--retrain", action="store_true")
    d.add_argument("--threads", type=_positive, default=None)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if qdist.launched():
        if not qdist.is_main():  # one copy of every message: rank 0's
            import warnings

            warnings.simplefilter("ignore")
        if not argv or argv[0] != "quantize":
            if qdist.is_main():
                print("qdrop: error: under torchrun only `qdrop quantize` runs data-parallel; run other commands as one "
                      "process", file=sys.stderr)
            return 2
        try:
            return _main(argv)
        finally:
            qdist.shutdown()
    return _main(argv)


def _main(argv) -> int:
    if argv and argv[0] in ("bench", "report", "analyze"):
        from . import bench

        return {"bench": bench.bench_main, "report": bench.report_main, "analyze": bench.analyze_main}[argv[0]](argv[1:])
    parser = build_parser()
    if qdist.is_main():
        args = parser.parse_args(argv)
    else:  # argparse's own messages: rank 0's copy is enough
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    try:
        with torch_threads(getattr(args, "threads", None)):  # main() called in-process leaves torch's count as it was
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if qdist.is_main():
            print("qdrop: interrupted", file=sys.stderr)
        return 130
    except QdropError as e:  # the errors qdrop raises on purpose: one line, exit 2; anything else is a bug
        if qdist.is_main():
            print(f"qdrop: error: {e}", file=sys.stderr)
        return 2


def cmd_quantize(args) -> int:
    from .pipeline import QuantizeJob, run_quantize

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if is_transformer_spec(args.model) or args.task:
        return _quantize_transformer(args, out)
    if args.algo not in RESEARCH_ALGOS:
        raise UsageError(f"--algo {args.algo} is for transformers: give --model hf:PATH_OR_NAME --task sts|lm")
    _refuse(args, _TRANSFORMER_ONLY, "to vision models (they are transformer options); drop them")
    job = QuantizeJob(args.model, args.bits, args.algo, args.backend, data=args.data, calib=args.calib or 1024,
                      seed=args.seed, iters=args.iters, batch_size=args.batch_size, lam=args.lam, device=args.device,
                      leaf_modules=tuple(args.leaf), eval_limit=args.eval_limit, compile=args.compile, cuda_graph=args.cuda_graph,
                      max_cache_mb=args.max_cache_mb, w_observer=args.w_observer, a_observer=args.a_observer,
                      int32_bias=args.int32_bias, target_cpu=args.target_cpu, budget=args.budget,
                      sensitivity=args.sensitivity, lr_iters=args.lr_iters)
    metrics = run_quantize(job, out=out, eval_integer=args.eval_integer)
    if not qdist.is_main():
        return 0
    where = " on VNNI/AMX CPUs" if metrics["target_cpu"] == "vnni" else ""
    integer = f", as ONNX Runtime's integer kernels compute it{where} {metrics['quant_integer']:.2f}" if args.eval_integer else ""
    print(f"{metrics['model']} {metrics['bits']} {metrics['algo']}: FP {metrics['fp']:.2f}  quantized {metrics['quant']:.2f}"
          f"{integer} ({metrics['metric']}, {metrics['eval_size']} test samples) -> {out / 'metrics.json'}")
    return 0


# flags of the fx (vision) path: given with an hf: model they would be ignored, so they are refused
_VISION_ONLY = (("backend", "academic", "--backend"), ("target_cpu", None, "--target-cpu"), ("int32_bias", None, "--int32-bias"),
                ("budget", None, "--budget"), ("sensitivity", None, "--sensitivity"), ("leaf", [], "--leaf"),
                ("eval_limit", None, "--eval-limit"), ("compile", False, "--compile"), ("device", None, "--device"),
                ("cuda_graph", False, "--cuda-graph"), ("eval_integer", False, "--eval-integer"))
# and the transformer path's flags, refused with a vision model
_TRANSFORMER_ONLY = (("act_granularity", "per_tensor", "--act-granularity"), ("max_windows", None, "--max-windows"),
                     ("calib_len", None, "--calib-len"), ("onnx", False, "--onnx"), ("fine_lr", None, "--fine-lr"),
                     ("down_proj", False, "--down-proj"), ("rotate", None, "--rotate"), ("keep_fp", None, "--keep-fp"),
                     ("w_rounding", None, "--w-rounding"), ("gptq_calib", None, "--gptq-calib"),
                     ("gptq_damp", None, "--gptq-damp"), ("gptq_search", None, "--gptq-search"), ("calib_batch", None, "--calib-batch"),
                     ("e2e_steps", None, "--e2e-steps"), ("e2e_lr", None, "--e2e-lr"), ("init", None, "--init"), ("units", None, "--units"),
                     ("split_blocks", False, "--split-blocks"),
                     ("recon_loss", None, "--recon-loss"))


def _refuse(args, flags, why: str) -> None:
    given = [flag for attr, default, flag in flags if getattr(args, attr) != default]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


def _quantize_transformer(args, out: Path) -> int:
    from .nlp_pipeline import run_nlp_quantize
    from .quant.scheme import is_average_bits

    if not is_transformer_spec(args.model):
        raise UsageError(f"--task {args.task} needs a Hugging Face model: --model hf:PATH_OR_NAME (got {args.model!r})")
    if not args.task:
        raise UsageError("a Hugging Face model needs --task sts|lm")
    _refuse(args, _VISION_ONLY, "to Hugging Face models (they are vision-path options); drop them")
    if is_average_bits(args.bits):
        raise UsageError(f"--bits {args.bits}: mixed precision is for vision models; give whole bits, e.g. w4a8")
    if args.task != "lm":
        _refuse(args, (("max_windows", None, "--max-windows"), ("calib_len", None, "--calib-len")),
                f"to --task {args.task}: they set the lm task's text segments")
    recon = args.algo in ALGORITHMS
    extra = dict(init=args.init, iters=args.iters, lam=args.lam, units=args.units, split_blocks=args.split_blocks,
                 max_cache_mb=args.max_cache_mb,
                 lr_iters=args.lr_iters, recon_loss=args.recon_loss) if recon else {}
    if not recon:
        _refuse(args, (("init", None, "--init"), ("units", None, "--units"), ("split_blocks", False, "--split-blocks"),
                       ("lam", None, "--lambda"),
                       ("max_cache_mb", None, "--max-cache-mb"), ("lr_iters", None, "--lr-iters"),
                       ("recon_loss", None, "--recon-loss")),
                f"to --algo {args.algo}: they are for adaround|brecq|qdrop")
    m = run_nlp_quantize(args.model, args.task, data=args.data, bits=args.bits, algo=args.algo, out=out,
                         calib=args.calib or 256, calib_len=args.calib_len or 128, onnx=args.onnx, seed=args.seed,
                         batch_size=args.batch_size, calib_batch=args.calib_batch,
                         act_granularity=args.act_granularity, max_windows=args.max_windows, down_proj=args.down_proj,
                         rotate=args.rotate, keep_fp=tuple(args.keep_fp) if args.keep_fp else None,
                         w_rounding=args.w_rounding, gptq_calib=args.gptq_calib, gptq_damp=args.gptq_damp,
                         gptq_search=args.gptq_search, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr,
                         w_observer=args.w_observer, a_observer=args.a_observer or "minmax",
                         **({"fine_lr": args.fine_lr} if args.fine_lr is not None else {}), **extra, progress=True)
    init = f" (init {m['init']}, {m['iters']} it/block)" if recon else ""
    deployed = f"  ONNX Runtime {m['onnx']['deployed']:.2f} ({m['onnx']['cpu']['kind']})" if "onnx" in m else ""
    print(f"{m['model']} {m['bits']} {m['algo']}{init}: FP {m['fp']:.2f}  quantized {m['quant']:.2f}{deployed} "
          f"({m['metric']}) -> {out / 'metrics.json'}")
    return 0


def cmd_eval(args) -> int:
    from .data import load_split
    from .eval.metrics import top1
    from .models import load_model
    from .pipeline import load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        qmodel, model, info = load_checkpoint(args.checkpoint, data=args.data)
    else:
        model, info = load_model(args.model, data=args.data)
        qmodel = None
    test = load_split(info.dataset, "test", data=args.data, preprocess=info.preprocess, limit=args.eval_limit)
    result = dict(model=args.model, eval_data=test.description, fp=round(top1(model, test.x, test.y, device=device), 2))
    if qmodel is not None:
        result["quant"] = round(top1(qmodel, test.x, test.y, device=device), 2)
    print(json.dumps(result))
    return 0


def cmd_inspect(args) -> int:
    from .graph import block_units, describe, layer_units, prepare
    from .models import load_model

    if Path(args.model).is_dir() or args.model.endswith(".pt"):  # a checkpoint: show it as it was quantized
        from .pipeline import load_checkpoint

        qmodel, _, _ = load_checkpoint(args.model, data=args.data, pretrained=False)
        args.backend, args.bits = qmodel.qdrop_config.backend, qmodel.qdrop_config.bits
        alloc = qmodel.qdrop_config.layer_bits
        if alloc:
            args.bits += f" (mixed: {len(alloc)} layers chosen by the search)"
    else:
        model, info = load_model(args.model, data=args.data, pretrained=not args.random)
        qmodel = prepare(model, (torch.zeros((1, *info.input_shape)),), backend=args.backend, bits=args.bits,
                         leaf_modules=args.leaf)
    desc = describe(qmodel)
    if args.units:
        blocks = block_units(qmodel)
        desc["units"] = [dict(name=b.name, layers=b.layers, act_quants=b.act_quants,
                              layer_units=[u.name for u in layer_units(qmodel, b)]) for b in blocks]
    if args.json:
        print(json.dumps(desc, indent=1))
        return 0
    print(f"{args.model}: backend={args.backend} bits={args.bits}")
    print(f"\n{len(desc['layers'])} quantized layers")
    print(f"  {'layer':40s} {'type':8s} {'bits':>4s}  scheme")
    for l in desc["layers"]:
        kind = "sym" if l["symmetric"] else "asym"
        print(f"  {l['name']:40s} {l['type']:8s} {l['bits']:>4d}  {kind} {l['grid']} {l['granularity']} {l['observer']}")
    print(f"\n{len(desc['activations'])} activation quantizers")
    for a in desc["activations"]:
        kind = "sym" if a["symmetric"] else "asym"
        print(f"  {a['name']:40s} {a['bits']:>2d}-bit {kind} {a['grid']}  after {a['after']}  -> {', '.join(a['feeds'])}")
    if args.units:
        print(f"\n{len(desc['units'])} block units")
        for k, u in enumerate(desc["units"]):
            print(f"  {k:3d} {u['name']:40s} layers: {', '.join(u['layers'])}")
    return 0


def cmd_export(args) -> int:
    from .pipeline import run_export

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "model.onnx"
    r = run_export(ckpt, out, fmt=args.fmt, check_data=args.check, data=args.data, int4=args.int4,
                   eval_limit=args.eval_limit, target_cpu=args.target_cpu, emulate_cpu=args.emulate_cpu)
    if "warning" in r:
        print(f"qdrop: warning: {r['warning']}", file=sys.stderr)
    print(f"wrote {r['path']} ({r['format']}, opset {r['opset']}, {r['act_quantizers']} activation and "
          f"{r['weight_quantizers']} weight quantizers)" + (f" + {r['side_file']}" if "side_file" in r else ""))
    if "parity" in r:
        p = r["parity"]
        print(f"parity on {p['samples']} test samples: top-1 agreement {p['agreement']:.2f} %, simulation {p['sim_top1']:.2f} %, "
              f"ONNX Runtime {p['ort_top1']:.2f} %, max |diff| {p['max_abs_diff']:.4g}, mean |diff| {p['mean_abs_diff']:.4g}")
        e = p["integer_emulation"]
        print(f"integer emulation (ONNX Runtime's arithmetic in PyTorch) vs ONNX Runtime: top-1 agreement "
              f"{e['agreement']:.2f} %" + (f", emulation {e['top1']:.2f} %" if "top1" in e else "")
              + f", max |diff| {e['max_abs_diff']:.4g}" + (f"; in float: {e['ops_in_float']}" if e["ops_in_float"] else ""))
        print(f"integer kernels in ONNX Runtime's optimised graph: {p['integer_node_total']} {p['integer_nodes']} "
              f"-> {Path(r['path']).parent / 'parity.json'}")
        c = p["cpu"]
        print(f"ran on: {c['model']} ({c['kind']}; u8s8 kernels {'saturate' if c['u8s8_saturates'] else 'exact'}), "
              f"ONNX Runtime {p['ort_version']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(iters=args.iters, retrain=args.retrain)
    return 0


COMMANDS = dict(quantize=cmd_quantize, eval=cmd_eval, inspect=cmd_inspect, export=cmd_export, demo=cmd_demo)

if __name__ == "__main__":
    sys.exit(main())
