"""Online rotation of Linear inputs: the MLP's inner activation (the input of its second Linear), or every
quantized Linear's input.

The equivalent transforms (equalize.py) act on a norm's output, where a per-channel scale or
shift can be folded into the norm. The MLP's inner activation (Llama: act(gate) * up, read by
down_proj; BERT: GELU(intermediate), read by output.dense) has no such place to fold into, and
its outliers are what remains of SmolLM2's W8A8 loss (README, #12): a handful of channels of a
few tokens reach 4-9 where the calibrated per-tensor range is +-1-3.

An orthogonal R spreads each token's energy over all channels: a lone outlier v in one channel
becomes about v / sqrt(n) in every channel. The layer computes x Wᵀ = (x R)(W R)ᵀ, so storing
W R and multiplying the input by R at run time is exact in real arithmetic; the input quantizer
then sees x R. This is the online Hadamard rotation of QuaRot (Ashkboos et al., 2024), done inside
each rotated Linear: the residual stream and the norms are left alone, so the norm transforms
(OS+, SmoothQuant) still apply first. sites='mlp' rotates the one activation no norm transform can
reach; sites='all' every quantized Linear's input. At W6A6 the norm-following inputs and o_proj's
keep per-tensor ranges too wide for 6 bits even after OS+ (README, #12: SmolLM2's o_proj input alone
cost 0.8 perplexity), and a rotation is the only exact transform o_proj's input has.

R = diag(signs) (Q kron H): H the normalised Sylvester-Hadamard matrix of the largest power of two
p dividing n, Q a random orthogonal m x m (m = n / p; 1536 = 3 x 512), signs random. One R per
width and seed, shared by every layer of that width (as in QuaRot). It is stored dense: the product
costs n^2 multiply-adds per token, more than a structured Hadamard would, and is one MatMul in ONNX.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import find_adapter
from .equalize import _record
from ..errors import UsageError
from .layers import QuantLinear
from .prepare import quant_linears


def hadamard(p: int) -> torch.Tensor:
    """The p x p Sylvester-Hadamard matrix divided by sqrt(p) (orthogonal, symmetric), p a power of 2."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power of 2, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / p ** 0.5


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal float64 matrix diag(signs) (Q kron H) (module docstring)."""
    p = n & -n  # the largest power of 2 dividing n
    m = n // p
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0] if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(q.contiguous(), hadamard(p))


ROTATE_SITES = ("mlp", "all")


def rotation_targets(model: nn.Module, sites: str) -> list[str]:
    """The quantized Linears whose input `sites` rotates: 'mlp' every MLP's second Linear (its input
    follows no norm, so only a rotation or a scale into the first Linear can reach it); 'all' every
    quantized Linear (q/k/v, o_proj, gate/up, down_proj, lm_head: QuaRot's coverage, each input rotated
    online inside its own layer, so the residual stream and the norms are untouched)."""
    if sites not in ROTATE_SITES:
        raise UsageError(f"rotate must be one of {ROTATE_SITES}, got {sites!r}")
    if sites == "mlp":
        names = find_adapter(model).mlp_outputs
        return [n for n in names if isinstance(model.get_submodule(n), QuantLinear)]
    return [n for n, _ in quant_linears(model)]


@torch.no_grad()
def rotate_inputs(model: nn.Module, sites: str = "mlp", seed: int = 0) -> dict:
    """Rotate the input of every quantized Linear of `sites` (rotation_targets; exact with quantizers
    off). Apply after the norm transforms and before calibration: the input quantizer must observe x R.
    A Linear kept in floating point (prepare's skip=) is left alone. Returns the count and widths rotated."""
    rotated, shared = 0, {}  # shared: width -> (R in float64 for the weights, R stored in the layers' dtype)
    for name in rotation_targets(model, sites):
        lin = model.get_submodule(name)
        if lin.input_rotation is not None:
            raise UsageError(f"{name}: its input is already rotated (rotate_inputs ran twice)")
        if lin.input_quant.calibrated and not lin.per_token:
            raise UsageError(f"{name}: its input range was calibrated on the unrotated input; rotate before "
                             "calibrate_transformer (quantize_transformer(rotate=...) does)")
        w = lin.layer.weight
        n = w.shape[1]
        if n not in shared:
            r = rotation_matrix(n, seed)
            shared[n] = (r, r.to(w.dtype))
        r, r_stored = shared[n]
        w.data.copy_((w.data.double() @ r).to(w.dtype))
        lin.input_rotation = r_stored
        rotated += 1
    _record(model, dict(name="rotate", sites=sites, seed=seed, layers=rotated))
    return dict(layers=rotated, widths=sorted(shared))
