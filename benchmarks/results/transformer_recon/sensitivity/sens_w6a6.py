"""SmolLM2 W6A6 OS+ down_proj rotated (stop 20's rotated search): perplexity (8 windows) with one group of
quantizers switched off at a time, activations and weights apart (stop 21, AMD EPYC, 2 threads).
A one-off analysis kept as run: PYTHONPATH=src python benchmarks/results/transformer_recon/sensitivity/sens_w6a6.py"""
import fnmatch, json, sys, time
import torch
torch.set_num_threads(2)
from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.nlp import quantize_transformer
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches
from qdrop.nlp.models import load_hf
from qdrop.nlp.prepare import quant_linears
bits = sys.argv[1] if len(sys.argv) > 1 else "w6a6"
windows = 8
model, tok = load_hf("hf:smollm2", "lm")
tokens = read_tokens(data_root() / "nlp" / "wikitext2_valid.txt", tok)
ev, cal = lm_splits(tokens, 256, 128, 1024, 32)
batches = segment_batches(cal, 8)
q, rep = quantize_transformer(model, batches, bits, "osplus", w_observer="minmax", down_proj=True, rotate_mlp=True, seed=0)
ev = ev[:windows * 1024]
groups = {"qkv": "*.self_attn.[qkv]_proj", "o": "*.o_proj", "gateup": "*.mlp.[gu][ap]*_proj", "down": "*.down_proj", "lm_head": "lm_head"}
out = {}
def ppl(key):
    t = time.time(); p = round(perplexity(q, ev, window=1024)["ppl"], 3)
    out[key] = p; print(key, p, round(time.time() - t), "s", flush=True)
ppl("all_on")
for kind in ("input_quant", "weight_quant"):
    for g, pat in groups.items():
        ms = [m for n, m in quant_linears(q) if fnmatch.fnmatch(n, pat)]
        for m in ms: getattr(m, kind).set_state("off")
        ppl(f"{kind}_off:{g}")
        for m in ms: getattr(m, kind).set_state("quant")
for n, m in quant_linears(q): m.input_quant.set_state("off")
ppl("all_act_off")
for n, m in quant_linears(q): m.input_quant.set_state("quant"); m.weight_quant.set_state("off")
ppl("all_weight_off")
for n, m in quant_linears(q): m.weight_quant.set_state("quant")
print(json.dumps(out))
json.dump(dict(what=f"SmolLM2 {bits} osplus --down-proj --rotate-mlp seed 0, calib 256x128, first {windows} windows; groups of quantizers off",
               cpu="AMD EPYC (AVX2, no VNNI), 2 threads", ppl=out),
          open(f"benchmarks/results/transformer_recon/sensitivity/smollm2_{bits}_osplus_rot_aware.json", "w"), indent=1)
