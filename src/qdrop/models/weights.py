"""Reading state_dict files into models, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ModelError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, unwrapping {"state_dict": ...} and DataParallel's "module." prefix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"cannot read weights file {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `path` into `model` strictly (every key must match), returning the model."""
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise ModelError(f"weights file {path} does not fit {type(model).__name__}: {err}") from err
    return model
