"""scikit-learn's 8x8 handwritten digits (UCI "Optical Recognition of Handwritten
Digits", Alpaydin & Kaynak 1998): 1,797 images, 10 classes, shipped inside the
scikit-learn wheel, so it works offline. Small enough for tests and notebooks.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import TensorDataset
from typing_extensions import override

from sq_lightning.data.tensor_loader import ShardedBatchSampler, TensorBatchLoader, rank_and_world

log = logging.getLogger(__name__)

__all__ = ["DigitsDataModule"]


class DigitsDataModule(LightningDataModule):
    """The 8x8 digits, split into train/validation, standardised per pixel.

    The split is stratified by class and fixed by ``seed``. Mean and standard
    deviation of each pixel come from the training part only (pixels that are
    constant there keep a standard deviation of 1). There is no separate test split:
    ``test_dataloader`` and ``predict_dataloader`` serve the validation part.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the 1,797 images held out for validation, in (0, 1).
        seed: seed of the split and of the training order. The order of each epoch is
            drawn from ``(seed, epoch)`` alone (and each DDP rank takes its own shard of
            it), so a run resumed from a checkpoint sees the batches the uninterrupted run
            saw.
        flatten: ``True`` yields 64-dimensional vectors (for an MLP), ``False``
            ``1 x 8 x 8`` images (for a CNN).

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))   # x: (32, 64) float32, y: (32,) int64
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.flatten = flatten
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (64,) if self.flatten else (1, 8, 8)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y
        )
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        # Border pixels are always 0 in the training part: dividing by 0 would blow them up.
        std[std == 0] = 1.0

        def to_set(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
            t = torch.as_tensor((features - mean) / std, dtype=torch.float32)
            return TensorDataset(t.reshape(-1, *self.input_shape), torch.as_tensor(labels, dtype=torch.int64))

        self.train_set = to_set(x_train, y_train)
        self.val_set = to_set(x_val, y_val)
        log.info("Digits: %d train / %d validation images.", len(self.train_set), len(self.val_set))

    def _loader(self, train: bool) -> TensorBatchLoader:
        if self.train_set is None:
            self.setup()
        x, y = (self.train_set if train else self.val_set).tensors
        rank, world = rank_and_world(self.trainer)
        sampler = ShardedBatchSampler(len(x), self.batch_size, shuffle=train, seed=self.seed, rank=rank,
                                      world_size=world)
        return TensorBatchLoader(x, y, sampler)

    @override
    def train_dataloader(self) -> TensorBatchLoader:
        return self._loader(train=True)

    @override
    def val_dataloader(self) -> TensorBatchLoader:
        return self._loader(train=False)

    @override
    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader(train=False)

    @override
    def predict_dataloader(self) -> TensorBatchLoader:
        return self._loader(train=False)
