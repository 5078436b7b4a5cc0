"""Networks and the LightningModules: image classification and character language modelling."""

from sq_lightning.models.batchnorm import recalibrate_batchnorm
from sq_lightning.models.gpt import CharGPT
from sq_lightning.models.language_model import CharLanguageModel
from sq_lightning.models.classifier import ARCHS, ImageClassifier, build_model, lr_factor
from sq_lightning.models.resnet_cifar import MLP, CifarResNet, resnet20, resnet32, resnet44, resnet56

__all__ = [
    "ARCHS",
    "MLP",
    "CharGPT",
    "CharLanguageModel",
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
