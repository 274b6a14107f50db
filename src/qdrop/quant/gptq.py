"""GPTQ rounding (Frantar et al., ICLR 2023): integer codes for a weight matrix on a fixed per-row grid.

Nearest rounding treats every weight alone. GPTQ quantizes the columns (input features) one at a
time and moves the error each column leaves into the columns not yet quantized, weighted by how the
layer's inputs correlate, so that X Ŵᵀ stays close to X Wᵀ on the calibration inputs X:

    H = Xᵀ X + λ I                      (λ = damp x mean diag H: keeps H invertible)
    U = chol(H⁻¹), upper triangular
    for each column j:  q_j = Q(w_j);  e_j = (w_j - q_j) / U_jj;  w_k -= e_j U_jk  (k > j)

(the paper's Algorithm 1: Optimal Brain Surgeon's update for one weight, done for a whole column of
rows at once, in blocks of `block` columns with a lazy update of the rest). Columns are taken by
decreasing H_jj ("act order": the inputs with the most energy first, while many columns are left to
absorb their error). With a diagonal H no error moves and the codes are nearest rounding's.

The grid (scale, zero point) is the caller's: it comes from the weight observer, as for every other
rounding; GPTQ only chooses the codes on it.
"""
from __future__ import annotations

import torch

DAMP = 0.01  # the paper's λ: 1 % of the mean diagonal


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ in float64; λ grows tenfold until H + λI is positive definite."""
    n = h.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=h.device)
    lam = damp * float(torch.diagonal(h).mean().clamp_min(1e-12))
    for _ in range(8):
        low, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        lam *= 10
    raise ValueError("GPTQ: the input statistics are not positive definite even with heavy damping")


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               damp: float = DAMP, block: int = 128, act_order: bool = True) -> torch.Tensor:
    """Integer codes (int64, shape of w) of w [out, in] on the grid of per-row `scale` / `zero_point` ([out]),
    chosen by GPTQ for inputs whose second moment is h [in, in] (Σ xᵀx over calibration tokens)."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ needs a 2-d weight and an in x in matrix, got {tuple(w.shape)} and {tuple(h.shape)}")
    h = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # inputs that were always 0: nothing to compensate, no error moves from them
    h[dead, dead] = 1.0
    w = w.detach().float().clone()
    s = scale.detach().float().reshape(-1, 1).expand(w.shape[0], 1)
    inv_s = 1.0 / s  # x * (1/s): the arithmetic of Quantizer.int_repr and PyTorch's fake-quant
    z = zero_point.detach().float().reshape(-1, 1).expand(w.shape[0], 1)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp).float()
    codes = torch.empty_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j:j + 1]
            q = torch.clamp(torch.round(col * inv_s) + z, qmin, qmax)
            codes[:, i1 + j:i1 + j + 1] = q
            e = (col - (q - z) * s) / u1[j, j]
            w1[:, j:] -= e * u1[j:j + 1, j:]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.long()


# The step sizes gptq_search tries, as multiples of the observer's: the observer chose its step for nearest
# rounding, but GPTQ moves each column's error into the columns left, which makes some rows prefer a finer grid
# (less rounding error to carry) and others a coarser one (fewer compensated weights pushed past the ends).
SEARCH_FACTORS = (0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)


def row_errors(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each row's output error on the calibration inputs, ‖X (w_i − ŵ_i)‖² = Δw_i H Δw_iᵀ (float64, [out])."""
    d = (w.detach().double() - wq.detach().double())
    return torch.einsum("oi,ij,oj->o", d, h.detach().double(), d)


@torch.no_grad()
def gptq_search(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                factors: tuple = SEARCH_FACTORS, damp: float = DAMP, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on each of the grids scale x f (f in factors, zero points kept: an asymmetric range shrinks or grows
    about its zero), keeping for every row the grid whose codes give the least output error Δw_i H Δw_iᵀ.
    Rows are independent in GPTQ (a column's error moves only along its own row), so the choice is exact per row
    and can only lower each row's error below the observer's grid alone when 1.0 is among the factors.
    Returns (per-row scale [out], codes [out, in] int64)."""
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(f"gptq_search needs positive step-size factors, got {factors!r}")
    z = zero_point.detach().float().reshape(-1, 1)
    best_err = best_scale = best_codes = None
    for f in factors:
        s = scale.detach().float().reshape(-1) * f
        codes = gptq_codes(w, h, s, zero_point, qmin, qmax, damp=damp, block=block)
        err = row_errors(w, (codes.float() - z) * s.reshape(-1, 1), h)
        if best_err is None:
            best_err, best_scale, best_codes = err, s.clone(), codes
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_codes = torch.where(better.reshape(-1, 1), codes, best_codes)
    return best_scale, best_codes
