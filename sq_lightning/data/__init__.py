"""Data modules: CIFAR-10 (offline archive or torchvision download), 8x8 digits, Tiny Shakespeare."""

from sq_lightning.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from sq_lightning.data.digits import DigitsDataModule
from sq_lightning.data.shakespeare import ShakespeareDataModule
from sq_lightning.data.tensor_loader import ShardedBatchSampler, TensorBatchLoader

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DigitsDataModule",
    "ShakespeareDataModule",
    "ShardedBatchSampler",
    "TensorBatchLoader",
]
