"""An exported SmolLM2 (qdrop quantize --model hf:smollm2 --task lm --onnx) scored twice in ONNX Runtime:
its float Q/DQ graph (graph optimisation off) and its integer graph (all optimisations), on the evaluation
windows run_nlp_quantize used. Tells whether a deployed-vs-simulated difference comes from the integer
kernels or from the float arithmetic around them.

    python benchmarks/transformer_ort_levels.py OUT/model.onnx --calib 64 --windows 32
"""
import argparse
import json

import torch

from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.export.transformer import OrtTransformer
from qdrop.nlp.data import lm_splits, read_tokens
from qdrop.nlp.models import load_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--model", default="hf:smollm2")
    ap.add_argument("--calib", type=int, default=256, help="calibration segments of the run (they sit at the end of the file)")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = load_hf(args.model, "lm")
    tokens = read_tokens(data_root() / "nlp" / "wikitext2_valid.txt", tokenizer)
    eval_tokens, _ = lm_splits(tokens, args.calib, args.calib_len, 1024, args.windows)
    out = {level: perplexity(OrtTransformer(args.onnx, threads=args.threads, level=level), eval_tokens, window=1024)["ppl"]
           for level in ("none", "all")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
