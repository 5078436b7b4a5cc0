"""Character-level language modelling LightningModule (one module for every stage).

AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with weight decay on the matrices only
(not on LayerNorm gains or biases), a linear warm-up and a cosine decay to ``min_lr_ratio``
of the learning rate over the whole fit, stepped per optimizer step. Logs ``train/loss``,
``val/loss`` (mean cross-entropy in nats per character) and ``val/bpc`` (bits per
character, ``val/loss / ln 2``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from sq_lightning.models._checkpoint import check_state_match, read_network_state
from sq_lightning.models.gpt import CharGPT

__all__ = ["CharLanguageModel", "cosine_warmup_factor"]

_ARCH_ARGS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")


def cosine_warmup_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based): ``(step + 1) / warmup``
    during the warm-up, then a cosine from 1 down to ``min_ratio`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, max(total - warmup, 1)) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class CharLanguageModel(LightningModule):
    """A :class:`~sq_lightning.models.gpt.CharGPT` trained to predict the next character.

    Args:
        vocab_size: tokens of the data's vocabulary (65 for Tiny Shakespeare).
        block_size: longest context in tokens; the data's ``block_size`` must not exceed it.
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: width of the residual stream.
        dropout: dropout probability (0 for the short runs of this project).
        bias: biases in the Linear layers.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay on the 2-D weights (matrices and embeddings).
        betas: AdamW ``(beta1, beta2)``.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr_ratio: the cosine ends at ``min_lr_ratio * lr`` after the last step of the fit.
        schedule: ``"cosine"`` (warm-up then cosine) or ``"constant"`` (warm-up then ``lr``,
            for fine-tuning stages whose coupling strength should not fade with the lr).
        init_from: checkpoint whose network weights are loaded before training (a previous
            stage), or ``None``.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
        init_from: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if n_embd % n_head:
            raise ValueError(f"`n_embd` ({n_embd}) must be a multiple of `n_head` ({n_head}).")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps!r}.")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}.")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"`schedule` must be 'cosine' or 'constant', got {schedule!r}.")
        self.save_hyperparameters()
        self.model = CharGPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
        if init_from is not None:
            self.load_init_weights(init_from)

    def load_init_weights(self, path: str) -> None:
        """Loads the network weights of checkpoint ``path`` into ``self.model``, strictly; the
        model is untouched when anything does not match.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            RuntimeError: the file cannot be read, or its keys or shapes differ from the model's.
        """
        state, saved = read_network_state(path, "init_from")
        check_state_match(path, "init_from", self.model, state, saved, dict(self.hparams), _ARCH_ARGS)
        self.model.load_state_dict(state, strict=True)
        rank_zero_info(f"Loaded {len(state)} tensors of CharGPT from {path}.")

    @override
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        loss = self._loss(batch)
        n = batch[1].numel()
        # Weighted by characters, so the epoch value is the mean over every predicted character.
        self.log(f"{stage}/loss", loss, batch_size=n, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/bpc", loss / math.log(2), batch_size=n, sync_dist=True)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        min_ratio = hp.min_lr_ratio if hp.schedule == "cosine" else 1.0

        def factor(step: int) -> float:
            return cosine_warmup_factor(step, total, hp.warmup_steps, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
