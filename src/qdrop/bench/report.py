"""`qdrop report RESULTS_DIR`: tables in the QDrop paper's layout and plots, from results.jsonl.

Table layout (as Table 2 of Wei et al. 2022): one column per model, a full-precision row on
top, then one block of rows per bit-width (W/A), one row per method; a cell is the mean ± sample
standard deviation over seeds (a single seed: the value alone), the best method of each block in
bold. Runs whose settings differ in anything but model, bits, algorithm and seed (e.g. iters,
calib, backend, eval_limit) go to separate tables. Runs of a sweep with `deploy: onnxruntime` also
get one table of simulated next to deployed accuracy, with the kernels ONNX Runtime ran.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

from .config import CORE_KEYS, ID_IF_SET, NOT_IN_ID
from .runner import RESULTS, SWEEP, latest_records, read_results, record_changes
from ..quant.scheme import is_average_bits
from ..quant.scheme import parse_mixed_bits as parse_bits  # w2.5a4: mixed precision
from ..errors import QdropError, UsageError
from ..io import atomic_write_text, save_figure
from ..nlp.pipeline import NLP_ALGOS
from ..recon.configs import RESEARCH_ALGOS

ALGO_ORDER = RESEARCH_ALGOS + tuple(a for a in NLP_ALGOS if a not in RESEARCH_ALGOS)
ALGO_NAMES = {"naive": "Naive (observers only)", "adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "**QDrop**",
              "os": "OS", "smoothquant": "SmoothQuant", "osplus": "OS+"}
# settings that do not apply to naive PTQ: a naive run belongs to every table they split
NAIVE_WILDCARDS = ("iters", "lam", "batch_size", "compile", "max_cache_mb")
IGNORED = set(CORE_KEYS) | set(NOT_IN_ID) | {"device"}


def _value(metrics: dict):
    for k in ("quant", "score", "accuracy", "top1"):
        if isinstance(metrics.get(k), (int, float)):
            return float(metrics[k])
    return None


def _fmt_bits(bits: str) -> str:
    w, a = parse_bits(bits)
    return f"{bits.lower()[1:].split('a')[0]}/{a}"  # as written: 2.5/4, 3.0/4 (a mixed average) vs 3/4 (uniform)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def _cell(values: list[float], n_max: int) -> str:
    if not values:
        return "–"
    m, s = _mean_std(values)
    text = f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"
    if len(values) != n_max:
        text += f" (n={len(values)})"
    return text


def _no_recon(c: dict) -> bool:
    """Observers alone, or a transformer's equivalent transform alone: no iterations, no batches."""
    return c.get("algo") in NLP_ALGOS


def _as_methods(records: list[dict]) -> list[dict]:
    """A reconstruction after an equivalent transform (a transformer run's `init`, e.g. os) is its own
    method, "os+qdrop", not another table: copies of the records with algo renamed and init dropped
    (init naive, observers only, is the plain algorithm)."""
    out = []
    for r in records:
        init = r["config"].get("init")
        if "init" in r["config"]:
            c = {k: v for k, v in r["config"].items() if k != "init"}
            if init not in (None, "naive"):
                c["algo"] = f"{init}+{c['algo']}"
            r = {**r, "config": c}
        out.append(r)
    return out


def _wildcards(c: dict) -> tuple:
    """NAIVE_WILDCARDS, less batch_size for a transformer run whose calib_batch is unset: there batch_size also
    sets the calibration batching (qdrop.nlp_pipeline), which the sampling observers and OS+ depend on."""
    if c.get("task") and c.get("calib_batch") is None:
        return tuple(k for k in NAIVE_WILDCARDS if k != "batch_size")
    return NAIVE_WILDCARDS


