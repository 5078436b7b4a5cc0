"""Batch-norm statistics recalibration.

After weights change outside of gradient descent (snapping weights to cluster
centres, pruning, averaging) the running mean/variance stored in batch-norm layers
no longer describe the activations they see, and accuracy drops for that reason
alone. Re-estimating them on training data (as ``torch.optim.swa_utils.update_bn``
does for SWA, Izmailov et al. 2018, arXiv:1803.05407) removes that part of the drop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

__all__ = ["recalibrate_batchnorm"]


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"`loader` must yield tensors or (x, y) tuples whose first item is a tensor, got {type(batch).__name__}."
        )
    return batch


def _to_device(batch: Any, device: Union[str, torch.device]) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int = 100,
    device: Optional[Union[str, torch.device]] = None,
    forward: Optional[Callable[[Any], Any]] = None,
) -> nn.Module:
    """Re-estimates the running statistics of every batch-norm layer of ``model``.

    The running statistics are reset and, during one pass over up to ``num_batches``
    batches in train mode, accumulated as a cumulative (equal weight per batch)
    average: ``momentum=None`` in PyTorch's batch norm. Each layer's momentum and every
    module's train/eval mode are restored afterwards; no parameter changes.

    Args:
        model: any module; layers derived from ``_BatchNorm`` with
            ``track_running_stats=True`` are recalibrated.
        loader: iterable of batches, each a tensor or an ``(x, y, ...)`` tuple
            whose first item is the model input.
        num_batches: the pass stops after this many batches (> 0).
        device: where to run the pass; defaults to the device of the model's first
            parameter (or buffer), else CPU. The model is not moved.
        forward: called with each whole batch (tensors moved to ``device``) instead of
            ``model(x)``: for a model whose forward pass is reached another way (a
            LightningModule without ``forward``, through its ``training_step``).

    Returns:
        ``model``, recalibrated in place.

    Raises:
        ValueError: ``num_batches`` < 1, or ``loader`` yields no batch (the old
            statistics are then put back).
        TypeError: a batch holds no tensor input.

    Example::

        >>> snap_weights(model)                         # any out-of-band weight change
        >>> recalibrate_batchnorm(model, datamodule.train_dataloader(), num_batches=50)
    """
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"`num_batches` must be an int >= 1, got {num_batches!r}.")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        if rank_zero_only.rank == 0:  # called on every rank alike
            log.warning("recalibrate_batchnorm: %s has no batch-norm layer; nothing to do.", type(model).__name__)
        return model
    if device is None:
        tensor = next(model.parameters(), None)
        if tensor is None:
            tensor = next(model.buffers(), None)
        device = tensor.device if tensor is not None else torch.device("cpu")

    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.momentum, {k: v.clone() for k, v in bn.state_dict().items()}) for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    seen = 0
    try:
        model.train()
        for batch in loader:
            if seen >= num_batches:
                break
            if forward is None:
                model(_inputs_of(batch).to(device, non_blocking=True))
            else:
                forward(_to_device(batch, device))
            seen += 1
    except BaseException:
        # A failed pass must not leave reset (meaningless) statistics behind.
        for bn, (_, state) in saved.items():
            bn.load_state_dict(state)
        raise
    finally:
        for bn, (momentum, _) in saved.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if seen == 0:
        for bn, (_, state) in saved.items():
            bn.load_state_dict(state)
        raise ValueError("`loader` yielded no batch; the batch-norm statistics were left as they were.")
    if rank_zero_only.rank == 0:
        log.info("Recalibrated %d batch-norm layers on %d batches.", len(bns), seen)
    return model
