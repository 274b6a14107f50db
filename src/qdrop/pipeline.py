"""The quantize job behind `qdrop quantize` and `qdrop bench`: load, prepare, calibrate,
reconstruct, evaluate, save. Every file is written to a temp name and renamed."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed as qdist
from .api import calibrate
from .quant.calibration import batched
from .eval.metrics import count_correct, top1
from .graph.prepare import PRESETS, TARGET_CPUS, PrepareConfig, prepare, quantizers, resolve_target_cpu
from .quant.scheme import is_average_bits, parse_mixed_bits
from .recon.mixed import CANDIDATE_BITS, SENSITIVITIES, parse_budget, search
from .recon import reconstruct
from .recon.configs import RESEARCH_ALGOS, get_algorithm
from .errors import CheckpointError, ModelError, UsageError
from .io import atomic_torch_save, atomic_write_json, environment, load_torch_file, remove_stale_temps

ACT_CALIB = 256  # samples the activation observers see (the QDrop protocol)


def save_checkpoint(qmodel, model_name: str, path: Path, example_shape) -> None:
    cfg = qmodel.qdrop_config
    atomic_torch_save(dict(format="qdrop-v1", model=model_name, prepare=asdict(cfg), example_shape=list(example_shape),
                           calibrated=[n for n, q in quantizers(qmodel) if q.calibrated],
                           state_dict=qmodel.state_dict()), path)


def load_checkpoint(path: str | Path, data=None, pretrained: bool = True):
    """Rebuild a quantized model saved by save_checkpoint: returns (qmodel, fp_model, info).

    The state dict holds every weight of qmodel; pretrained=False skips loading the published
    weights (no download), but then fp_model is a random init - use it only when you need qmodel."""
    from .models import load_model

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise CheckpointError(f"no quantized checkpoint at {path}")
    ckpt = load_torch_file(path, "qdrop checkpoint", "quantize the model again with `qdrop quantize`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "qdrop-v1":
        raise CheckpointError(f"{path} is not a qdrop checkpoint")
    model, info = load_model(ckpt["model"], data=data, pretrained=pretrained)
    prep = dict(ckpt["prepare"])
    if "target_cpu" not in prep and PRESETS.get(prep.get("backend"), PRESETS["academic"]).target_cpus:
        prep["target_cpu"] = "vnni"  # saved before target CPUs existed: its weights are full int8
    cfg = PrepareConfig(**prep)
    qmodel = prepare(model, (torch.zeros(ckpt["example_shape"]),), backend=cfg.backend, bits=cfg.bits,
                     leaf_modules=cfg.leaf_modules, w_observer=cfg.w_observer, a_observer=cfg.a_observer,
                     int32_bias=cfg.int32_bias, target_cpu=cfg.target_cpu, layer_bits=cfg.layer_bits)
    calibrated = set(ckpt["calibrated"])
    for name, q in quantizers(qmodel):
        q.set_calibrated(name in calibrated)
    qmodel.load_state_dict(ckpt["state_dict"])
    return qmodel, model, info


@dataclass(frozen=True)
class QuantizeJob:
    """One quantization of a vision model: what `qdrop quantize`, `qdrop bench` and the Python API
    build and run_quantize consumes. Calibration samples come from the training split (`calib` of
    them, drawn with `seed`), evaluation from the test split (`eval_limit`: a fixed subset)."""

    model: str
    bits: str
    algo: str = "naive"
    backend: str = "academic"
    data: str | None = None
    calib: int = 1024
    seed: int = 0
    iters: int = 20000  # reconstruction iterations per unit
    batch_size: int = 32
    lam: float | None = None  # rounding-loss weight; None: from the architecture
    device: str | None = None  # None: cuda when present
    leaf_modules: tuple = ()
    eval_limit: int | None = None
    compile: bool = False
    cuda_graph: bool = False  # CUDA only: replay reconstruction iterations as CUDA graphs
    max_cache_mb: int | None = None
    w_observer: str | None = None
    a_observer: str | None = None
    int32_bias: bool | None = None  # None: the preset's choice
    target_cpu: str | None = None  # None: the preset's default
    pretrained: bool = True
    weights: str | None = None  # a state-dict file instead of the published weights
    # mixed precision: a fractional weight bit-width in `bits` (w2.5a4) is an average-bits budget;
    # or a budget "size=MB" / "bops=G" (then `bits` gives the activation bits); see qdrop.recon.mixed
    budget: str | None = None
    sensitivity: str | None = None  # output (default) | hessian
    # engine option (Stage.lr_iters, any reconstruction algorithm): below this many iterations per unit the
    # learning rates are scaled by lr_iters / iters, so that short budgets can finish the rounding
    lr_iters: int | None = None

    @property
    def mixed(self) -> bool:
        """Whether the weight bits are chosen per layer: a budget, or weight bits written with a
        decimal point (w2.5a4; w3.0a4 is a 3-bit average, w3a4 uniform 3-bit weights)."""
        return self.budget is not None or is_average_bits(self.bits)

    def check(self) -> None:
        """Refuse a job that cannot run, before anything is loaded or written."""
        from .data import DataError

        if self.algo not in RESEARCH_ALGOS:
            raise UsageError(f"unknown algorithm {self.algo!r}; choose from {RESEARCH_ALGOS}")
        if qdist.launched() and self.algo != "naive" and any(s.needs_network for s in get_algorithm(self.algo).stages):
            raise UsageError(f"--algo {self.algo} has a network-scope stage, a prediction objective or a distribution "
                             "correction, which run in one process: run it without torchrun")
        w, _ = parse_mixed_bits(self.bits)
        if self.budget is not None:
            if is_average_bits(self.bits):
                raise UsageError(f"give either fractional weight bits ({self.bits}) or --budget {self.budget}, not both")
            if parse_budget(self.budget)[0] == "bits":
                raise UsageError(f"an average-bits budget is written in --bits (e.g. w2.5a4), not --budget {self.budget}")
        if self.lr_iters is not None and (self.algo == "naive" or not isinstance(self.lr_iters, int) or self.lr_iters < 1):
            raise UsageError(f"lr_iters must be a positive integer and needs a reconstruction algorithm, got "
                             f"{self.lr_iters!r} with algo {self.algo!r}")
        if self.sensitivity is not None and self.sensitivity not in SENSITIVITIES:
            raise UsageError(f"unknown sensitivity {self.sensitivity!r}; choose from {SENSITIVITIES}")
        if self.backend not in PRESETS:
            raise UsageError(f"unknown backend preset {self.backend!r}; choose from {sorted(PRESETS)}")
        resolve_target_cpu(self.backend, self.target_cpu)
        if self.cuda_graph and (self.algo == "naive" or not str(self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")):
            raise UsageError("--cuda-graph needs a reconstruction algorithm on a CUDA device (no GPU here, or --device cpu); drop it")
        if self.data is not None and not Path(self.data).expanduser().exists():
            raise DataError(f"data path {str(self.data)!r} does not exist")


def run_quantize(job: QuantizeJob, out: str | Path | None = None, progress: bool = True,
                 fp_top1: float | None = None, eval_integer: bool = False) -> dict:
    """Quantize one model and evaluate FP and quantized top-1 on the test split.

    With `out`, writes model.pt, config.json, recon.json and (last) metrics.json there;
    reconstruction saves its progress to recon_state.pt and resumes from it. fp_top1: the FP
    model's top-1 when the caller already measured it (a sweep), else it is evaluated.
    eval_integer (onnxruntime preset, int32 bias): also score the model as ONNX Runtime's integer kernels
    compute it (qdrop.export.IntegerModel, no runtime needed): metrics["quant_integer"], beside the
    simulation's "quant", and "quant_integer_in_float", the ops that emulation ran in float as the runtime
    would. It is what an x86 CPU delivers where the target's kernels are exact (avx2: every one; vnni:
    VNNI/AMX CPUs only); on a CPU it costs about one more evaluation.

    Launched by torchrun (N processes), it runs data-parallel (qdrop.distributed): every rank
    loads the data and calibrates the activation ranges on the same ACT_CALIB samples (the MSE
    and percentile observers need the values, not only their min/max); reconstruction splits
    the calibration samples, their caches and each batch across the ranks; evaluation splits
    the test samples. Rank 0 alone writes files and shows progress; every rank returns the metrics.
    """
    from .data import load_split
    from .models import load_model

    job.check()
    if eval_integer and job.backend != "onnxruntime":
        raise UsageError(f"--eval-integer scores ONNX Runtime's integer kernels: quantize with --backend onnxruntime, "
                         f"not {job.backend}")
    if eval_integer and job.int32_bias is False:  # ONNX Runtime rounds a float bias itself; the emulation does not
        raise UsageError("--eval-integer emulates the int32 bias the onnxruntime preset simulates: drop --no-int32-bias")
    target_cpu = resolve_target_cpu(job.backend, job.target_cpu)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if qdist.launched():  # torchrun: one process of N (a plain run skips this)
        device = str(qdist.init_from_env(device))
    main = qdist.is_main()
    progress = progress and main
    torch.manual_seed(job.seed)
    seconds = {}
    t = time.perf_counter()
    fp_model, info = load_model(job.model, data=job.data, pretrained=job.pretrained, weights=job.weights)
    if info.dataset == "custom":
        raise ModelError(f"model {job.model!r} has no known dataset: give it one in its factory's info dict")
    calib_split = load_split(info.dataset, "calib", data=job.data, preprocess=info.preprocess, limit=job.calib,
                             seed=job.seed)
    test_split = load_split(info.dataset, "test", data=job.data, preprocess=info.preprocess, limit=job.eval_limit)
    seconds["load"] = time.perf_counter() - t
    if job.algo != "naive":  # a world the samples or the batch cannot be split over: refused before anything is written
        qdist.check_shards(len(calib_split), job.batch_size)

    # mixed precision: choose every layer's weight bits first (a budget it cannot meet is refused
    # before anything is written), then quantize as usual
    bits, layer_bits, allocation = job.bits, None, None
    if job.mixed:
        t = time.perf_counter()
        w, a = parse_mixed_bits(job.bits)
        kind, budget = parse_budget(job.budget) if job.budget else ("bits", w)
        probe = prepare(fp_model, (calib_split.x[:2],), backend=job.backend, bits=f"w8a{a}", leaf_modules=job.leaf_modules,
                        w_observer=job.w_observer, a_observer=job.a_observer, target_cpu=target_cpu)
        full = TARGET_CPUS[target_cpu]["weight_bits"] if target_cpu else 8  # what an 8-bit layer gets on this target
        candidates = tuple(sorted({min(b, full) for b in CANDIDATE_BITS}))
        allocation = search(probe, calib_split.x[:ACT_CALIB], kind, budget, job.sensitivity or "output",
                            bits=candidates, device=device)
        del probe
        layer_bits, bits = allocation["bits"], f"w8a{a}"  # the nominal bits of the layers the preset pins
        seconds["search"] = time.perf_counter() - t

    out_dir = Path(out) if out else None
    if out_dir and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # a run killed mid-write left them; the rerun replaces what they were
    config = dict(asdict(job), data=str(job.data) if job.data is not None else None, leaf_modules=list(job.leaf_modules),
                  calib_size=len(calib_split), iters=job.iters if job.algo != "naive" else 0, device=device,
                  target_cpu=target_cpu, calib_data=calib_split.description, eval_data=test_split.description,
                  act_calib=ACT_CALIB)
    if qdist.world_size() > 1:
        config["world"] = qdist.world_size()
    if allocation:
        config["allocation"] = {k: v for k, v in allocation.items() if k != "table"}
    if out_dir and main:
        atomic_write_json(out_dir / "config.json", config)
        if allocation:
            atomic_write_json(out_dir / "sensitivity.json", allocation["table"])

    t = time.perf_counter()
    qmodel = prepare(fp_model, (calib_split.x[:2],), backend=job.backend, bits=bits, leaf_modules=job.leaf_modules,
                     w_observer=job.w_observer, a_observer=job.a_observer, int32_bias=job.int32_bias, target_cpu=target_cpu,
                     layer_bits=layer_bits)
    qmodel.to(device)
    calibrate(qmodel, batched(calib_split.x[:ACT_CALIB], 64), device=device)
    seconds["calibrate"] = time.perf_counter() - t

    recon_report = None
    if job.algo != "naive":
        t = time.perf_counter()
        algo = get_algorithm(job.algo, lr_iters=job.lr_iters) if job.lr_iters else job.algo
        recon_report = reconstruct(qmodel, None, calib_split.x, algo=algo, iters=job.iters, batch_size=job.batch_size,
                                   lam=job.lam, seed=job.seed, device=device, progress=progress, compile=job.compile,
                                   cuda_graph=job.cuda_graph,
                                   max_cache_bytes=job.max_cache_mb * 2**20 if job.max_cache_mb else None,
                                   state_path=str(out_dir / "recon_state.pt") if out_dir else None)
        seconds["reconstruct"] = time.perf_counter() - t
        if out_dir and main:
            atomic_write_json(out_dir / "recon.json", recon_report, indent=1)

    t = time.perf_counter()
    fp = fp_top1 if fp_top1 is not None else _top1(fp_model, test_split.x, test_split.y, device, progress, "eval fp")
    quant = _top1(qmodel, test_split.x, test_split.y, device, progress, "eval quant")
    seconds["evaluate"] = time.perf_counter() - t
    integer = {}
    if eval_integer:
        from .export import IntegerModel

        t = time.perf_counter()
        emulated = IntegerModel(qmodel)
        integer = dict(quant_integer=round(_top1(emulated, test_split.x, test_split.y, device, progress,
                                                  "eval quant (integer)"), 2),
                       quant_integer_in_float=emulated.report.get("float", {}))
        seconds["evaluate_integer"] = time.perf_counter() - t

    metrics = dict(model=job.model, bits=job.bits, algo=job.algo, backend=job.backend, target_cpu=target_cpu,
                   calib_size=len(calib_split), seed=job.seed, iters=config["iters"], metric=info.metric, fp=round(fp, 2), quant=round(quant, 2),
                   eval_size=len(test_split), seconds={k: round(v, 2) for k, v in seconds.items()},
                   ms_per_iter=round(1000 * recon_report["seconds"] / max(1, sum(r["iters"] for r in recon_report["unit_reports"])), 2)
                   if recon_report else None,
                   lam=recon_report["lam"] if recon_report else None, weight_bytes=_weight_bytes(qmodel),
                   allocation=config.get("allocation"),
                   process_peak=qdist.peak_memory_mb(device),  # MiB, the process's since it started
                   environment=environment())
    metrics.update(integer)
    if recon_report and "ranks" in recon_report:  # data-parallel: each rank's share, cache and peak memory
        metrics.update(world=len(recon_report["ranks"]), ranks=recon_report["ranks"])
    if out_dir and main:
        save_checkpoint(qmodel, job.model, out_dir / "model.pt", calib_split.x[:1].shape)
        atomic_write_json(out_dir / "metrics.json", metrics)
        state = out_dir / "recon_state.pt"
        if state.exists():
            state.unlink()  # the finished model is in model.pt
    qdist.barrier()  # the other ranks return once rank 0 has written everything
    return metrics


def _top1(model, x, y, device, progress: bool, desc: str) -> float:
    """Top-1 in percent; in a process group each rank evaluates its share of the samples."""
    if not qdist.active():
        return top1(model, x, y, device=device, progress=progress, desc=desc)
    n = count_correct(model, qdist.shard(x), qdist.shard(y), device=device, progress=progress, desc=desc)
    return 100.0 * int(qdist.all_reduce(torch.tensor([n], dtype=torch.float64)).item()) / len(y)


def _weight_bytes(qmodel) -> int:
    """Bytes of the integer weights at their bit-widths (the x axis of accuracy-vs-size plots)."""
    from .quant.layers import QuantLayer

    return int(sum(m.layer.weight.numel() * m.weight_quant.bits for m in qmodel.modules() if isinstance(m, QuantLayer)) // 8)


EXPORT_FORMATS = ("onnx", "tensorrt", "qnn")


def run_export(checkpoint, out: str | Path, fmt: str = "onnx", check_data=None, data=None, int4: bool = False,
               eval_limit: int | None = None, progress: bool = True, target_cpu: str | None = None,
               emulate_cpu: str | None = None) -> dict:
    """Export a `qdrop quantize` checkpoint. Formats:
      onnx      QDQ ONNX (int8/uint8 containers; int4/uint4 at opset 21 with int4=True)
      tensorrt  QDQ ONNX (symmetric int8) + OUT.ranges.json (tensor -> clip range)
      qnn       FP32 ONNX + OUT.encodings.json (AIMET layout)
    With check_data (a dataset folder or True for the model's default data), runs ONNX Runtime
    next to the simulation on the test split and writes parity.json beside the model; emulate_cpu
    ("avx2") runs ONNX Runtime there as that CPU would (QEMU), from any x86 machine.

    Every export checks the integer weights against the int16 pair-sum limit of x86 CPUs without
    VNNI (qdrop.export.x86): result["u8s8_check"] lists the layers, result["warning"] says when
    the model can saturate there. target_cpu="avx2" makes that a refusal instead: the export is
    for CPUs where such a model would be silently wrong."""
    from .data import load_split
    from .export import export_onnx, parity
    from .export.encodings import aimet_encodings, tensorrt_ranges
    from .export.onnx_qdq import ExportError

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    if emulate_cpu and (check_data is None or check_data is False):
        raise UsageError("--emulate-cpu runs ONNX Runtime for the parity check: give --check too")
    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"output path {str(out)!r} must end in .onnx")
    if not out.parent.exists():
        raise ExportError(f"output directory {str(out.parent)!r} does not exist")
    from .export.x86 import saturation_warning, worst_pair_sums

    remove_stale_temps(out.parent)
    qmodel, fp_model, info = load_checkpoint(checkpoint, data=data)
    qmodel.eval()
    cfg = qmodel.qdrop_config
    if target_cpu is not None:
        if not PRESETS[cfg.backend].target_cpus:
            raise ExportError(f"--target-cpu applies to checkpoints of the onnxruntime preset; this one is {cfg.backend!r}")
        resolve_target_cpu(cfg.backend, target_cpu)  # validates the name
    u8s8 = worst_pair_sums(qmodel)
    warning = saturation_warning(u8s8, cfg.backend)
    if target_cpu == "avx2" and warning:
        worst = max(u8s8, key=lambda r: r["worst_pair_sum"])
        raise ExportError(f"checkpoint {checkpoint} was quantized for target CPU {cfg.target_cpu or 'vnni'} (full int8 "
                          f"weights, pair sum up to {worst['worst_pair_sum']} > 32767 in {worst['layer']}): it would "
                          "saturate on AVX2; re-quantize with `qdrop quantize ... --target-cpu avx2`")
    example = torch.zeros((1, *info.input_shape))
    if fmt == "tensorrt":
        bad = [n for n, q in quantizers(qmodel) if q.state == "quant" and not (q.bits == 8 and q.scheme.symmetric)]
        if bad:
            raise ExportError(f"TensorRT explicit quantization needs symmetric int8 everywhere; {bad[0]} is not "
                              "(quantize with --backend tensorrt --bits w8a8)")
    t = time.perf_counter()
    report = export_onnx(qmodel, out, example, int4=int4, fp32=(fmt == "qnn"))
    result = dict(path=str(out), format=fmt, opset=report.opset, low_bit_container=report.low_bit_container,
                  act_quantizers=report.act_quantizers, weight_quantizers=report.weight_quantizers,
                  int32_biases=report.int32_biases, export_seconds=round(time.perf_counter() - t, 2),
                  target_cpu=cfg.target_cpu, u8s8_check=u8s8)
    if warning and fmt == "onnx":  # tensorrt and qnn files run on GPUs / Hexagon, not on x86 kernels
        result["warning"] = warning
    side = None
    if fmt == "tensorrt":
        side = out.with_suffix(".ranges.json")
        atomic_write_json(side, tensorrt_ranges(qmodel, report))
    elif fmt == "qnn":
        side = out.with_suffix(".encodings.json")
        atomic_write_json(side, aimet_encodings(qmodel, report))
    if side:
        result["side_file"] = str(side)
    if check_data is not None and check_data is not False:
        if fmt == "qnn":
            raise UsageError("--check compares ONNX Runtime's integer execution with the simulation; "
                             "the qnn format is an FP32 graph (check the onnx format instead)")
        cdata = data if check_data is True else check_data
        test = load_split(info.dataset, "test", data=cdata, preprocess=info.preprocess, limit=eval_limit)
        p = parity(qmodel, out, test.x, test.y, progress=progress, emulate_cpu=emulate_cpu)
        p.update(checkpoint=str(checkpoint), onnx=str(out), eval_data=test.description, target_cpu=cfg.target_cpu,
                 u8s8_saturating_layers=sum(r["saturates_without_vnni"] for r in u8s8))
        atomic_write_json(out.parent / "parity.json", p)
        result["parity"] = p
    return result
