import sys, time, json
sys.path.insert(0, "/work/main/src")
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
ev4 = ev[:4 * 1024] if ev.dim() == 1 else ev[:4]
def ppl():
    return round(perplexity(q, ev4, window=1024)["ppl"], 3)
base = ppl(); print("all (4 windows)", base, flush=True)
downs = [(n, m) for n, m in quant_linears(q) if n.endswith("down_proj")]
for n, m in downs:
    iq = m.input_quant
    lo_hi = getattr(iq, "scale", None)
    m.input_quant.set_state("off")
    p = ppl()
    m.input_quant.set_state("quant")
    sc = float(iq.scale.flatten()[0]) if getattr(iq, "scale", None) is not None else None
    print(json.dumps(dict(layer=n, ppl_off=p, delta=round(base - p, 3), scale=sc)), flush=True)
