"""Networks and the classification LightningModule."""

from sq_lightning.models.batchnorm import recalibrate_batchnorm
from sq_lightning.models.classifier import ARCHS, ImageClassifier, build_model, lr_factor
from sq_lightning.models.resnet_cifar import MLP, CifarResNet, resnet20, resnet32, resnet44, resnet56

__all__ = [
    "ARCHS",
    "MLP",
    "CifarResNet",
    "ImageClassifier",
    "build_model",
    "lr_factor",
    "recalibrate_batchnorm",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]
