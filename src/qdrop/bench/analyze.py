"""`qdrop analyze`: where the quantization error comes from, and how flat the loss is.

For quantized checkpoints of one model (run folders written by `qdrop quantize --out` or by
`qdrop bench`), on labelled calibration samples:

* per block unit: the reconstruction loss of its first and last 100-iteration window (from
  recon.json), and the error it adds *alone*: only that unit's quantizers on (its layers'
  weights and the activations it owns), every other unit in FP; mean squared error of the final
  outputs against the FP model;
* loss flatness (the QDrop paper's argument): the increase of the task loss when every weight is
  moved by uniform noise of ±m·s/2, s = the layer's (per-channel) weight step at the checkpoint's
  bit-width, for several m and draws; for the FP model (steps of the same bit-width) and for each
  quantized model (noise added to its quantized weights, activations quantized). The same noise
  draws (in units of s) are used for every model.

The FP model is the checkpoint's prepared model with every quantizer off (it computes the
original function, BN folded), so no pretrained download is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import parse_assignments
from .runner import RESULTS, latest_records, read_results
from ..errors import QdropError, UsageError
from ..io import atomic_write_json, atomic_write_text, save_figure


def _load_checkpoint(run_dir: Path):
    from ..pipeline import load_checkpoint

    # the checkpoint's state_dict holds every weight: build the model with random init (no download)
    qmodel, _, info = load_checkpoint(run_dir, pretrained=False)
    return qmodel.eval(), info


def _bench_record(run_dir: Path) -> dict | None:
    """The qdrop bench record of a run folder RESULTS_DIR/runs/<run_id>, if there is one."""
    results = run_dir.parent.parent / RESULTS
    if run_dir.parent.name != "runs" or not results.exists():
        return None
    return latest_records(read_results(results.parent)).get(run_dir.name)


def find_runs(paths, only: dict | None = None) -> list[Path]:
    """Run folders holding a model.pt: the paths themselves, or the finished runs of a bench results folder."""
    from .config import _matches

    runs = []
    for p in map(Path, paths):
        if (p / "model.pt").exists():
            runs.append(p)
        elif (p / RESULTS).exists():
            for rid, rec in latest_records(read_results(p)).items():
                if rec.get("status") == "ok" and (p / "runs" / rid / "model.pt").exists():
                    if not only or _matches(rec["config"], only):
                        runs.append(p / "runs" / rid)
        else:
            raise UsageError(f"{p} is neither a run folder with model.pt nor a qdrop bench results folder")
    if not runs:
        raise UsageError(f"no quantized checkpoints found in {', '.join(map(str, paths))}")
    return runs


def _states(qmodel, weights_on, acts_on):
    """Quantizers on by predicate (name, quantizer) -> bool, per role; restored afterwards."""
    from ..quant.state import switched

    return switched(qmodel, lambda name, q: (weights_on if q.role == "weight" else acts_on)(name, q))


@torch.no_grad()
def _outputs(model, x, device, batch_size):
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def _task_loss(logits, y, fp_logits, kind: str) -> float:
    if kind == "kl":
        return float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(fp_logits, 1), log_target=True, reduction="batchmean"))
    return float(F.cross_entropy(logits, y))


def _layers(qmodel):
    from ..quant.layers import QuantLayer

    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]


def unit_errors(qmodel, x, fp_out, device, batch_size) -> list[dict]:
    """Per block unit: MSE of the final outputs vs FP with only that unit quantized."""
    from ..graph import block_units

    blocks = block_units(qmodel)
    owned = set()
    rows = []
    for b in blocks:
        w_names = {f"{layer}.weight_quant" for layer in b.layers}
        a_names = set(b.act_quants)
        owned |= w_names | a_names
        with _states(qmodel, lambda n, q: n in w_names, lambda n, q: n in a_names):
            out = _outputs(qmodel, x, device, batch_size)
        rows.append(dict(unit=b.name, layers=list(b.layers), alone_mse=float((out - fp_out).pow(2).mean())))
    from ..quant.state import quantizers

    rest = {n for n, q in quantizers(qmodel) if q.calibrated} - owned
    if rest:  # e.g. a quantized network input (tensorrt/onnxruntime presets): no unit owns it
        with _states(qmodel, lambda n, q: n in rest, lambda n, q: n in rest):
            out = _outputs(qmodel, x, device, batch_size)
        rows.append(dict(unit="(quantizers outside units)", layers=sorted(rest), alone_mse=float((out - fp_out).pow(2).mean())))
    return rows


def _noise(qmodel, draws: int, seed: int) -> list[dict]:
    """Per draw, per layer: uniform noise in [-1/2, 1/2] (shared by every model of the same architecture)."""
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 7919 + d)
        out.append({n: torch.rand(m.layer.weight.shape, generator=g) - 0.5 for n, m in _layers(qmodel)})
    return out


@torch.no_grad()
def flatness(qmodel, x, y, fp_out, quantized: bool, scales, noise, device, batch_size, loss: str) -> dict:
    """Task-loss increase under weight noise of ±m·s/2 for each m in `scales` (s: weight step)."""
    from ..quant.quantizer import _bshape

    layers = _layers(qmodel)
    originals = {n: m.layer.weight.detach().clone() for n, m in layers}
    base, steps = {}, {}
    for n, m in layers:
        wq = m.weight_quant
        if quantized:
            with _states(qmodel, lambda name, q: True, lambda name, q: False):
                base[n] = wq(m.layer.weight).detach().clone()
        else:
            base[n] = originals[n]
        steps[n] = _bshape(originals[n], wq.scheme.ch_axis, wq.scale.detach()).cpu()
    acts = (lambda n, q: True) if quantized else (lambda n, q: False)
    result = {}
    try:
        with _states(qmodel, lambda n, q: False, acts):
            for n, m in layers:
                m.layer.weight.copy_(base[n])
            loss0 = _task_loss(_outputs(qmodel, x, device, batch_size), y, fp_out, loss)
            for scale in scales:
                deltas = []
                for draw in noise:
                    for n, m in layers:
                        m.layer.weight.copy_(base[n] + (scale * steps[n] * draw[n]).to(base[n].device))
                    deltas.append(_task_loss(_outputs(qmodel, x, device, batch_size), y, fp_out, loss) - loss0)
                result[str(scale)] = dict(mean=statistics.fmean(deltas), std=statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                                          values=deltas)
    finally:
        for n, m in layers:
            m.layer.weight.copy_(originals[n])
    return dict(loss0=loss0, increase=result)


def _recon_losses(run_dir: Path) -> dict:
    path = run_dir / "recon.json"
    if not path.exists():
        return {}
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    out = {}
    for u in rep.get("unit_reports", []):  # brecq: the second stage's entries follow the first's
        curve = u.get("curve") or []
        entry = out.setdefault(u["unit"], dict(recon_first=[], recon_final=[]))
        entry["recon_first"].append(curve[0][1] if curve else None)
        entry["recon_final"].append(u.get("final_loss"))
    return out


def analyze(paths, data=None, out=None, only=None, samples: int = 256, batch_size: int = 64, draws: int = 4,
            scales=(0.5, 1.0, 2.0), loss: str = "ce", device: str | None = None, seed: int = 0, plots: bool = True) -> dict:
    """Analyze quantized checkpoints (run folders, or a bench results folder filtered by `only`).

    Writes OUT/analysis.json, OUT/analysis.md and (plots=True) OUT/units_<model>.png and
    OUT/flatness_<model>.png; returns the analysis dict {model: {...}}.
    """
    from ..data import load_split

    if loss not in ("ce", "kl"):
        raise UsageError(f"loss must be 'ce' (cross-entropy with labels) or 'kl' (to the FP outputs), got {loss!r}")
    if isinstance(only, (str, list)):
        only = parse_assignments([only] if isinstance(only, str) else only, "--only")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    runs = find_runs(paths, only)
    out_dir = Path(out) if out else (Path(paths[0]) / "analysis")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    loaded = []
    for run_dir in runs:
        cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        rec = _bench_record(run_dir)
        qmodel, info = _load_checkpoint(run_dir)
        loaded.append(dict(run_dir=run_dir, cfg=cfg, rec=rec, qmodel=qmodel.to(device), info=info,
                           data=data or ((rec or {}).get("config") or {}).get("data")))
    by_model: dict[str, list] = {}
    for item in loaded:
        by_model.setdefault(item["info"].name, []).append(item)

    analysis = {}
    for model_name, items in by_model.items():
        info = items[0]["info"]
        split = load_split(info.dataset, "calib", data=items[0]["data"], preprocess=info.preprocess, limit=samples, seed=seed)
        x, y = split.x, split.y
        ref = items[0]["qmodel"]
        with _states(ref, lambda n, q: False, lambda n, q: False):
            fp_out = _outputs(ref, x, device, batch_size)
        noise = _noise(ref, draws, seed)
        labels = []
        for it in items:
            algo = it["cfg"].get("algo") or (it["rec"] or {}).get("config", {}).get("algo", "?")
            bits = it["qmodel"].qdrop_config.bits
            label = f"{algo} {bits}"
            if label in labels:
                label += f" ({it['run_dir'].name})"
            labels.append(label)
        variants, unit_table = [], {}
        for bits in dict.fromkeys(it["qmodel"].qdrop_config.bits for it in items):
            it0 = next(it for it in items if it["qmodel"].qdrop_config.bits == bits)
            f = flatness(it0["qmodel"], x, y, fp_out, False, scales, noise, device, batch_size, loss)
            variants.append(dict(label=f"FP32 (steps of {bits})", run_dir=None, quantized=False, bits=bits, **f))
        for it, label in zip(items, labels):
            q = it["qmodel"]
            with _states(q, lambda n, qq: True, lambda n, qq: True):
                q_out = _outputs(q, x, device, batch_size)
            f = flatness(q, x, y, fp_out, True, scales, noise, device, batch_size, loss)
            variants.append(dict(label=label, run_dir=str(it["run_dir"]), quantized=True, bits=q.qdrop_config.bits,
                                 output_mse=float((q_out - fp_out).pow(2).mean()),
                                 calib_top1=float((q_out.argmax(1) == y).float().mean() * 100), **f))
            recon = _recon_losses(it["run_dir"])
            for row in unit_errors(q, x, fp_out, device, batch_size):
                entry = unit_table.setdefault(row["unit"], dict(unit=row["unit"], layers=row["layers"], by=dict()))
                entry["by"][label] = dict(alone_mse=row["alone_mse"], **recon.get(row["unit"], {}))
        analysis[model_name] = dict(model=model_name, samples=len(y), data=split.description, loss=loss, scales=list(scales),
                                    draws=draws, fp_calib_top1=float((fp_out.argmax(1) == y).float().mean() * 100),
                                    variants=variants, units=list(unit_table.values()))
        from .report import have_matplotlib

        if plots and have_matplotlib():  # optional dependency: the tables are written regardless
            _plot(analysis[model_name], out_dir)
    atomic_write_json(out_dir / "analysis.json", analysis, indent=1)
    atomic_write_text(out_dir / "analysis.md", analysis_markdown(analysis))
    return analysis


def _g(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def analysis_markdown(analysis: dict) -> str:
    md = ["# qdrop analyze", ""]
    for name, a in analysis.items():
        md += [f"## {name}", "", f"{a['samples']} labelled calibration samples ({a['data']}); task loss: "
               f"{'cross-entropy' if a['loss'] == 'ce' else 'KL to the FP outputs'}; FP top-1 on them {a['fp_calib_top1']:.2f}.", ""]
        md += ["### Flatness: task-loss increase under weight noise ±m·s/2", "",
               "| model | loss | " + " | ".join(f"m={s}" for s in a["scales"]) + " | output MSE vs FP |",
               "|---|---|" + "---|" * len(a["scales"]) + "---|"]
        for v in a["variants"]:
            cells = [f"{v['increase'][str(s)]['mean']:.4g} ± {v['increase'][str(s)]['std']:.2g}" for s in a["scales"]]
            md.append(f"| {v['label']} | {v['loss0']:.4g} | " + " | ".join(cells) + f" | {_g(v.get('output_mse'))} |")
        labels = [v["label"] for v in a["variants"] if v["quantized"]]
        md += ["", "### Per unit: output MSE when only this unit is quantized; reconstruction loss first → final window", "",
               "| unit | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for u in a["units"]:
            cells = []
            for lab in labels:
                e = u["by"].get(lab, {})
                recon = ""
                if e.get("recon_final"):
                    recon = "; ".join(f"{_g(f)} → {_g(t)}" for f, t in zip(e["recon_first"], e["recon_final"]))
                    recon = f" (recon {recon})"
                cells.append(f"{_g(e.get('alone_mse'))}{recon}")
            md.append(f"| `{u['unit']}` | " + " | ".join(cells) + " |")
        md.append("")
        md.append(f"![flatness](flatness_{_slug(name)}.png) ![units](units_{_slug(name)}.png)")
        md.append("")
    return "\n".join(md)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def _plot(a: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in a["variants"]:
        ms = a["scales"]
        ax.errorbar(ms, [v["increase"][str(s)]["mean"] for s in ms], yerr=[v["increase"][str(s)]["std"] for s in ms],
                    marker="o", capsize=3, ls="--" if not v["quantized"] else "-", label=v["label"])
    ax.set_xlabel("noise magnitude m (uniform ±m·s/2, s = weight step)")
    ax.set_ylabel(f"task-loss increase ({a['loss']})")
    ax.set_title(f"{a['model']}: loss flatness", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / f"flatness_{_slug(a['model'])}.png", dpi=110)
    plt.close(fig)

    labels = [v["label"] for v in a["variants"] if v["quantized"]]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * len(a["units"])), 4))
    for lab in labels:
        vals = [u["by"].get(lab, {}).get("alone_mse", math.nan) for u in a["units"]]
        ax.plot(range(len(vals)), [max(v, 1e-12) for v in vals], "o-", ms=3, label=lab)
    ax.set_yscale("log")
    ax.set_xticks(range(len(a["units"])), [u["unit"] for u in a["units"]], rotation=70, fontsize=7)
    ax.set_ylabel("output MSE vs FP, this unit quantized alone")
    ax.set_title(f"{a['model']}: error added per unit", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / f"units_{_slug(a['model'])}.png", dpi=110)
    plt.close(fig)


def _parse_scales(text: str) -> tuple:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--scales takes comma-separated numbers (e.g. 0.5,1,2), got {text!r}") from None
    if not scales:
        raise UsageError("--scales needs at least one noise magnitude (e.g. 0.5,1,2)")
    return scales


def analyze_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qdrop analyze", description="Per-unit error and loss flatness of quantized checkpoints")
    p.add_argument("paths", nargs="+", help="run folders (with model.pt) or a qdrop bench results folder")
    p.add_argument("--data", default=None, help="dataset folder (default: the bench record's, else the data root)")
    p.add_argument("--only", action="append", default=[], help="with a results folder: KEY=V[|V][,KEY=V] filter")
    p.add_argument("--samples", type=int, default=256, help="labelled calibration samples to evaluate on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--draws", type=int, default=4, help="noise draws per magnitude")
    p.add_argument("--scales", default="0.5,1,2", help="noise magnitudes m, in weight steps (comma-separated)")
    p.add_argument("--loss", choices=("ce", "kl"), default="ce")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: FIRST_PATH/analysis)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        scales = _parse_scales(args.scales)
        result = analyze(args.paths, data=args.data, out=args.out, only=args.only or None, samples=args.samples,
                         batch_size=args.batch_size, draws=args.draws, scales=scales, loss=args.loss, device=args.device,
                         seed=args.seed, plots=not args.no_plots)
    except QdropError as err:
        print(f"qdrop: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path(args.paths[0]) / "analysis"
    for name, a in result.items():
        print(f"{name}: " + "; ".join(f"{v['label']}: loss {v['loss0']:.4g}, +{v['increase'][str(scales[-1])]['mean']:.4g} at m={scales[-1]}"
                                      for v in a["variants"]))
    print(f"wrote {out_dir / 'analysis.md'}")
    return 0
