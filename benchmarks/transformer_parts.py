"""Where a quantized causal LM loses: the perplexity of one quantized model with every quantizer on, with the
weight quantizers alone, with the activation quantizers alone, and with lm_head (its weight and its input) in
floating point. Built as `qdrop quantize --model hf:smollm2 --task lm --algo osplus --down-proj --rotate all
--w-observer mse --a-observer mse --w-rounding gptq` builds it (the same calibration segments and evaluation
windows; qdrop.nlp_pipeline.run_nlp_quantize), so `all` is that command's number on the same CPU.

    python benchmarks/transformer_parts.py --bits w4a8 --seed 0 --out parts.json [--gptq-search] [--by-kind]
        [--e2e-steps 64 [--e2e-lr 1e-2]] [--only-all]

--e2e-steps adds the command's `--e2e-steps` (qdrop.nlp.tune_step_sizes, on the same calibration batches and seed):
the model is scored before it (`before_e2e`), then tuned, and the parts are the tuned model's. --only-all skips the
parts (only `all`, and `before_e2e`).

--by-kind adds, for each kind of Linear in the blocks (the last part of its name: q_proj, ..., down_proj), the
perplexity with that kind's weights in floating point and everything else quantized.

The parts do not add up: each is the model with the other quantizers off, not a share of `all`.
"""
import argparse
import time

import torch

from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.io import atomic_write_json, environment
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches
from qdrop.nlp.models import load_hf
from qdrop.nlp.pipeline import quantize_transformer
from qdrop.nlp.tune import E2E_LR, tune_step_sizes
from qdrop.nlp_pipeline import DEFAULT_DATA
from qdrop.quant.state import quant_mode, quantizers, switched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hf:smollm2")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gptq-search", action="store_true")
    ap.add_argument("--by-kind", action="store_true")
    ap.add_argument("--e2e-steps", type=int, default=None)
    ap.add_argument("--e2e-lr", type=float, default=E2E_LR)
    ap.add_argument("--only-all", action="store_true")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp, tokenizer = load_hf(args.model, "lm")
    tokens = read_tokens(data_root() / DEFAULT_DATA["lm"], tokenizer)
    eval_tokens, cal = lm_splits(tokens, args.calib, args.calib_len, 1024, args.windows)
    t = time.perf_counter()
    batches = segment_batches(cal, batch_size=8)  # run_nlp_quantize's calibration batches for lm
    qmodel, report = quantize_transformer(fp, batches, args.bits, "osplus", "per_tensor",
                                          "mse", "mse", down_proj=True, rotate="all", w_rounding="gptq",
                                          gptq_search=args.gptq_search, seed=args.seed, inplace=True, progress=True)
    result = dict(vars(args), quantize_s=round(time.perf_counter() - t, 1), gptq=report["gptq"])

    def ppl() -> float:
        return round(float(perplexity(qmodel, eval_tokens, window=1024)["ppl"]), 4)
    if args.e2e_steps:
        result["before_e2e"] = ppl()
        print("before e2e", result["before_e2e"], flush=True)
        t = time.perf_counter()
        result["e2e"] = tune_step_sizes(qmodel, batches, args.e2e_steps, lr=args.e2e_lr, seed=args.seed, progress=True)
        result["e2e_s"] = round(time.perf_counter() - t, 1)
    result["all"] = ppl()
    print("all", result["all"], flush=True)
    if not args.only_all:
        score_parts(qmodel, ppl, result, args.by_kind)
    result["environment"] = environment()
    print({k: result[k] for k in ("all", "weights_only", "acts_only", "lm_head_fp") if k in result})
    atomic_write_json(args.out, result)


def score_parts(qmodel, ppl, result: dict, by_kind: bool) -> None:
    """The perplexity with parts of the quantizers off (module docstring), into result."""
    with quant_mode(qmodel, weights=True, acts=False):
        result["weights_only"] = ppl()
    with quant_mode(qmodel, weights=False, acts=True):
        result["acts_only"] = ppl()
    with switched(qmodel, lambda name, q: not name.startswith("lm_head.")):
        result["lm_head_fp"] = ppl()
    if by_kind:
        kinds = sorted({name.rsplit(".", 2)[-2] for name, q in quantizers(qmodel)
                        if q.role == "weight" and not name.startswith("lm_head.")})
        result["weights_fp_of_kind"] = {}
        for kind in kinds:
            with switched(qmodel, lambda name, q: not (q.role == "weight" and name.endswith(f".{kind}.weight_quant"))):
                result["weights_fp_of_kind"][kind] = ppl()
            print(kind, result["weights_fp_of_kind"][kind], flush=True)

if __name__ == "__main__":
    main()
