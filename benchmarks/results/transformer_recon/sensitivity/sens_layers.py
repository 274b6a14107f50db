"""The same model: perplexity (4 windows) with one layer's down_proj input quantizer off at a time (stop 19, AMD EPYC, 2 threads; the numbers are in smollm2_w8a8_osplus_rot.json).
A one-off analysis kept as run, less its dead lines: PYTHONPATH=src python benchmarks/results/transformer_recon/sensitivity/sens_layers.py"""
import json
import torch
torch.set_num_threads(2)
from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.nlp import quantize_transformer
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches
from qdrop.nlp.models import load_hf
from qdrop.nlp.prepare import quant_linears
model, tok = load_hf("hf:smollm2", "lm")
tokens = read_tokens(data_root() / "nlp" / "wikitext2_valid.txt", tok)
ev, cal = lm_splits(tokens, 256, 128, 1024, 32)
batches = segment_batches(cal, 8)
q, rep = quantize_transformer(model, batches, "w8a8", "osplus", w_observer="minmax", down_proj=True, rotate_mlp=True, seed=0)
ev4 = ev[:4 * 1024]  # the first 4 windows
def ppl():
    return round(perplexity(q, ev4, window=1024)["ppl"], 3)
base = ppl(); print("all (4 windows)", base, flush=True)
downs = [(n, m) for n, m in quant_linears(q) if n.endswith("down_proj")]
for n, m in downs:
    iq = m.input_quant
    iq.set_state("off")
    p = ppl()
    iq.set_state("quant")
    sc = float(iq.scale.flatten()[0])  # static per-tensor: one step; 255 x it is the range's span
    print(json.dumps(dict(layer=n, ppl_off=p, delta=round(base - p, 3), scale=sc)), flush=True)
