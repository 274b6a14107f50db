"""Models: the CIFAR-10 ResNets, a small Fashion-MNIST ResNet, and a zoo that loads models by name."""

from .cifar_resnet import CifarResNet, cifar_resnet
from ..errors import ModelError
from .small_resnet import SmallResNet
from .zoo import ModelInfo, load_model

__all__ = ["load_model", "ModelInfo", "ModelError", "cifar_resnet", "CifarResNet", "SmallResNet"]