def _setting(rec: dict) -> dict:
    c = rec["config"]
    s = {k: v for k, v in c.items() if k not in IGNORED and not (_no_recon(c) and k in _wildcards(c))
         and not (k in ID_IF_SET and v is None)}
    used = rec.get("data_used") or {}
    if "data" in s and used.get("eval_data"):
        # the same files under another path (e.g. a copy on a GPU machine) are the same data:
        # compare what was read, not where it was
        s["data"] = used["eval_data"]
    return s


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def group_records(records: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Split records into tables: one per combination of the non-core settings.
    Runs without reconstruction (naive, a transformer's OS / SmoothQuant / OS+ alone) join every table
    whose settings they share (iters etc. do not apply to them)."""
    full = [r for r in records if not _no_recon(r["config"])]
    groups: "OrderedDict[str, tuple[dict, list]]" = OrderedDict()
    for r in full:
        s = _setting(r)
        groups.setdefault(_key(s), (s, []))[1].append(r)
    for r in records:
        if not _no_recon(r["config"]):
            continue
        s = _setting(r)
        homes = [k for k, (gs, _) in groups.items() if all(_key(gs.get(x)) == _key(v) for x, v in s.items())]
        if not homes:
            groups[_key(s)] = (s, [])
            homes = [_key(s)]
        for k in homes:
            groups[k][1].append(r)
    return list(groups.values())


def _order(values, preferred=()):
    seen = list(OrderedDict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def table_markdown(records: list[dict]) -> str:
    """The paper-layout table for records sharing every setting but model/bits/algo/seed."""
    models = _order(r["config"]["model"] for r in records)
    bits_list = _order(r["config"]["bits"] for r in records)
    algos = _order((r["config"]["algo"] for r in records), ALGO_ORDER)
    n_max = max(len({r["config"]["seed"] for r in records if r["config"]["model"] == m and r["config"]["bits"] == b
                     and r["config"]["algo"] == a}) for m in models for b in bits_list for a in algos
                if any(r["config"]["model"] == m and r["config"]["bits"] == b and r["config"]["algo"] == a for r in records))
    header = "| Method | Bits (W/A) | " + " | ".join(f"`{m}`" for m in models) + " |"
    lines = [header, "|---|---|" + "---|" * len(models)]
    fp_cells = []
    for m in models:
        fps = {}
        for r in records:
            if r["config"]["model"] == m and isinstance(r["metrics"].get("fp"), (int, float)):
                fps.setdefault(r["config"]["seed"], r["metrics"]["fp"])
        vals = list(fps.values())
        # the FP model does not depend on the seed (the test split is fixed): one value unless they differ
        fp_cells.append("–" if not vals else f"{vals[0]:.2f}" if max(vals) - min(vals) < 1e-9 else _cell(vals, len(vals)))
    lines.append("| Full Prec. | 32/32 | " + " | ".join(fp_cells) + " |")
    for b in bits_list:
        stats = {}
        for a in algos:
            for m in models:
                vals = [v for r in records if (r["config"]["model"], r["config"]["bits"], r["config"]["algo"]) == (m, b, a)
                        if (v := _value(r["metrics"])) is not None]
                stats[a, m] = vals
        higher_better = not any(r["metrics"].get("higher_is_better") is False or "ppl" in str(r["metrics"].get("metric"))
                                or "perplexity" in str(r["metrics"].get("metric")) for r in records)
        best = {}
        for m in models:
            means = {a: statistics.fmean(stats[a, m]) for a in algos if stats[a, m]}
            if len(means) > 1:
                best[m] = (max if higher_better else min)(means, key=means.get)
        for a in algos:
            if not any(stats[a, m] for m in models):
                continue
            cells = []
            for m in models:
                c = _cell(stats[a, m], n_max)
                cells.append(f"**{c}**" if best.get(m) == a and stats[a, m] else c)
            lines.append(f"| {ALGO_NAMES.get(a, a)} | {_fmt_bits(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_markdown(records: list[dict], title: str = "") -> str:
    """Wall time per stage and peak memory per (model, bits, algo), averaged over seeds.
    The stage columns are the runs' own (`seconds` of their metrics: load, calibrate, ...)."""
    keys = _order((r["config"]["model"], r["config"]["bits"], r["config"]["algo"]) for r in records)
    stages = [k for k in _order(k for r in records for k in (r.get("seconds") or {})) if k != "total"]
    lines = [] if not title else [f"{title}:", ""]
    lines += ["| model | bits | method | runs | wall s | " + "".join(f"{k} s | " for k in stages)
              + "ms/iter | peak RSS MiB | peak CUDA MiB | device |",
              "|---|---|---|---|---|" + "---|" * len(stages) + "---|---|---|---|"]

    def avg(vals, fmt="{:.0f}"):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return fmt.format(statistics.fmean(vals)) if vals else ""

    for m, b, a in keys:
        rs = [r for r in records if (r["config"]["model"], r["config"]["bits"], r["config"]["algo"]) == (m, b, a)]
        secs = [r.get("seconds") or {} for r in rs]
        mem = [r.get("peak_memory") or {} for r in rs]
        devices = sorted({str((r.get("device") or {}).get("cuda_device") or (r.get("device") or {}).get("used") or "?") for r in rs})
        lines.append(f"| `{m}` | {b.upper()} | {a} | {len(rs)} | {avg([r.get('wall_seconds') for r in rs])} | "
                     + "".join(f"{avg([x.get(k) for x in secs], '{:.1f}')} | " for k in stages)
                     + f"{avg([(r.get('metrics') or {}).get('ms_per_iter') for r in rs], '{:.1f}')} | "
                     f"{avg([x.get('rss_bytes') / 2**20 if x.get('rss_bytes') else None for x in mem])} | "
                     f"{avg([x.get('cuda_bytes') / 2**20 if x.get('cuda_bytes') else None for x in mem])} | {', '.join(devices)} |")
    return "\n".join(lines)


def _kernels_cell(dep: dict) -> str:
    kind = dep.get("kernels")
    if kind == "mixed":
        return f"mixed ({dep.get('float_compute_nodes')} float layers)"
    if kind == "float":
        return "float (dequantized)"
    return str(kind)


def _cpu_cell(dep: dict) -> str:
    cpu = dep.get("cpu") or {}
    if "vnni" not in cpu:
        return "?"
    text = "vnni" if cpu["vnni"] else "avx2-only" if "avx2" in cpu.get("flags", ()) else "no avx2"
    # weights whose int16 pair sums overflow, run on a CPU whose u8s8 kernels saturate: wrong outputs
    if dep.get("u8s8_saturating_layers") and cpu.get("u8s8_saturates"):
        text += " ⚠ saturates"
    return text


def deploy_markdown(records: list[dict]) -> str:
    """Simulated vs deployed top-1, one row per run with a `deploy` record (failed deployments last)."""
    bits_order = _order(r["config"]["bits"] for r in records)
    models = _order(r["config"]["model"] for r in records)
    algos = _order((r["config"]["algo"] for r in records), ALGO_ORDER)
    rows = sorted(records, key=lambda r: (models.index(r["config"]["model"]), bits_order.index(r["config"]["bits"]),
                                          algos.index(r["config"]["algo"]), r["config"]["backend"],
                                          str(r["config"].get("target_cpu")), r["config"]["seed"]))
    seeds = len({r["config"]["seed"] for r in rows}) > 1
    lines = ["| model | bits | method | " + ("seed | " if seeds else "") + "backend / target | simulated top-1 | "
             "deployed top-1 (ORT) | agreement % | kernels | ORT ms (b1 / b32) | CPU |",
             "|---|---|---|" + ("---|" if seeds else "") + "---|---|---|---|---|---|---|"]
    errors = []
    for r in rows:
        c, dep, m = r["config"], r["deploy"], r["metrics"]
        # the target the run resolved (the preset's default where the config left it null)
        target_cpu = dep.get("target_cpu") or c.get("target_cpu")
        target = c["backend"] + (f" / {target_cpu}" if target_cpu else "")
        head = f"| `{c['model']}` | {_fmt_bits(c['bits'])} | {c['algo']} | " + (f"{c['seed']} | " if seeds else "")
        sim = _value(m)
        sim = "–" if sim is None else f"{sim:.2f}"
        if "error" in dep:
            errors.append(f"- `{r['run_id']}`: {dep['error']}")
            lines.append(f"{head}{target} | {sim} | failed | | | | |")
            continue
        lat = dep.get("latency_ms") or {}
        ms = " / ".join("–" if lat.get(k) is None else f"{lat[k]:.2f}" for k in ("b1_ms", "b32_ms"))
        num = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"{head}{target} | {sim} | {num(dep.get('deployed_top1'))} | {num(dep.get('agreement'))} | "
                     f"{_kernels_cell(dep)} | {ms} | {_cpu_cell(dep)} |")
    if errors:
        lines += ["", "Deployments that failed (the simulated result is kept; the next `qdrop bench` retries them):", ""]
        lines += errors
    return "\n".join(lines)


def _describe_setting(setting: dict, all_settings: list[dict]) -> tuple[str, str]:
    """(title: the settings that differ between tables, protocol: the ones they share)."""
    varying = {k for k in setting if len({_key(s.get(k)) for s in all_settings}) > 1}
    show = lambda k, v: f"{k}={'all' if v is None and k == 'eval_limit' else v}"  # noqa: E731
    title = ", ".join(show(k, setting[k]) for k in sorted(varying)) if varying else ""
    empty = lambda v: v is None or v is False or v == []  # noqa: E731
    fixed = ", ".join(show(k, v) for k, v in setting.items() if k not in varying and (not empty(v) or k == "eval_limit"))
    return title, fixed


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _plot_accuracy(groups, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for gi, (setting, records) in enumerate(groups):
        models = _order(r["config"]["model"] for r in records)
        bits_list = sorted(_order(r["config"]["bits"] for r in records), key=lambda b: (-sum(parse_bits(b)), -parse_bits(b)[0]))
        algos = _order((r["config"]["algo"] for r in records), ALGO_ORDER)
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
        for ax, m in zip(axes[0], models):
            rs = [r for r in records if r["config"]["model"] == m]
            for a in algos:
                xs, ys, es = [], [], []
                for i, b in enumerate(bits_list):
                    vals = [v for r in rs if r["config"]["bits"] == b and r["config"]["algo"] == a
                            if (v := _value(r["metrics"])) is not None]
                    if vals:
                        mean, std = _mean_std(vals)
                        xs.append(i)
                        ys.append(mean)
                        es.append(std or 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=a)
            fps = [r["metrics"]["fp"] for r in rs if isinstance(r["metrics"].get("fp"), (int, float))]
            if fps:
                ax.axhline(statistics.fmean(fps), color="k", ls="--", lw=1, label="FP32")
            ax.set_xticks(range(len(bits_list)), [b.upper() for b in bits_list])
            ax.set_title(m, fontsize=10)
            ax.set_xlabel("bit-width (W/A)")
            ax.grid(alpha=0.3)
        metric = next((r["metrics"].get("metric") for r in records if r["metrics"].get("metric")), "score")
        axes[0][0].set_ylabel(metric)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        name = "accuracy_vs_bits.png" if len(groups) == 1 else f"accuracy_vs_bits_{gi + 1}.png"
        save_figure(fig, out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def _is_mixed(r: dict) -> bool:
    c = r["config"]
    return c.get("budget") is not None or is_average_bits(c["bits"])


def _plot_size(records: list[dict], out_dir: Path) -> list[str]:
    """Accuracy vs weight size (metrics.weight_bytes): per model and algorithm, the uniform bit-widths
    and the mixed-precision budgets as two curves (the Pareto view of `benchmarks/mixed.yaml`)."""
    rs = [r for r in records if isinstance((r.get("metrics") or {}).get("weight_bytes"), (int, float))
          and _value(r["metrics"]) is not None]
    if not any(_is_mixed(r) for r in rs):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _order(r["config"]["model"] for r in rs)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for a in _order((r["config"]["algo"] for r in rs if r["config"]["model"] == m), ALGO_ORDER):
            for mixed, style in ((False, "o--"), (True, "s-")):
                pts = {}
                for r in rs:
                    if r["config"]["model"] == m and r["config"]["algo"] == a and _is_mixed(r) == mixed:
                        pts.setdefault(r["metrics"]["weight_bytes"], []).append(_value(r["metrics"]))
                if pts:
                    xs = sorted(pts)
                    ax.plot([x / 1e3 for x in xs], [statistics.fmean(pts[x]) for x in xs], style,
                            label=f"{a}, {'mixed' if mixed else 'uniform'}")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("integer weights (kB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("top-1")
    fig.tight_layout()
    save_figure(fig, out_dir / "accuracy_vs_size.png", dpi=110)
    plt.close(fig)
    return ["accuracy_vs_size.png"]


def _recon_seconds(r: dict):
    """Reconstruction time of a run: the sum of its units' times (each unit's loop and any distribution
    correction before it), which a resumed run keeps from before the kill (its `seconds.reconstruct` is this
    process's part only), else the process's."""
    units = r.get("units") or []
    if units and all(isinstance(u.get("seconds"), (int, float)) for u in units):
        return sum(u["seconds"] + u.get("dc_seconds", 0.0) for u in units)
    return (r.get("seconds") or {}).get("reconstruct")


def _plot_time(records: list[dict], out_dir: Path) -> list[str]:
    """Accuracy vs reconstruction wall time: a panel per (model, bits), a line per algorithm through its
    iteration budgets (mean over seeds, ± std both ways). Drawn when some panel compares at least two
    (algorithm, iterations) settings: what a better algorithm must show is accuracy for the time spent."""
    rs = [r for r in records if isinstance(_recon_seconds(r), (int, float)) and _value(r["metrics"]) is not None]
    panels: dict = {}
    for r in rs:
        c = r["config"]
        panels.setdefault((c["model"], c["bits"]), {}).setdefault(c["algo"], {}).setdefault(c.get("iters"), []).append(r)
    panels = {k: v for k, v in panels.items() if sum(len(by_iters) for by_iters in v.values()) >= 2}
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, ((model, bits), algos) in zip(axes.flat, sorted(panels.items())):
        for a in _order(algos, ALGO_ORDER):
            pts = []
            for it, runs in sorted(algos[a].items(), key=lambda kv: kv[0] or 0):
                t_mean, t_std = _mean_std([_recon_seconds(r) for r in runs])
                v_mean, v_std = _mean_std([_value(r["metrics"]) for r in runs])
                pts.append((t_mean / 60, v_mean, (t_std or 0) / 60, v_std or 0, it))
            xs, ys, xe, ye, its = zip(*pts)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=a)
            for x, y, it in zip(xs, ys, its):
                ax.annotate(f"{it}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{model} {bits.upper()}", fontsize=9)
        ax.set_xlabel("reconstruction wall time (min)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    metric = next((r["metrics"].get("metric") for r in rs if r["metrics"].get("metric")), "score")
    axes[0][0].set_ylabel(f"{metric} (labels: iterations per unit)")
    fig.tight_layout()
    save_figure(fig, out_dir / "accuracy_vs_time.png", dpi=110)
    plt.close(fig)
    return ["accuracy_vs_time.png"]


def _plot_losses(records: list[dict], out_dir: Path, suffix: str = "") -> list[str]:
    """Per (model, bits): each algorithm's per-unit loss curves (lowest seed) and final loss per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_units = [r for r in records if r.get("units")]
    files = []
    if not with_units:
        return files
    for m, b in _order((r["config"]["model"], r["config"]["bits"]) for r in with_units):
        rs = [r for r in with_units if (r["config"]["model"], r["config"]["bits"]) == (m, b)]
        algos = _order((r["config"]["algo"] for r in rs), ALGO_ORDER)
        fig, axes = plt.subplots(2, len(algos), figsize=(4.5 * len(algos), 6.5), squeeze=False)
        for j, a in enumerate(algos):
            runs = sorted((r for r in rs if r["config"]["algo"] == a), key=lambda r: (r["config"]["seed"], r["run_id"]))
            run = runs[0]
            units = run["units"]
            cmap = plt.get_cmap("viridis")
            ax = axes[0][j]
            for k, u in enumerate(units):
                curve = u.get("curve") or []
                if curve:
                    ax.plot([p[0] for p in curve], [max(p[1], 1e-12) for p in curve], color=cmap(k / max(1, len(units) - 1)), lw=1)
            ax.set_yscale("log")
            ax.set_title(f"{a} (seed {run['config']['seed']}): {len(units)} units", fontsize=9)
            ax.set_xlabel("iteration")
            ax.set_ylabel("reconstruction loss (log)")
            ax.grid(alpha=0.3)
            ax = axes[1][j]
            finals = [u.get("final_loss") for u in units]
            firsts = [(u.get("curve") or [[0, None]])[0][1] for u in units]
            ax.plot(range(len(units)), [f if f is not None else math.nan for f in firsts], "o-", ms=3, label="first 100 it")
            ax.plot(range(len(units)), [f if f is not None else math.nan for f in finals], "s-", ms=3, label="final 100 it")
            ax.set_yscale("log")
            ax.set_xlabel("unit (graph order; stages in turn)")
            ax.set_ylabel("mean loss")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{m} {b.upper()}: per-unit reconstruction loss", fontsize=10)
        fig.tight_layout()
        name = f"loss_{_safe(m)}_{b}{suffix}.png"
        save_figure(fig, out_dir / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def render_report(results_dir: str | Path, out: str | Path | None = None, plots: bool = True) -> str:
    """Write RESULTS_DIR/report.md (or `out`) and its PNG plots beside it; return the markdown."""
    results_dir = Path(results_dir)
    if not (results_dir / RESULTS).exists():
        raise UsageError(f"no {RESULTS} in {results_dir}: run `qdrop bench CONFIG` first")
    all_records = read_results(results_dir)
    latest = latest_records(all_records)
    # finished under an earlier definition of their algorithm: out of the tables, which show what the names mean now
    stale = {rid: changes for rid, r in latest.items() if (changes := record_changes(r))}
    ok = _as_methods([r for r in latest.values() if r.get("status") == "ok" and isinstance(r.get("metrics"), dict)
                      and _value(r["metrics"]) is not None and r["run_id"] not in stale])
    failed = [r for r in latest.values() if r.get("status") != "ok"]
    out_path = Path(out) if out else results_dir / "report.md"
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = {}
    if (results_dir / SWEEP).exists():
        try:
            sweep = json.loads((results_dir / SWEEP).read_text())
        except json.JSONDecodeError:
            sweep = {}

    md = [f"# Benchmark report: {sweep.get('name') or results_dir.name}", ""]
    md.append(f"Generated by `qdrop report {results_dir}` from `{RESULTS}` ({len(all_records)} lines, "
              f"{len(ok)} finished runs, {len(failed)} failed{f', {len(stale)} stale' if stale else ''}). Every number below was measured by the run named in "
              f"its record; cells are mean ± sample standard deviation over seeds, best method per block in bold.")
    md.append("")
    groups = group_records(ok)
    settings = [s for s, _ in groups]
    for setting, records in groups:
        title, fixed = _describe_setting(setting, settings)
        metric = next((r["metrics"].get("metric") for r in records if r["metrics"].get("metric")), "score")
        seeds = sorted({r["config"]["seed"] for r in records})
        md.append(f"## {metric}" + (f" — {title}" if title else ""))
        md.append("")
        md.append(f"Settings: {fixed}. Seeds: {', '.join(map(str, seeds))}.")
        evals = sorted({str((r.get("data_used") or {}).get("eval_data")) for r in records if r.get("data_used")})
        if evals:
            md.append(f"Evaluated on: {'; '.join(evals)}.")
        md.append("")
        md.append(table_markdown(records))
        md.append("")
    deployed = [r for r in ok if isinstance(r.get("deploy"), dict)]
    if deployed:
        runtimes = sorted({f"{d['runtime']} {d['ort_version']}" if d.get("ort_version") else d["runtime"]
                           for d in (r["deploy"] for r in deployed)})
        threads = sorted({str((r["deploy"].get("latency_ms") or {}).get("threads")) for r in deployed
                          if r["deploy"].get("latency_ms")})
        md.append("## Deployed accuracy")
        md.append("")
        md.append(f"Each run exported to QDQ ONNX and run by {', '.join(runtimes)} (CPU, all graph optimisations) on "
                  "the same test images as the simulation. Simulated: the PyTorch simulation's top-1 (the tables "
                  "above); agreement: images on which both predict the same class. Kernels, from ONNX Runtime's "
                  "optimised graph: integer = every convolution and linear layer ran as an integer kernel "
                  "(QLinearConv, QGemm, ...); float = none did (dequantized to float); mixed = some layers stayed "
                  f"float. ORT ms: median latency per batch of 1 and 32 images ({', '.join(threads) or '?'} threads). "
                  "CPU: whether it has VNNI (full int8 weights exact) or only AVX2-class integer kernels.")
        md.append("")
        md.append(deploy_markdown(deployed))
        md.append("")
    if plots and ok and not have_matplotlib():
        md += ["## Plots", "", "(not drawn: matplotlib is not installed — `pip install matplotlib`)", ""]
    elif plots and ok:
        files = _plot_accuracy(groups, out_dir)
        md.append("## Plots")
        md.append("")
        for f in files:
            md.append(f"![accuracy vs bit-width]({f})")
            md.append("")
        for f in _plot_size(ok, out_dir):
            md.append(f"![accuracy vs weight size: uniform and mixed precision]({f})")
            md.append("")
        for f in _plot_time(ok, out_dir):
            md.append(f"![accuracy vs reconstruction wall time]({f})")
            md.append("")
        for gi, (setting, records) in enumerate(groups):
            for f in _plot_losses(records, out_dir, suffix="" if len(groups) == 1 else f"_{gi + 1}"):
                md.append(f"![per-unit reconstruction loss]({f})")
                md.append("")
    if ok:
        md.append("## Cost per run")
        md.append("")
        for setting, records in groups:
            title, _ = _describe_setting(setting, settings)
            md.append(cost_markdown(records, title if len(groups) > 1 else ""))
            md.append("")
    if failed:
        md.append("## Failed runs")
        md.append("")
        md.append("| run | error |")
        md.append("|---|---|")
        for r in failed:
            err = r.get("error") or {}
            msg = f"{err.get('type', '?')}: {err.get('message', '')}".replace("|", "\\|").replace("\n", " ")[:300]
            md.append(f"| `{r['run_id']}` | {msg} |")
        md.append("")
    if stale:
        md.append("## Stale runs")
        md.append("")
        md.append("Finished under an earlier definition of their algorithm, so left out of the tables above; the next "
                  "`qdrop bench` of this sweep runs them again.")
        md.append("")
        md.append("| run | what changed since |")
        md.append("|---|---|")
        for rid, changes in stale.items():
            md.append(f"| `{rid}` | {'; '.join(changes[:3]).replace('|', '/')}{'; ...' if len(changes) > 3 else ''} |")
        md.append("")
    md.append("## Provenance")
    md.append("")
    commits = sorted({(r.get("git") or {}).get("commit") or "not a git checkout" for r in latest.values()})
    dirty = any((r.get("git") or {}).get("dirty") for r in latest.values())
    md.append(f"- git: {', '.join(c[:12] for c in commits)}" + (" (some runs from a checkout with uncommitted changes)" if dirty else ""))
    versions = sorted({json.dumps(r.get("versions"), sort_keys=True) for r in latest.values() if r.get("versions")})
    for v in versions:
        md.append(f"- versions: {', '.join(f'{k} {x}' for k, x in json.loads(v).items())}")
    devices = sorted({str((r.get("device") or {}).get("cuda_device") or (r.get("device") or {}).get("processor"))
                      + f" ({(r.get('device') or {}).get('used', '?')}, {(r.get('device') or {}).get('threads', '?')} threads)"
                      for r in latest.values() if r.get("device")})
    for d in devices:
        md.append(f"- device: {d}")
    if sweep.get("config_hash"):
        md.append(f"- sweep config hash: {sweep['config_hash']} ({sweep.get('source')})")
    text = "\n".join(md).rstrip() + "\n"
    atomic_write_text(out_path, text)
    return text


def report_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qdrop report", description="Tables (QDrop paper layout) and plots from a qdrop bench results folder")
    p.add_argument("results_dir")
    p.add_argument("--out", default=None, help="markdown file to write (default RESULTS_DIR/report.md; plots go beside it)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--print", action="store_true", help="also print the markdown")
    args = p.parse_args(argv)
    try:
        text = render_report(args.results_dir, out=args.out, plots=not args.no_plots)
    except QdropError as err:
        print(f"qdrop: error: {err}", file=sys.stderr)
        return 2
    if args.print:
        print(text)
    print(f"wrote {args.out or Path(args.results_dir) / 'report.md'}")
    return 0
