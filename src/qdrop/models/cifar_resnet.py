"""CIFAR-10 ResNet-20/32/44/56/110 with option-A shortcuts, compatible with Yerlan Idelbayev's
pytorch_resnet_cifar10 checkpoints (same module names, so the state_dicts load strictly)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.download import download
from ..data.paths import cache_dir, data_root
from ..errors import ModelError
from .weights import load_weights

DEPTHS = (20, 32, 44, 56, 110)
# Official checkpoints: resnet{depth}-{hash}.th in the project's pretrained_models folder.
WEIGHT_HASHES = {20: "12fca82f", 32: "d509ac18", 44: "014dd654", 56: "4bfd9763", 110: "1d1ed7c2"}
WEIGHTS_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{name}"


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (planes // 4 on each side).

    The original wraps a lambda in a LambdaLayer; a named module does the same and, unlike a
    lambda, can be pickled. It has no parameters, so checkpoint keys are unchanged.
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # The original F.avg_pool2d(out, out.size()[3]) pools the whole 8x8 map, which is exactly
        # adaptive_avg_pool2d(out, 1); the adaptive form keeps no shape-dependent Python int, so
        # torch.fx traces it as one op.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def cifar_resnet(depth: int, weights: str | Path | None = None) -> CifarResNet:
    """ResNet-`depth` for CIFAR-10 (depth = 6n + 2), in eval mode; random init unless `weights` is given.

    `weights` is an official checkpoint ({"state_dict": {"module.<key>": tensor}}) or a plain state_dict.
    """
    if depth not in DEPTHS:
        raise ModelError(f"CIFAR ResNet depth must be one of {DEPTHS}, got {depth}")
    n = (depth - 2) // 6
    model = CifarResNet((n, n, n))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def find_cifar_resnet_weights(depth: int, data: str | Path | None = None) -> Path:
    """The pretrained checkpoint for ResNet-`depth`: in the data folder, the cache, or downloaded."""
    if depth not in WEIGHT_HASHES:
        raise ModelError(f"no pretrained CIFAR ResNet-{depth}; depths with weights: {tuple(WEIGHT_HASHES)}")
    root = data_root(data)
    cache = cache_dir() / "models"
    # `data` may be the data root or its cifar10/ folder.
    folders = [root / "cifar10", root, cache]
    for folder in folders:
        found = sorted(folder.glob(f"resnet{depth}-*.th"))
        if found:
            return found[0]
    name = f"resnet{depth}-{WEIGHT_HASHES[depth]}.th"
    url = WEIGHTS_URL.format(name=name)
    try:
        return download(url, cache / name)
    except OSError as err:
        searched = ", ".join(str(f) for f in folders)
        raise ModelError(
            f"pretrained weights resnet{depth}-*.th not found in {searched}, and downloading {url} failed ({err}); "
            f"put the file in one of those folders or pass weights=PATH"
        ) from err
