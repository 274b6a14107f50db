"""Mixed precision: per-layer weight bit-widths chosen from measured sensitivity under a budget.

1. Sensitivity s[l, b] of every searchable layer l at every candidate weight bit-width b, on the
   calibration samples, with everything else in floating point. Two measures:
     output   the relative error the layer's quantized weights cause at the output of its
              reconstruction unit, ||f(W_b) - f(W)||^2 / ||f(W)||^2 (the unit's own FP input);
     hessian  HAWQ-v2: the mean Hessian trace of the loss over the layer's weights (Hutchinson,
              Rademacher probes; the loss is cross-entropy to the FP model's own predictions, as
              the samples are unlabelled) times the perturbation ||Q_b(W) - W||^2.
2. Allocation: minimise sum_l s[l, b_l] subject to one budget, solved exactly as a 0/1 integer
   program (scipy.optimize.milp): one bit-width per layer, and
     bits     average weight bits over the searchable layers' parameters <= B
     size     bytes of all integer weights (fixed layers included) <= B
     bops     sum_l MACs_l * b_l * a_l <= B (activation bits of the layer's input)
The searchable layers are those the preset does not pin (the academic preset keeps the first and last
layer at 8 bits); so an average of 2 bits is uniform W2 and 4 is uniform W4.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ReconstructionError, UsageError
from ..graph.prepare import quant_mode
from ..graph.units import block_units, subgraph
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer

CANDIDATE_BITS = (2, 3, 4, 6, 8)
SENSITIVITIES = ("output", "hessian")
BUDGET_KINDS = ("bits", "size", "bops")


@dataclass
class LayerCost:
    name: str
    params: int
    macs: int  # multiply-accumulates per sample
    input_bits: int  # bits of the activation quantizer feeding it (8 when its input is not quantized)
    fixed_bits: int | None  # pinned by the preset (first/last layer), else None: searchable


def parse_budget(text: str) -> tuple[str, float]:
    """'bits=2.5' | 'size=0.1' (MB, 10^6 bytes) | 'bops=1.2' (10^9) -> (kind, value in bits / bytes / BOPs)."""
    kind, sep, value = str(text).partition("=")
    kind = kind.strip().lower()
    try:
        v = float(value)
    except ValueError:
        v = None
    if not sep or kind not in BUDGET_KINDS or v is None or v <= 0:
        raise UsageError(f"budget must look like bits=2.5, size=MB or bops=G (a positive number), got {text!r}")
    return kind, v * {"bits": 1, "size": 1e6, "bops": 1e9}[kind]


def layer_costs(qmodel, example: torch.Tensor) -> list[LayerCost]:
    """Parameters, MACs per sample and input bits of every QuantLayer, from one forward pass."""
    from ..graph.prepare import layer_input_quantizers

    macs, hooks = {}, []
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    for name, m in layers.items():
        def hook(mod, inp, out, name=name):
            w = mod.layer.weight
            per_out = w[0].numel()  # in_channels/groups * kernel
            macs[name] = macs.get(name, 0) + out[0].numel() * per_out
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), quant_mode(qmodel, weights=False, acts=False):
            qmodel(example[:1])
    finally:
        for h in hooks:
            h.remove()
    inputs = layer_input_quantizers(qmodel)
    pinned = _pinned(qmodel)
    return [LayerCost(n, m.layer.weight.numel(), int(macs.get(n, 0)),
                      inputs[n].bits if inputs.get(n) is not None else 8, pinned.get(n)) for n, m in layers.items()]


def _pinned(qmodel) -> dict:
    """Layers the preset fixes at 8 bits (first/last layer of the academic preset)."""
    from ..graph.prepare import PRESETS

    cfg = qmodel.qdrop_config
    if not PRESETS[cfg.backend].first_last_8bit:
        return {}
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    return {names[0]: 8, names[-1]: 8} if names else {}


def _quantized_weight(layer: QuantLayer, bits: int) -> torch.Tensor:
    q = Quantizer(layer.weight_quant.scheme.with_(bits=bits), layer.layer.weight.shape[0], role="weight")
    q.calibrate_on(layer.layer.weight.detach())
    with torch.no_grad():
        return q(layer.layer.weight.detach())


@torch.no_grad()
def output_sensitivity(qmodel, x: torch.Tensor, bits=CANDIDATE_BITS, device="cpu") -> dict:
    """{layer: {bits: relative squared error at its unit's output}}, everything else FP."""
    out = {}
    qmodel.to(device).eval()
    with quant_mode(qmodel, weights=False, acts=False):
        h = x.to(device)
        for block in block_units(qmodel):
            mod = subgraph(qmodel, block.nodes, block.input, [block.output])
            ref = mod(h)
            denom = ref.float().pow(2).sum().clamp_min(1e-12)
            for name in block.layers:
                layer = qmodel.get_submodule(name)
                w = layer.layer.weight
                saved = w.detach().clone()
                out[name] = {}
                for b in bits:
                    w.copy_(_quantized_weight(layer, b))
                    out[name][b] = float((mod(h).float() - ref.float()).pow(2).sum() / denom)
                    w.copy_(saved)
            h = ref
    return out


def hessian_sensitivity(qmodel, x: torch.Tensor, bits=CANDIDATE_BITS, probes: int = 16, batch: int = 64,
                        seed: int = 0, device="cpu") -> dict:
    """{layer: {bits: mean Hessian trace * ||Q_b(W) - W||^2}} (HAWQ-v2), Hutchinson with `probes`
    Rademacher vectors over batches of the calibration samples."""
    qmodel.to(device).eval()
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    params = [m.layer.weight for m in layers.values()]
    was = [p.requires_grad for p in params]
    trace = {n: 0.0 for n in layers}
    g = torch.Generator().manual_seed(seed)
    n_terms = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with quant_mode(qmodel, weights=False, acts=False):
            for i in range(0, len(x), batch):
                xb = x[i:i + batch].to(device)
                logits = qmodel(xb)
                loss = F.cross_entropy(logits, logits.detach().argmax(1))  # the FP model's own predictions
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for _ in range(probes):
                    vs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    for n, v, h in zip(layers, vs, hv):
                        trace[n] += float((v * h).sum())
                    n_terms += 1
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
    out = {}
    for n, m in layers.items():
        mean_trace = max(trace[n] / max(1, n_terms), 0.0) / m.layer.weight.numel()
        w = m.layer.weight.detach()
        out[n] = {b: mean_trace * float((_quantized_weight(m, b) - w).pow(2).sum()) for b in bits}
    return out


def _bounds(costs: list[LayerCost], kind: str, bits) -> tuple[float, float]:
    lo, hi = min(bits), max(bits)
    if kind == "bits":
        return float(lo), float(hi)
    return _total(costs, kind, {c.name: lo for c in costs}), _total(costs, kind, {c.name: hi for c in costs})


def _total(costs: list[LayerCost], kind: str, alloc: dict) -> float:
    """The budget measure of an allocation (searchable layers take alloc's bits, fixed ones their own)."""
    def b(c):
        return c.fixed_bits if c.fixed_bits is not None else alloc[c.name]
    if kind == "bits":
        free = [c for c in costs if c.fixed_bits is None]
        return sum(c.params * alloc[c.name] for c in free) / max(1, sum(c.params for c in free))
    if kind == "size":
        return sum(c.params * b(c) for c in costs) / 8
    return sum(c.macs * b(c) * c.input_bits for c in costs)


BUDGET_TOL = 1e-12  # relative: an allocation may exceed the budget by this much (float rounding), no more


def allocate(sens: dict, costs: list[LayerCost], kind: str, budget: float, bits=CANDIDATE_BITS) -> dict:
    """The bit-width of every searchable layer minimising total sensitivity under the budget,
    exactly (0/1 integer program; optimal to 1e-6 of the largest sensitivity, the solver's absolute gap). Returns {'bits': {layer: b}, 'objective', 'used', 'budget',
    'seconds'}; a budget outside what the candidate bit-widths can meet is a UsageError that
    states the feasible range."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    free = [c for c in costs if c.fixed_bits is None]
    if not free:
        raise UsageError("no layer is free to choose its bit-width (every layer is pinned by the preset)")
    lo, hi = _bounds(costs, kind, bits)
    unit = {"bits": ("average weight bits", 1), "size": ("MB", 1e6), "bops": ("GBOPs", 1e9)}[kind]
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise UsageError(f"{kind} budget {budget / unit[1]:.6g} {unit[0]} is outside what this model can meet with "
                         f"weights of {min(bits)}-{max(bits)} bits: choose {lo / unit[1]:.6g} to {hi / unit[1]:.6g}"
                         + ("" if kind == "bits" else f" {unit[0]}"))
    t = time.perf_counter()
    nb = len(bits)
    c = np.array([sens[f.name][b] for f in free for b in bits], dtype=np.float64)
    scale = max(np.abs(c).max(), 1e-30)
    one_each = np.kron(np.eye(len(free)), np.ones(nb))
    if kind == "bits":
        total = sum(f.params for f in free)
        row = np.array([f.params * b / total for f in free for b in bits])
        limit = budget
    else:
        per = (lambda f, b: f.params * b / 8) if kind == "size" else (lambda f, b: f.macs * b * f.input_bits)
        row = np.array([per(f, b) for f in free for b in bits], dtype=np.float64)
        fixed = [x for x in costs if x.fixed_bits is not None]
        limit = budget - _total(fixed, kind, {}) if fixed else budget
    # The solver meets constraints only to its feasibility tolerance (relative ~1e-7 of a row that can reach
    # 1e12 BOPs), so a solution a hair over the budget is possible: the budget row is normalised, the
    # solution checked in exact arithmetic, and the limit tightened by any overshoot (hypothesis found one).
    norm = max(abs(limit), 1.0)
    for _ in range(8):
        # mip_rel_gap 0: HiGHS stops at 1e-4 relative gap by default (hypothesis found a 1e-6 worse allocation);
        # what remains is its absolute gap, 1e-6 of the largest sensitivity (the objective is scaled to 1)
        res = milp(c / scale, integrality=np.ones_like(c), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(row[None] / norm, -np.inf, limit / norm)],
                   options={"mip_rel_gap": 0.0})
        if not res.success:
            raise UsageError(f"no allocation meets the {kind} budget ({res.message})")
        x = np.round(res.x).reshape(len(free), nb)
        alloc = {f.name: int(bits[int(x[i].argmax())]) for i, f in enumerate(free)}
        over = _total(costs, kind, alloc) - budget
        if over <= BUDGET_TOL * max(abs(budget), 1.0):
            break
        limit -= over + BUDGET_TOL * max(abs(budget), 1.0)
    else:
        raise ReconstructionError(f"the integer program kept exceeding the {kind} budget by {over:.3g}")
    return dict(bits=alloc, objective=float(sum(sens[n][b] for n, b in alloc.items())), kind=kind,
                budget=budget, used=_total(costs, kind, alloc), seconds=round(time.perf_counter() - t, 4))


def search(qmodel, x: torch.Tensor, kind: str, budget: float, sensitivity: str = "output", bits=CANDIDATE_BITS,
           device="cpu") -> dict:
    """Sensitivity on calibration samples `x`, then the exact allocation: the search behind
    `qdrop quantize --bits w2.5a4` / `--budget`. Returns allocate()'s dict plus the measure used,
    its time and the table of sensitivities."""
    if sensitivity not in SENSITIVITIES:
        raise UsageError(f"unknown sensitivity {sensitivity!r}; choose from {SENSITIVITIES}")
    qmodel.to(device)
    costs = layer_costs(qmodel, x[:1].to(device))
    t = time.perf_counter()
    fn = output_sensitivity if sensitivity == "output" else hessian_sensitivity
    sens = fn(qmodel, x, bits=bits, device=device)
    sens_seconds = time.perf_counter() - t
    result = allocate(sens, costs, kind, budget, bits)
    result.update(sensitivity=sensitivity, sensitivity_seconds=round(sens_seconds, 2),
                  table={n: {str(b): v for b, v in d.items()} for n, d in sens.items()},
                  layers=[dict(name=c.name, params=c.params, macs=c.macs, input_bits=c.input_bits,
                               bits=c.fixed_bits if c.fixed_bits is not None else result["bits"][c.name],
                               fixed=c.fixed_bits is not None) for c in costs])
    return result


def uniform_cost(qmodel, example: torch.Tensor, kind: str) -> float:
    """The budget measure of the model as prepared (its own per-layer weight bits)."""
    costs = layer_costs(qmodel, example)
    alloc = {c.name: qmodel.get_submodule(c.name).weight_quant.bits for c in costs}
    return _total(costs, kind, alloc)

