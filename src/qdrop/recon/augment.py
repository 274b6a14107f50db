"""Augmented views of image calibration inputs, for a network-scope stage (Stage.views).

Why: the end-to-end stage (configs.E2E_STEPS) fits ~300 step sizes to the FP model's predictions on the
calibration set alone, 1,024 images seen 16 times over at 2,000 it/unit, and its result depended on the
batch order by up to 0.9 points (ResNet-20 W3A3, the same block-wise model; docs/algorithms/beyond.md).
Shifted and mirrored copies of the same images, with the FP model's own predictions on them as targets, are
new inputs at no labelling cost: the stage then fits the model's function, not 1,024 points of it.

The views are the ones CIFAR and ImageNet classifiers are trained with, kept generic (no dataset constants):
a horizontal flip with probability 1/2 and a shift of up to 1/8 of the side each way, the image's edge
pixels repeated into the border it opens. They assume natural images: a model whose inputs change meaning
when mirrored (text, digits) should keep views=1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError


def shifted_flips(x: torch.Tensor, views: int, seed: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, C, H, W] followed by views - 1 augmented copies of it (seeded: the same seed, the same copies).

    fill: None repeats the image's edge into the border (the engine's choice: no dataset constant); a value per
    channel [C] fills the border with it instead (e.g. black in the normalised space, as the convergence
    benchmark's data-level views of stops 39-40 did)."""
    if x.dim() != 4:
        raise UsageError(f"augmented views (Stage.views={views}) shift and flip images [N, C, H, W]; the inputs "
                         f"have shape {tuple(x.shape)}: use views=1")
    if views == 1:
        return x
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 8))
    if fill is None:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    else:
        padded = fill.to(x.dtype).view(1, -1, 1, 1).expand(n, x.shape[1], h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad:pad + h, pad:pad + w] = x
    out = [x]
    for _ in range(views - 1):
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
        flip = torch.rand(n, generator=g) < 0.5
        v = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        v[flip] = v[flip].flip(-1)
        out.append(v)
    return torch.cat(out)
