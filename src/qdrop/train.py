"""A small, plain training loop (for the demo's Fashion-MNIST model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 4, batch_size: int = 256,
                     lr: float = 5e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """AdamW with a one-cycle schedule and random horizontal flips; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="train", disable=not progress, unit="step")
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
