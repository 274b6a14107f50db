"""Paired comparison of STS runs: is run A better than run B beyond the evaluation set's noise?

    python benchmarks/sts_paired.py RUN_A RUN_B [RUN_A2 RUN_B2 ...] [--resamples 2000] [--json OUT.json]

Each RUN is the --out folder of a `qdrop quantize --model hf:... --task sts` run; its sts_cosines.json holds the
model's similarity score for every evaluation pair (and the FP model's, when the run evaluated it). For each
(A, B) pair of runs this prints both Spearman x 100 scores, the difference A - B with its 95 % paired-bootstrap
interval over the pairs (qdrop.eval.nlp_metrics.paired_spearman_bootstrap), and each run's agreement with the FP
model (Spearman x 100 between its scores and FP's; a run given FP's score instead of evaluating FP, as a sweep's
later runs are, borrows the FP scores of the other run when both are of the same model). RUN_B may be `fp`: A
against the FP model of A's run.

Why: STS-B dev has 1,500 pairs, and two quantized models that differ by a few tenths may differ by chance in
which pairs they happen to rank better; the paired bootstrap says how large a difference these pairs can
produce on their own. It does not cover the other source of spread, the calibration draw (--seed): compare
runs of several seeds for that.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdrop.errors import DataError, QdropError
from qdrop.eval.nlp_metrics import paired_spearman_bootstrap, spearman
from qdrop.io import atomic_write_json


def load_run(path: str) -> dict:
    f = Path(path) / "sts_cosines.json"
    if not f.is_file():
        raise DataError(f"{path}: no sts_cosines.json; give the --out folder of a `qdrop quantize --task sts` run "
                        f"(runs before this file existed must be rerun)")
    try:
        run = json.loads(f.read_text())
        if len(run["quant"]) != len(run["gold"]) or run["fp"] is not None and len(run["fp"]) != len(run["gold"]):
            raise ValueError("its score lists have different lengths")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{f} is not a valid scores file ({type(e).__name__}: {e}); rerun that run") from None
    return run


def compare(a_path: str, b_path: str, resamples: int) -> dict:
    a = load_run(a_path)
    b = dict(a, quant=a["fp"]) if b_path == "fp" else load_run(b_path)
    if a["gold"] != b["gold"]:
        raise DataError(f"{a_path} ({a['pairs']} pairs of {a['data']}) and {b_path} ({b['pairs']} pairs of "
                        f"{b['data']}) were evaluated on different pairs; compare runs on the same STS pairs")
    # the FP model's scores: a run evaluates FP itself unless it was given FP's score (a sweep's later runs);
    # another run of the same model on the same pairs has the same FP scores
    fp = a["fp"] if a["fp"] is not None else b["fp"] if b.get("model") == a.get("model") else None
    if b_path == "fp" and fp is None:
        raise DataError(f"{a_path}: the run did not evaluate the FP model (its FP score was given); compare it with "
                        f"another run of the same model instead of `fp`")
    r = paired_spearman_bootstrap(a["quant"], b["quant"], a["gold"], resamples=resamples)

    def agreement(scores):
        return None if fp is None else 100.0 * spearman(scores, fp)

    return dict(a_run=a_path, b_run=b_path, **r, a_fp_agreement=agreement(a["quant"]),
                b_fp_agreement=agreement(b["quant"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="RUN_A RUN_B pairs (RUN_B may be `fp`)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args(argv)
    if len(args.runs) % 2:
        ap.error("give the runs in pairs: RUN_A RUN_B [RUN_A2 RUN_B2 ...]")
    if args.resamples < 1:
        ap.error(f"--resamples {args.resamples}: give at least 1 (2,000 for a 95 % interval)")
    try:
        rows = [compare(a, b, args.resamples) for a, b in zip(args.runs[::2], args.runs[1::2])]
        if args.json:
            atomic_write_json(args.json, rows)
    except QdropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    print("| A | B | A | B | A − B | 95 % interval | resamplings with A > B | A's agreement with FP | B's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['a_run']} | {r['b_run']} | {r['a']:.2f} | {r['b']:.2f} | {r['difference']:+.2f} "
              f"| [{r['low']:+.2f}, {r['high']:+.2f}] | {100 * r['a_wins']:.1f} % | {fmt(r['a_fp_agreement'])} "
              f"| {fmt(r['b_fp_agreement'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
