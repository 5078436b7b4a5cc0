"""Image classification LightningModule for the pipeline's stages.

One module trains every stage (full-precision pretraining, soft-quantization
fine-tuning, refinement): the stages differ by callbacks and by ``init_from``, the
checkpoint of the previous stage. Training recipe of He et al. 2016
(arXiv:1512.03385): SGD with momentum and weight decay, learning rate stepped or
cosine-annealed (Loshchilov & Hutter 2017, arXiv:1608.03983) per epoch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from sq_lightning.models._checkpoint import check_state_match, read_network_state
from sq_lightning.models.resnet_cifar import MLP, CifarResNet

log = logging.getLogger(__name__)

__all__ = ["ImageClassifier", "build_model", "lr_factor", "ARCHS"]

_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}
ARCHS = (*_RESNET_DEPTHS, "mlp")
_SCHEDULES = ("cosine", "step", "constant")
_ARCH_ARGS = ("arch", "num_classes", "in_channels", "mlp_hidden", "in_features", "shortcut")


def build_model(
    arch: str,
    num_classes: int = 10,
    in_channels: int = 3,
    mlp_hidden: Sequence[int] = (128, 64),
    in_features: int = 64,
    shortcut: Literal["A", "B"] = "A",
) -> nn.Module:
    """Builds the bare network named ``arch`` (one of :data:`ARCHS`)."""
    if arch in _RESNET_DEPTHS:
        return CifarResNet(_RESNET_DEPTHS[arch], num_classes, in_channels, shortcut)
    if arch == "mlp":
        return MLP(in_features, list(mlp_hidden), num_classes)
    raise ValueError(f"`arch` must be one of {list(ARCHS)}, got {arch!r}.")


def lr_factor(
    epoch: int,
    schedule: str,
    max_epochs: int,
    warmup_epochs: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    restarts: Sequence[int] = (),
) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based).

    Warm-up: ``(epoch + 1) / warmup_epochs`` for the first ``warmup_epochs`` epochs.
    Then, with ``t = epoch - warmup_epochs`` and ``T = max_epochs - warmup_epochs``:

    - ``cosine``: ``0.5 * (1 + cos(pi * t / T))``, from 1 down towards 0; with
      ``restarts`` (increasing epochs) the cosine starts again from 1 at each of them,
      ``t`` and ``T`` then measured within the cycle that holds ``epoch``;
    - ``step``: ``gamma ** k``, ``k`` the number of milestones ``m`` with
      ``epoch >= round(m * max_epochs)`` (milestones are fractions of the run);
    - ``constant``: 1.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(epoch >= round(m * max_epochs) for m in milestones)
    if schedule == "cosine":
        start, end = warmup_epochs, max_epochs
        for r in restarts:
            if r <= epoch:
                start = r
            else:
                end = r
                break
        span = max(end - start, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch - start, span) / span))
    raise ValueError(f"`schedule` must be one of {list(_SCHEDULES)}, got {schedule!r}.")


class ImageClassifier(LightningModule):
    """Classifier (CIFAR ResNet or MLP) trained with SGD and a per-epoch schedule.

    Logs ``train/loss`` (per step), ``train/acc``, ``val/loss``, ``val/acc``,
    ``test/loss``, ``test/acc`` (per epoch; accuracy is top-1 over all samples).
    ``predict`` returns class probabilities.

    Args:
        arch: network: ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56`` (CIFAR
            ResNets, He et al. 2016) or ``mlp``.
        num_classes: number of classes.
        in_channels: input image channels (ResNets).
        mlp_hidden: hidden layer widths (``mlp``).
        in_features: size of one flattened input (``mlp``; 64 for 8x8 digits).
        shortcut: ResNet shortcut where the shape changes: ``A`` zero-padding
            identity (the paper's CIFAR choice), ``B`` 1x1 convolution projection.
        lr: base learning rate of SGD.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty coefficient applied by SGD to every parameter.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        schedule: learning-rate schedule per epoch: ``cosine`` (to 0 at
            ``trainer.max_epochs``), ``step`` (times ``gamma`` at each milestone) or
            ``constant``.
        milestones: for ``step``, increasing fractions of ``trainer.max_epochs`` in
            (0, 1) where the learning rate is multiplied by ``gamma``.
        gamma: step decay factor, in (0, 1].
        warmup_epochs: epochs of linear warm-up from ``lr / warmup_epochs`` to ``lr``.
        restarts: for ``cosine``, epochs at which the cosine starts again from ``lr``
            (warm restarts), each cycle annealed to 0 at the next one. With
            ``ClusterRefine(snap_epoch=E)``, ``restarts=[E]`` refines at a full learning
            rate instead of the tail of one long cosine.
        init_from: Lightning checkpoint (``.ckpt``) of a previous stage, or a plain
            ``state_dict`` file, whose weights are loaded when the module is built.
            The architecture must match exactly (strict loading). Optimizer and
            schedule start fresh; to resume an interrupted run use ``ckpt_path``.
        distill_from: checkpoint of a teacher network (a Lightning ``.ckpt`` of an
            ``ImageClassifier``, whose saved architecture arguments are used, or a plain
            ``state_dict`` of this architecture). Training then minimises
            ``(1 - distill_weight) * CE + distill_weight * T^2 * KL(teacher_T || student_T)``
            over softened class probabilities (knowledge distillation, Hinton et al. 2015,
            arXiv:1503.02531). When quantizing, the usual teacher is the full-precision
            model the run starts from, and the defaults (weight 1, T 1: match the
            teacher's class distribution, no labels) are the distributional loss used
            for low-bit training by Liu et al. 2020 (ReActNet, arXiv:2003.03488). The
            teacher is frozen, kept in eval mode and outside the module's parameters,
            ``state_dict`` and the quantization callbacks; it is read when fitting
            starts, so loading a trained checkpoint does not need it. On ResNet-20 /
            CIFAR-10 it did not improve the quantized runs of
            ``experiments/results/cifar10_tradeoff.md`` (see docs/results.md).
        distill_weight: weight of the distillation term, in [0, 1] (1: soft targets only;
            Hinton et al. mix in the labels, e.g. 0.5 with ``distill_temperature`` 4).
        distill_temperature: softmax temperature ``T`` of the distillation term, > 0.

    Raises:
        ValueError: an argument is out of range.
        FileNotFoundError: ``init_from`` does not exist.
        RuntimeError: ``init_from`` cannot be read or holds another architecture.

    Example::

        >>> model = ImageClassifier(arch="mlp", in_features=64, lr=0.05)
        >>> stage2 = ImageClassifier(arch="resnet20", init_from="runs/.../best.ckpt")
    """

    def __init__(
        self,
        arch: str = "resnet20",
        num_classes: int = 10,
        in_channels: int = 3,
        mlp_hidden: list[int] = [128, 64],  # noqa: B006 - never mutated; LightningCLI shows it as the default
        in_features: int = 64,
        shortcut: Literal["A", "B"] = "A",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: list[float] = [0.5, 0.75],  # noqa: B006 - never mutated
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        restarts: list[int] = [],  # noqa: B006 - never mutated
        init_from: Optional[str] = None,
        distill_from: Optional[str] = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self._check_args(arch, num_classes, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma,
                         warmup_epochs, restarts)
        if not 0 <= distill_weight <= 1:
            raise ValueError(f"`distill_weight` must be in [0, 1], got {distill_weight}.")
        if not distill_temperature > 0:
            raise ValueError(f"`distill_temperature` must be > 0, got {distill_temperature}.")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, in_channels, mlp_hidden, in_features, shortcut)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # The teacher lives outside nn.Module's registry (object.__setattr__): not a parameter,
        # not in state_dict, not seen by the optimizer or by the callbacks that quantize.
        object.__setattr__(self, "_teacher", None)
        if init_from is not None:
            # At construction rather than in `setup`: callbacks run their `setup` before
            # the module's, and a quantization callback must see the loaded weights.
            self.load_init_weights(init_from)

    @staticmethod
    def _check_args(arch, num_classes, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma,
                    warmup_epochs, restarts=()) -> None:
        if arch not in ARCHS:
            raise ValueError(f"`arch` must be one of {list(ARCHS)}, got {arch!r}.")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if nesterov and momentum == 0:
            raise ValueError("`nesterov=True` needs `momentum` > 0, got 0. Set a momentum or `nesterov: false`.")
        if schedule not in _SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(_SCHEDULES)}, got {schedule!r}.")
        ms = list(milestones)
        if any(not 0 < m < 1 for m in ms) or any(a >= b for a, b in zip(ms, ms[1:], strict=False)):
            raise ValueError(
                f"`milestones` must be increasing fractions of `trainer.max_epochs` in (0, 1), got {ms}. "
                "For decays at epochs 15 and 24 of 30 write `[0.5, 0.8]`."
            )
        if not 0 < gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {gamma}.")
        if warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs}.")
        rs = list(restarts)
        if rs and schedule != "cosine":
            raise ValueError(f"`restarts` applies to `schedule='cosine'` only, got schedule={schedule!r} with restarts={rs}.")
        if any(int(r) != r or r <= warmup_epochs for r in rs) or any(a >= b for a, b in zip(rs, rs[1:], strict=False)):
            raise ValueError(
                f"`restarts` must be increasing whole epochs after the warm-up (> warmup_epochs={warmup_epochs}), got {rs}."
            )

    def load_init_weights(self, path: str) -> None:
        """Loads the network weights of checkpoint ``path`` into ``self.model``, strictly.

        Accepts a Lightning checkpoint (weights under ``state_dict`` with a ``model.``
        prefix) or a plain ``state_dict`` of the bare network. Everything is checked
        before anything is copied, so on failure the model is left untouched.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            RuntimeError: the file cannot be read, or its keys/shapes differ from the model's.
        """
        state, saved = read_network_state(path, "init_from")
        check_state_match(path, "init_from", self.model, state, saved, dict(self.hparams), _ARCH_ARGS)
        self.model.load_state_dict(state, strict=True)
        rank_zero_info(f"Loaded {len(state)} tensors of {type(self.model).__name__} from {path}.")

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen distillation teacher once fitting has started (``None`` without ``distill_from``)."""
        return self._teacher

    def load_teacher(self) -> nn.Module:
        """Builds the teacher of ``distill_from`` (its own saved architecture when the file is a
        Lightning checkpoint of an ``ImageClassifier``, else this module's), loads it strictly,
        freezes it and keeps it in eval mode. Called when fitting starts.

        Raises:
            FileNotFoundError: ``distill_from`` does not exist.
            RuntimeError: the file cannot be read or does not fit the architecture.
        """
        path = self.hparams.distill_from
        state, saved = read_network_state(path, "distill_from")
        arch = {k: saved.get(k, self.hparams[k]) for k in _ARCH_ARGS}
        if arch["num_classes"] != self.hparams.num_classes:
            raise RuntimeError(
                f"`distill_from` teacher {path!r} predicts {arch['num_classes']} classes, this model "
                f"{self.hparams.num_classes}. Distil from a teacher trained on the same classes."
            )
        teacher = build_model(**arch)
        check_state_match(path, "distill_from", teacher, state, {}, arch, _ARCH_ARGS)
        teacher.load_state_dict(state, strict=True)
        teacher.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher)
        rank_zero_info(f"Distilling from {type(teacher).__name__} ({arch['arch']}) of {path}.")
        return teacher

    def _active_teacher(self, device: torch.device) -> Optional[nn.Module]:
        """The teacher on ``device`` in eval mode, read on first use (``None`` without ``distill_from``)."""
        if self.hparams.get("distill_from") is None:
            return None
        if self._teacher is None:
            self.load_teacher()
        # Moved only when the student's device changed: `Module.to` walks every tensor
        # (about 1 ms for ResNet-20), too much for every step on a GPU. The teacher is in
        # eval mode since `load_teacher` and, outside the registry, no `train()` reaches it.
        if next(self._teacher.parameters(), torch.empty(0, device=device)).device != device:
            self._teacher.to(device)
        return self._teacher

    @override
    def on_fit_start(self) -> None:
        self._active_teacher(self.device)  # a missing or wrong teacher fails before the first step

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # This checkpoint holds the weights itself: rebuilding it (load_from_checkpoint)
        # must not re-read the previous stage's file, which may be gone by then. The
        # provenance is kept under its own key.
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict) and hparams.get("init_from") is not None:
            checkpoint["sq_lightning_init_from"] = hparams["init_from"]
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, "init_from": None}

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def distillation_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(softmax(teacher(x)/T) || softmax(logits/T))``, averaged over the batch."""
        t = self.hparams.distill_temperature
        with torch.no_grad():
            target = F.log_softmax(self._active_teacher(x.device)(x).float() / t, dim=-1)
        return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), target, reduction="batchmean", log_target=True) * t * t

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        if on_step and self.hparams.get("distill_from") is not None:
            kd = self.distillation_loss(logits, x)
            self.log("train/distill_loss", kd, on_step=True, on_epoch=False, batch_size=len(y))
            self.log("train/ce_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(y))
            a = self.hparams.distill_weight
            loss = (1 - a) * loss + a * kd
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(y), sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if hp.schedule == "constant" and hp.warmup_epochs == 0:
            return optimizer
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"`schedule={hp.schedule!r}` (and warm-up) is computed per epoch from `trainer.max_epochs`, "
                f"got max_epochs={max_epochs}. Set `trainer.max_epochs`, or use `schedule: constant`."
            )
        if hp.warmup_epochs >= max_epochs and hp.schedule != "constant":
            raise ValueError(
                f"`warmup_epochs` ({hp.warmup_epochs}) must be < `trainer.max_epochs` ({max_epochs}) "
                f"for `schedule={hp.schedule!r}`."
            )
        if hp.get("restarts") and max(hp.restarts) >= max_epochs:
            raise ValueError(
                f"`restarts` must be < `trainer.max_epochs` ({max_epochs}), got {list(hp.restarts)}: "
                "a restart at or after the last epoch never happens."
            )
        factor = functools.partial(
            lr_factor,
            restarts=tuple(hp.get("restarts") or ()),
            schedule=hp.schedule,
            max_epochs=max_epochs,
            warmup_epochs=hp.warmup_epochs,
            milestones=tuple(hp.milestones),
            gamma=hp.gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
