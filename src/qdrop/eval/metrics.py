"""Evaluation metrics."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device="cpu",
         progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * count_correct(model, x, y, batch_size, device, progress, desc) / len(y)


@torch.no_grad()
def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device="cpu",
                  progress: bool = False, desc: str = "eval") -> int:
    """How many samples the model's top-1 class gets right."""
    model.eval().to(device)
    correct = 0
    for i in tqdm(range(0, len(y), batch_size), disable=not progress, desc=desc, leave=False):
        logits = model(x[i : i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    return correct
