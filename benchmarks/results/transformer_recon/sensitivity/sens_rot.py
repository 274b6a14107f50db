"""SmolLM2 W8A8 OS+ down_proj rotated: perplexity (32 windows) with one group of activation quantizers off at a time (stop 19, AMD EPYC, 2 threads; the numbers are in smollm2_w8a8_osplus_rot.json).
A one-off analysis kept as run, less its dead lines: PYTHONPATH=src python benchmarks/results/transformer_recon/sensitivity/sens_rot.py w8a8"""
import sys, time, fnmatch
import torch
torch.set_num_threads(2)
from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.nlp import quantize_transformer
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches
from qdrop.nlp.models import load_hf
from qdrop.nlp.prepare import quant_linears
bits = sys.argv[1] if len(sys.argv) > 1 else "w8a8"
model, tok = load_hf("hf:smollm2", "lm")
tokens = read_tokens(data_root() / "nlp" / "wikitext2_valid.txt", tok)
ev, cal = lm_splits(tokens, 256, 128, 1024, 32)
batches = segment_batches(cal, 8)
q, rep = quantize_transformer(model, batches, bits, "osplus", w_observer="minmax", down_proj=True, rotate_mlp=True, seed=0)
groups = {"qkv": "*.self_attn.[qkv]_proj", "o": "*.o_proj", "gateup": "*.mlp.[gu][ap]*_proj", "down": "*.down_proj", "lm_head": "lm_head"}
def ppl():
    t = time.time(); p = perplexity(q, ev, window=1024)["ppl"]; return round(p, 3), round(time.time() - t)
print("all", ppl(), flush=True)
for g, pat in groups.items():
    ms = [m for n, m in quant_linears(q) if fnmatch.fnmatch(n, pat)]
    for m in ms: m.input_quant.set_state("off")
    print("act off:", g, len(ms), ppl(), flush=True)
    for m in ms: m.input_quant.set_state("quant")
for n, m in quant_linears(q): m.input_quant.set_state("off")
print("all act off (weights only)", ppl(), flush=True)
