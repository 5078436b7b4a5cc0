"""Which Lightning strategies the callbacks can see the layers under."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Refuses Lightning's ``FSDPStrategy`` (FSDP1), at setup, before any training.

    FSDP1 flattens the parameters of each wrapped module into one buffer and shards
    that, so a layer's weights are neither a parameter of their module nor split along
    a dimension the callbacks could sum over. FSDP2 (``ModelParallelStrategy`` with
    ``fully_shard``) keeps every layer a parameter, sharded as a DTensor: supported.
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{owner} does not support `FSDPStrategy` (FSDP1): it flattens the parameters of each wrapped module "
            "into one sharded buffer, so no layer's weights can be seen as a layer. Shard the model with FSDP2 "
            "instead: `strategy=ModelParallelStrategy()` and `fully_shard(layer, mesh=self.device_mesh['data_parallel'])` "
            "in your LightningModule's `configure_model`, which sq_lightning supports."
        )
