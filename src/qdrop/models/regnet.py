"""RegNetX-600MF, the QDrop/BRECQ papers' RegNet, built with torchvision's RegNet class.

torchvision ships RegNetX-400MF and -800MF but not -600MF; the design parameters below
are RegNetX-600MF's from "Designing Network Design Spaces" (Radosavovic et al. 2020).
"""
from __future__ import annotations

from torch import nn


def regnet_x_600mf(num_classes: int = 1000) -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    return RegNet(params, num_classes=num_classes)
