"""SmolLM2 W6A6 OS+ --down-proj --rotate-mlp (seed 0): which cheap lever lowers perplexity (first 8 windows)?
Variants applied post hoc to the one model: online rotation of more Linear inputs (o_proj; all), MSE weight
ranges (stop 21, AMD EPYC, 2 threads). A one-off analysis kept as run:
PYTHONPATH=src python benchmarks/results/transformer_recon/sensitivity/w6a6_levers.py"""
import copy, dataclasses, fnmatch, json, time
import torch
torch.set_num_threads(2)
from qdrop.data.paths import data_root
from qdrop.eval.nlp_metrics import perplexity
from qdrop.nlp import quantize_transformer
from qdrop.nlp.data import lm_splits, read_tokens, segment_batches
from qdrop.nlp.models import load_hf
from qdrop.nlp.prepare import quant_linears, calibrate_transformer
from qdrop.nlp.rotation import rotation_matrix
from qdrop.quant.state import quantizers
model, tok = load_hf("hf:smollm2", "lm")
tokens = read_tokens(data_root() / "nlp" / "wikitext2_valid.txt", tok)
ev, cal = lm_splits(tokens, 256, 128, 1024, 32)
batches = segment_batches(cal, 8)
ev = ev[:8 * 1024]
out = {}
def ppl(m, key):
    t = time.time(); p = round(perplexity(m, ev, window=1024)["ppl"], 3)
    out[key] = p; print(key, p, round(time.time() - t), "s", flush=True)
ppl(model, "fp")
base, rep = quantize_transformer(model, batches, "w6a6", "osplus", w_observer="minmax", down_proj=True, rotate_mlp=True, seed=0)
ppl(base, "base")
def rotate(m, pats):
    for n, lin in quant_linears(m):
        if lin.input_rotation is None and any(fnmatch.fnmatch(n, p) for p in pats):
            w = lin.layer.weight
            r = rotation_matrix(w.shape[1], 0)
            w.data.copy_((w.data.double() @ r).to(w.dtype))
            lin.input_rotation = r.to(w.dtype)
            lin.weight_quant.set_calibrated(False)
    for _, q in quantizers(m):
        if q.role == "act":
            q.set_calibrated(False)
    calibrate_transformer(m, batches)
def mse_weights(m, pats):
    for n, lin in quant_linears(m):
        if any(fnmatch.fnmatch(n, p) for p in pats):
            wq = lin.weight_quant
            wq.set_calibrated(False); wq.set_scheme(dataclasses.replace(wq.scheme, observer="mse"))
    for _, lin in quant_linears(m):  # the weight ranges alone (calibrate_weights until stop 49)
        if not lin.weight_quant.calibrated: lin.weight_quant.calibrate_on(lin.layer.weight)
    for _, lin in quant_linears(m): lin.weight_quant.set_state("quant")
for key, fn in [("rot_o", lambda m: rotate(m, ["*.o_proj"])),
                ("rot_all", lambda m: rotate(m, ["*"])),
                ("mse_w_all", lambda m: mse_weights(m, ["*"])),
                ("mse_w_lmhead_qkv", lambda m: mse_weights(m, ["lm_head", "*.[qkv]_proj"]))]:
    m = copy.deepcopy(base); fn(m); ppl(m, key); del m
m = copy.deepcopy(base); rotate(m, ["*"]); mse_weights(m, ["*"]); ppl(m, "rot_all+mse_w_all")
print(json.dumps(out))
json.dump(dict(what="SmolLM2 w6a6 osplus --down-proj --rotate-mlp seed 0, calib 256x128, first 8 windows; post-hoc variants",
               cpu="AMD EPYC (AVX2, no VNNI), 2 threads", ppl=out),
          open("benchmarks/results/transformer_recon/sensitivity/smollm2_w6a6_levers.json", "w"), indent=1)
