"""Checks every callback runs in ``setup``, before any training: the strategy, the layer
selection, and its epoch window against the Trainer's ``max_epochs``."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from sq_lightning.callbacks._strategy import check_strategy
from sq_lightning.layers import LayerSelector


def check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str,
                selector: LayerSelector) -> list[tuple[str, nn.Parameter]]:
    """The strategy is supported and the selection is valid and not empty; returns the selection."""
    check_strategy(trainer, owner)
    return selector.select_or_raise(pl_module, owner)


def check_window(trainer: pl.Trainer, owner: str, start_epoch: int, stop_epoch: Optional[int],
                 what: str = "the window") -> None:
    """``start_epoch`` must lie inside the fit; a ``stop_epoch`` past its end is cut (warned)."""
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return
    if start_epoch >= max_epochs:
        raise ValueError(
            f"{owner}: `start_epoch`={start_epoch} but the Trainer stops after `max_epochs`={max_epochs} "
            f"epochs (0 to {max_epochs - 1}): {what} would never run. Lower `start_epoch` or raise `max_epochs`."
        )
    if stop_epoch is not None and stop_epoch > max_epochs:
        rank_zero_warn(
            f"{owner}: `stop_epoch`={stop_epoch} is past the last epoch ({max_epochs - 1} with `max_epochs`="
            f"{max_epochs}): {what} runs to the end of fit."
        )


def has_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines ``forward`` (``nn.Module``'s, and ``LightningModule``'s
    which calls it, only raise)."""
    return type(module).forward not in (nn.Module.forward, pl.LightningModule.forward)
