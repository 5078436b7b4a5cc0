"""Metric and histogram logging shared by the callbacks.

``LightningModule.log`` is not allowed in every hook (``on_train_end`` for one), so
the callbacks write their ``sq/*`` scalars straight to the trainer's loggers (which
are rank-zero only) and mirror them into ``trainer.callback_metrics`` so that
``ModelCheckpoint``/``EarlyStopping`` and tests can read them.
"""

from __future__ import annotations

import weakref

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from sq_lightning.sharding import is_sharded


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    for k, v in metrics.items():
        trainer.callback_metrics[k] = torch.tensor(float(v))


# (tag, step) pairs already written, per Trainer: several callbacks may log the same
# weights under the same tag in one step (SoftQuantCallback and ClusterRefine both log
# ``sq/weights``); the first writes, the others skip.
_WRITTEN: "weakref.WeakKeyDictionary[pl.Trainer, set[tuple[str, int]]]" = weakref.WeakKeyDictionary()


def log_histograms(trainer: pl.Trainer, tensors: dict[str, Tensor], prefix: str) -> None:
    """Weight histograms per layer under ``<prefix>/<layer>`` (TensorBoard loggers only),
    once per tag and step whoever asks.

    Called on every rank: a layer sharded across ranks (FSDP2) is gathered by all of
    them (collective) before rank 0 writes it.
    """
    boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not boards:
        return
    written = _WRITTEN.setdefault(trainer, set())
    for name, t in tensors.items():  # one whole layer at a time
        key = (f"{prefix}/{name}", trainer.global_step)
        if key in written:
            continue
        written.add(key)
        t = t.detach().full_tensor() if is_sharded(t) else t.detach()
        if trainer.is_global_zero:
            for logger in boards:
                logger.experiment.add_histogram(f"{prefix}/{name}", t.float().cpu(), trainer.global_step, bins="auto")
    if trainer.is_global_zero:
        for logger in boards:
            logger.experiment.flush()
