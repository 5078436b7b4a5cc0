"""``ClusterRefine``: snap weights to their clusters, refine with tied weights, log bits.

Second half of soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219):
after coupling, each layer's clusters are snapped to their means, BatchNorm
statistics are re-estimated, and training continues with every cluster's members
tied to one shared value. The bit-width of layer ``l`` is ``log2 K_l``.
The work is done by :class:`sq_lightning.snapper.ClusterSnapper`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sq_lightning.callbacks._logging import log_histograms, log_scalars
from sq_lightning.callbacks._checks import check_setup, has_forward
from sq_lightning._validate import check_choice, check_int, check_number
from sq_lightning.config import ExportConfig, RefineConfig, SnapConfig, check_group, reject_moved
from sq_lightning.export import save_compressed, save_state_compressed
from sq_lightning.handoff import ClusterSource, SnapHint, find_source
from sq_lightning.layers import LayerSelector
from sq_lightning.ops.clustering import Clusters
from sq_lightning.sharding import is_sharded
from sq_lightning.snapper import ClusterSnapper

log = logging.getLogger(__name__)

DEFAULT_W = 0.3  # w of a snap without a coupling in the Trainer (SoftQuantCallback's default)


def _training_step_forward(pl_module: pl.LightningModule):
    """Runs ``pl_module.training_step`` on a batch with ``log``/``log_dict`` silenced: the
    forward pass of a module that defines no ``forward``."""

    def forward(batch: Any) -> None:
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # instance attributes shadow the methods
        try:
            pl_module.training_step(batch, 0)
        finally:
            del pl_module.log, pl_module.log_dict

    return forward


class ClusterRefine(Callback):
    """Snaps the selected layers to their clusters, then keeps them tied while training on.

    At the start of epoch ``snap_epoch`` (by default where the training stage of the same
    ``Trainer`` stops, see below) each layer's weights are sorted and split where
    neighbours are more than ``gap · w_l`` apart (``w_l = w · σ_l``, from the coupling of
    the same ``Trainer`` when there is one), small clusters are merged as ``snap.merge`` says, and
    every weight is set to its cluster's value. BatchNorm running statistics are then
    re-estimated on ``snap.recalibrate_bn_batches`` training batches (snapping makes them
    stale: 7-8 accuracy points on ResNet-20, docs/design.md section 8). For the remaining
    epochs, after every optimizer step each weight is set back to the mean of its
    cluster (assignments fixed), so the model ends with exactly ``K_l`` distinct
    values per layer.

    Logged (TensorBoard): ``sq/bits/<layer>``, ``sq/clusters/<layer>``,
    ``sq/snap_error/<layer>``, ``sq/entropy/<layer>``, ``sq/bits_weighted``,
    ``sq/bits_mean``, ``sq/compression_ratio``, ``sq/entropy_weighted`` (Shannon
    entropy of the cluster populations: bits per weight with an entropy coder) at the
    snap and at every epoch end afterwards; weight histograms ``sq/weights/<layer>``
    every ``histogram_every_n_epochs`` epochs and ``sq/weights_pre_snap/<layer>``,
    ``sq/weights_snapped/<layer>`` around the snap.
    A per-layer table is printed after the snap and at the end. With ``export``
    the refined model is written at the end of fit by
    :func:`~sq_lightning.export.save_compressed` (global rank 0 only) and its size is
    logged as ``sq/export_bytes`` (by rank 0).

    The hand-off (:mod:`sq_lightning.handoff`): the training stage of the same ``Trainer``
    (a :class:`SoftQuantCallback`, a :class:`LearnedCodebook` or any callback that is a
    :class:`~sq_lightning.handoff.ClusterSource`) tells the snap where its window ends and,
    at the snap, its per-layer ``w_l`` or learned centroids. Nothing is given twice:
    ``SoftQuantCallback(stop_epoch=4)`` and ``ClusterRefine()`` snap at epoch 4 with the
    coupling's ``w_l``. Without a training stage (a refinement stage started from a saved
    checkpoint) the snap works from the weights alone.

    Args:
        snap_epoch: epoch at whose start the snap happens. ``"auto"`` (default): the
            training stage's ``stop_epoch``; at the end of fit when it has none (or it is
            past ``max_epochs``); ``0`` (at fit start) without a training stage. ``None``
            snaps at the end of fit, with no refinement.
        w: range of the well relative to the layer std, for a snap without a coupling in
            the same ``Trainer`` (``None``: 0.3, ``SoftQuantCallback``'s default). Given
            next to a coupling with another ``w``, setup fails (the snap uses the
            coupling's ``w_l``).
        snap: how clusters are found and placed, the bit budgets and the BatchNorm
            re-estimation after the snap (:class:`~sq_lightning.config.SnapConfig`; its
            ``recalibrate_bn_batches`` training batches re-estimate the statistics, 0: none).
            A layer whose snap error exceeds ``snap.max_snap_error`` is handled as
            ``snap.on_unclustered`` says and named in one warning that says what to change.
        refine: the training after the snap with tied weights
            (:class:`~sq_lightning.config.RefineConfig`); ``None``: snap only.
            With ``reassign=True, reassign_from="coupling_start"`` the latent weights start
            from the weights just before the first step of the coupling of the same
            ``Trainer`` (without one, before the fit's first step), shifted per cluster so
            that each cluster's latent mean is its snapped value: the snapped model is the
            same, but weights near a decision boundary can change cluster at once (ternary
            ResNet-20 on CIFAR-10: 83.0% against 80.7% from the same coupled weights,
            ``experiments/results/refine_coupled.md``). That keeps one float32 copy of the
            selected weights (CPU) from the coupling's start to the snap, in checkpoints
            too; it needs ``snap_epoch >= 1`` and no layer sharded by FSDP. The first steps
            after such a snap move many weights at once: give the refinement at least an
            epoch. With ``ramp_steps > 0`` the snap is gradual (logged as ``sq/snap_pull``;
            BatchNorm statistics follow the weights, no re-estimation at the snap; a ramp
            that has not ended when fit ends is finished there with one exact tie, a
            re-estimation and a warning).
        export: write the LightningModule's ``state_dict`` with the snapped layers as
            codebook + indices at the end of fit (:class:`~sq_lightning.config.ExportConfig`;
            ``None``: no export). Read it back with :func:`~sq_lightning.export.load_compressed`.
        clusters_from: ``"gaps"`` (discover clusters), ``"codebook"`` (the learned
            representatives of a :class:`LearnedCodebook` in the same ``Trainer``) or
            ``"auto"`` (default: ``"codebook"`` when the training stage learns
            centroids, else ``"gaps"``).
        module_types: module class names whose ``weight`` is snapped. With none of
            ``module_types``, ``include``, ``exclude``, ``min_size`` given, the snap takes
            the layers of the training stage in the same ``Trainer`` (the default ones
            without a stage).
        include: regexes on full parameter names (``re.search``); when given, only the
            matching weights of ``module_types`` are snapped. A pattern that matches no
            weight fails at setup, naming the closest ones.
        exclude: regexes on full parameter names never to snap (each must match one).
        min_size: layers with fewer weights are not snapped.
        histogram_every_n_epochs: weight-histogram interval (0 disables).

    Raises:
        TypeError: a settings group of the wrong type, or a keyword argument of an earlier
            version (``gap``, ``max_bits``, ``reassign``, ``export_path``, ...): the message
            names the field that replaced it (:data:`sq_lightning.config.MOVED`).
        ValueError: a bad argument, a selection that matches no layer,
            ``clusters_from="codebook"`` without a ``LearnedCodebook`` callback, a ``w``
            that disagrees with the coupling's, two training stages in one ``Trainer``, an
            ``export.path`` that exists already.
        sq_lightning.snapper.UnclusteredLayerError: with ``snap.on_unclustered="raise"``.

    Example::

        trainer = Trainer(max_epochs=6, callbacks=[
            SoftQuantCallback(stop_epoch=4),
            ClusterRefine(snap=SnapConfig(max_bits=4), export=ExportConfig("model.sq.safetensors")),
        ])  # snaps at epoch 4 with the coupling's w_l, at most 16 values a layer, refines epochs 4-5

    In YAML (``lightning fit --config``)::

        - class_path: sq_lightning.ClusterRefine
          init_args: {snap: {max_bits: 4}, export: {path: model.sq.safetensors}}
    """

    def __init__(
        self,
        snap_epoch: Union[int, Literal["auto"], None] = "auto",
        w: Optional[float] = None,
        snap: SnapConfig = SnapConfig(),
        refine: Optional[RefineConfig] = RefineConfig(),
        export: Optional[ExportConfig] = None,
        clusters_from: Literal["auto", "gaps", "codebook"] = "auto",
        module_types: Optional[list[str]] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        min_size: int = 0,
        histogram_every_n_epochs: int = 1,
        **moved: Any,
    ) -> None:
        super().__init__()
        reject_moved("ClusterRefine", moved)
        check_group("snap", snap, SnapConfig)
        check_group("refine", refine, RefineConfig, allow_none=True)
        check_group("export", export, ExportConfig, allow_none=True)
        if snap_epoch != "auto":
            check_int("snap_epoch", snap_epoch, 0, allow_none=True, hint=" (None: snap at fit end), or 'auto'")
        if refine is not None and refine.ramp_steps and snap_epoch is None:
            raise ValueError(
                "`refine.ramp_steps` > 0 spreads the snap over the training steps after it: it needs a `snap_epoch` "
                "(got snap_epoch=None). Set `ramp_steps=0` to snap at once."
            )
        if refine is not None and refine.reassign_from == "coupling_start" and (
            snap_epoch is None or (snap_epoch != "auto" and snap_epoch < 1)
        ):
            raise ValueError(
                "`refine.reassign_from='coupling_start'` starts the latent weights from the weights before coupling: "
                f"it needs `snap_epoch >= 1` (got snap_epoch={snap_epoch!r}). A fit that starts at the snap "
                "(`snap_epoch=0`) has no coupling in it: use `reassign_from='snap'`."
            )
        check_choice("clusters_from", clusters_from, ("auto", "gaps", "codebook"))
        check_int("histogram_every_n_epochs", histogram_every_n_epochs, 0)
        if w is not None:
            check_number("w", w, 0.0, strict=True)
        self.snap_config, self.refine_config, self.export_config = snap, refine, export
        self.export_path = export.path if export is not None else None
        self.export_coding = export.coding if export is not None else "packed"
        self.exported: Optional[str] = None
        self.selector = LayerSelector(module_types, include, exclude, min_size)
        # No selection given: the training stage's, when there is one (setup).
        self._own_selection = bool(module_types or include or exclude or min_size)
        self.w = w  # None: the training stage's w_l, else DEFAULT_W
        self.snapper = ClusterSnapper(DEFAULT_W if w is None else w, snap, self.selector, refine)
        self.snap_epoch = snap_epoch
        self._snap_at: Optional[int] = None if snap_epoch == "auto" else snap_epoch  # resolved in setup
        self._source: Optional[ClusterSource] = None  # the training stage of the same Trainer
        self.reassign_from = refine.reassign_from if refine is not None else "snap"
        # reassign_from="coupling_start": the selected weights before the coupling (float32, CPU), until the snap.
        self.latent_source: dict[str, Any] = {}
        self._saw_uncoupled = False  # a batch before the coupling started, in this fit
        self.clusters_from = clusters_from
        self.given_clusters: Optional[dict[str, Clusters]] = None  # snap_to()
        self.refine = refine is not None  # tie after the snap
        self.recalibrate_bn_batches = snap.recalibrate_bn_batches
        self.histogram_every_n_epochs = histogram_every_n_epochs

    def snap_to(self, clusters: Mapping[str, Clusters]) -> "ClusterRefine":
        """Snaps, at ``snap_epoch``, to these clusters instead of finding them in that epoch's weights.

        ``clusters`` maps a selected parameter's full name to its
        :class:`~sq_lightning.ops.clustering.Clusters` (say a post-training quantizer's, through
        :meth:`Clusters.from_quantization`, or another run's); the selected layers not in it
        stay as they are. At the snap every member takes its cluster's given value whatever the
        weights have become since, and with ``reassign_from="coupling_start"`` the latent weights
        start from the weights before the coupling (before the fit's first step when no coupling
        callback runs), shifted per cluster onto those values. ``on_unclustered`` still applies
        to a layer that the given clusters fit badly. The clusters are configuration, as the
        constructor's arguments are: they are not written to checkpoints before the snap, so
        call this again on the callback of a run that resumes. Under DDP or FSDP2 give whole
        layers (also for sharded ones): every rank snaps to rank 0's clusters, whatever the
        others were given. Returns ``self``.

        Raises:
            ValueError: ``clusters`` empty or holding something else than ``Clusters``; at fit
                start, a name that is not a selected layer, or assignments that do not match
                the layer's shape or the number of centroids.
        """
        if not isinstance(clusters, Mapping) or not clusters:
            raise ValueError(f"snap_to: `clusters` must be a non-empty mapping of parameter name to Clusters, got {clusters!r}.")
        for name, cl in clusters.items():
            if not isinstance(cl, Clusters):
                raise ValueError(f"snap_to: clusters[{name!r}] must be a Clusters (e.g. Clusters.from_quantization(q)), "
                                 f"got {type(cl).__name__}.")
        if self.clusters_from == "codebook":
            raise ValueError("snap_to: this ClusterRefine snaps to a learned codebook (`clusters_from='codebook'`); "
                             "given clusters replace it: use `clusters_from='gaps'`.")
        self.given_clusters = dict(clusters)
        return self

    def _check_given_clusters(self, pl_module: pl.LightningModule) -> None:
        """Every given layer is a selected one and its clusters index it (before any step)."""
        selected = dict(self.selector.select(pl_module))
        for name, cl in (self.given_clusters or {}).items():
            if name not in selected:
                raise ValueError(f"snap_to: {name!r} is not a layer this ClusterRefine selects "
                                 f"(selected: {sorted(selected)[:4]}{' ...' if len(selected) > 4 else ''}); "
                                 "pass clusters for those, or widen `include`.")
            shape = tuple(selected[name].shape)  # a sharded (DTensor) layer's is the whole layer's
            if tuple(cl.assignments.shape) != shape:
                raise ValueError(f"snap_to: the assignments given for {name} have shape {tuple(cl.assignments.shape)}, "
                                 f"the layer {shape}.")
            if cl.assignments.numel() and not 0 <= int(cl.assignments.min()) <= int(cl.assignments.max()) < cl.k:
                raise ValueError(f"snap_to: the assignments given for {name} index outside its {cl.k} centroids.")

    @property
    def snapped(self) -> bool:
        return self.snapper.snapped

    # -- hooks --------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._source = find_source(trainer.callbacks)
        self._check_source()
        check_setup(trainer, pl_module, type(self).__name__, self.selector)
        if stage == "fit":
            self._check_snap_epoch(trainer)
            self._check_forward(pl_module)
        if self.export_path is not None and stage == "fit":
            self._check_export_target(trainer)

    def _check_source(self) -> None:
        """The training stage of the same Trainer provides what this snap is asked to use."""
        src = self._source
        if self.clusters_from == "codebook" and (src is None or src.provides != "centroids"):
            raise ValueError(
                "`clusters_from='codebook'` needs a training stage that learns centroids (a LearnedCodebook) in the "
                "same Trainer; add one or use `clusters_from='gaps'`."
            )
        hint = src.snap_hint() if src is not None else SnapHint()
        if hint.selector is not None and not self._own_selection:
            self.selector = self.snapper.selector = hint.selector  # the same layers, said once
        w_src = hint.w
        if self.w is not None and w_src is not None and not math.isclose(self.w, w_src, rel_tol=1e-9):
            raise ValueError(
                f"ClusterRefine: `w`={self.w:g} but the {type(src).__name__} of the same Trainer couples with "
                f"`w`={w_src:g}, and the snap splits the clusters at the coupling's w_l. Leave ClusterRefine's `w` "
                "unset (it is only for a snap without a coupling in the Trainer)."
            )

    @property
    def _from_codebook(self) -> bool:
        src = self._source
        return self.clusters_from == "codebook" or (
            self.clusters_from == "auto" and src is not None and src.provides == "centroids"
        )

    def _resolve_snap_epoch(self, trainer: pl.Trainer) -> None:
        """``snap_epoch='auto'``: where the training stage stops; at fit start without one."""
        if self.snap_epoch != "auto":
            self._snap_at = self.snap_epoch
            return
        src, max_epochs = self._source, trainer.max_epochs
        bounded = max_epochs is not None and max_epochs >= 0
        if src is None:
            self._snap_at = 0
        elif src.stop_epoch is not None and (not bounded or src.stop_epoch < max_epochs):
            self._snap_at = src.stop_epoch
        else:
            self._snap_at = None
            rank_zero_info(
                f"ClusterRefine: the {type(src).__name__} acts to the end of fit, so the snap comes at the end of fit, "
                "with no refinement after it. Give it a `stop_epoch` below `max_epochs` to refine."
            )
        if self._snap_at is None and self.snapper.ramp_steps:
            raise ValueError(
                "`refine.ramp_steps` > 0 needs epochs after the snap, but the snap comes at the end of fit (the training "
                "stage has no `stop_epoch`): give it one, or set `ramp_steps=0`."
            )
        if self.reassign_from == "coupling_start" and (self._snap_at is None or self._snap_at < 1):
            raise ValueError(
                "`reassign_from='coupling_start'` needs the coupling and the snap in one fit (a snap at epoch >= 1 "
                f"before the end), but the snap comes at {self._snap_at!r}: give the training stage a `stop_epoch`."
            )

    def _check_snap_epoch(self, trainer: pl.Trainer) -> None:
        """The snap comes inside the fit and after the coupling of the same Trainer has started."""
        self._resolve_snap_epoch(trainer)
        if self._snap_at is None:
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self._snap_at >= max_epochs:
            raise ValueError(
                f"ClusterRefine: `snap_epoch`={self.snap_epoch} but the Trainer stops after `max_epochs`={max_epochs} "
                f"epochs (0 to {max_epochs - 1}): the snap would come after training, with no refinement. Set "
                "`snap_epoch` below `max_epochs`, or `snap_epoch=None` to snap at the end of fit on purpose."
            )
        coupling = self._source
        if coupling is not None and self._snap_at <= coupling.start_epoch:
            raise ValueError(
                f"ClusterRefine: `snap_epoch`={self._snap_at} is not after the start of the {type(coupling).__name__} "
                f"in the same Trainer (`start_epoch`={coupling.start_epoch}): the layers would be snapped before "
                "any coupling. Snap where the coupling stops (its `stop_epoch`)."
            )

    def _check_forward(self, pl_module: pl.LightningModule) -> None:
        """Says at setup how BatchNorm will be re-estimated in a module without ``forward``."""
        self._bn_via_training_step = False
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())
        if not (has_bn and self.recalibrate_bn_batches) or has_forward(pl_module):
            return
        if pl_module.automatic_optimization:
            self._bn_via_training_step = True
            rank_zero_info(
                f"ClusterRefine: {type(pl_module).__name__} defines no `forward`; BatchNorm statistics will be "
                "re-estimated after the snap by running its `training_step` without gradients (nothing logged)."
            )
        else:
            rank_zero_warn(
                f"ClusterRefine: {type(pl_module).__name__} defines no `forward` and optimizes manually, so its "
                "`training_step` cannot be run just to re-estimate BatchNorm: the re-estimation after the snap is "
                "skipped. Define `forward` (or set `recalibrate_bn_batches=0` to silence this)."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saw_uncoupled = False
        self._check_given_clusters(pl_module)
        if self.reassign_from == "coupling_start" and any(is_sharded(p) for _, p in self.selector.select(pl_module)):
            raise ValueError(
                "`reassign_from='coupling_start'` supports whole layers only, and this model's are sharded (FSDP): "
                "use `reassign_from='snap'`."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.reassign_from != "coupling_start" or self.snapped or self.latent_source:
            return  # a run resumed after the coupling started has its copy from the checkpoint
        coupling = self._source
        if coupling is not None and not coupling.is_active(trainer):
            self._saw_uncoupled = True
            return
        if trainer.ckpt_path is not None and not self._saw_uncoupled:
            rank_zero_warn(
                f"ClusterRefine(reassign_from='coupling_start'): resumed from {trainer.ckpt_path} during the coupling, "
                "and its state holds no weights from before it: the latent weights will start from the weights at "
                "this resume instead."
            )
        self.latent_source = {n: p.detach().float().cpu().clone() for n, p in self.selector.select(pl_module)}

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.snapped and self._snap_at is not None and trainer.current_epoch >= self._snap_at:
            self._run_snap(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.snapped and self.refine:
            self.snapper.tie(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.snapped:
            self.snapper.refresh_reports()
            log_scalars(trainer, self._metrics())
        n = self.histogram_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            log_histograms(trainer, self._weights(pl_module), "sq/weights")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.snapped:
            self._run_snap(trainer, pl_module, recalibrate=True)
        elif not self.snapper.exact:
            rank_zero_warn(
                f"ClusterRefine: fit ended {self.snapper.ramp_steps - self.snapper.ties + 1} steps before the gradual "
                "snap reached its exact tie: finishing it now, at once (and re-estimating BatchNorm). Lower "
                "`refine.ramp_steps` below the steps left after `snap_epoch` to let the network follow the whole ramp."
            )
            self.snapper.finish(pl_module)
            self._recalibrate(trainer, pl_module)
        self.snapper.refresh_reports()
        scores = "  ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/"))
        rank_zero_info("ClusterRefine: final per-layer bit-widths\n" + self.snapper.table() + (f"\nlast validation: {scores}" if scores else ""))
        if self.export_path is not None:
            self._export(trainer, pl_module)

    # -- export --------------------------------------------------------------------
    def _export_target(self, trainer: pl.Trainer) -> str:
        if os.path.isabs(self.export_path):
            return self.export_path
        return os.path.join(trainer.log_dir or trainer.default_root_dir, self.export_path)

    def _check_export_target(self, trainer: pl.Trainer) -> None:
        # Rank 0 writes; its answer is broadcast so that every rank raises together.
        problem = None
        if trainer.is_global_zero:
            target = self._export_target(trainer)
            if os.path.lexists(target):
                problem = (
                    f"`export.path` {target!r} exists: ClusterRefine never replaces a file. "
                    "Delete or move it, or choose another `export.path` (a relative one lands in the run's log directory)."
                )
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ValueError(problem)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # All ranks hold the same tied weights; rank 0 writes (docs/design.md section 7) and logs
        # the size. Sharded layers (FSDP2) are gathered first, by every rank; after that no
        # collective: a failed write on rank 0 must not leave the others waiting.
        sharded = any(is_sharded(p) for p in pl_module.parameters())
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            clusters = self.clusters()
            # Whole tensors, on rank 0's CPU only.
            state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not trainer.is_global_zero:
            return
        target = self._export_target(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if sharded:
            clusters = {n: (c.cpu(), a.cpu()) for n, (c, a) in clusters.items()}
            report = save_state_compressed({n: state[n] for n in state}, target, clusters, coding=self.export_coding)
        else:
            report = save_compressed(pl_module, target, self.clusters(), coding=self.export_coding)
        self.exported = target
        rank_zero_info(f"ClusterRefine: exported ({self.export_coding} indices)\n{report}")
        log_scalars(trainer, {"sq/export_bytes": float(report.file_bytes)})

    # -- helpers --------------------------------------------------------------------
    def with_hint(self, hint: SnapHint) -> "ClusterRefine":
        """Snaps with this hint when no training stage runs in the Trainer: say the per-layer
        ``w_l`` of a coupling run whose checkpoint this fit starts from
        (``SnapHint(w_l=...)``, :meth:`SoftQuantCallback.snap_hint` of that run). A training stage
        in the same Trainer wins over it. Returns ``self``."""
        if not isinstance(hint, SnapHint):
            raise ValueError(f"with_hint: `hint` must be a sq_lightning.handoff.SnapHint, got {type(hint).__name__}.")
        self._fixed_hint = hint
        return self

    def _hint(self) -> SnapHint:
        if self._source is not None:
            return self._source.snap_hint()
        return getattr(self, "_fixed_hint", None) or SnapHint()

    def _weights(self, pl_module: pl.LightningModule) -> dict:
        return {n: p for n, p in self.selector.select(pl_module)}

    def _run_snap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recalibrate: bool = True) -> None:
        log_histograms(trainer, self._weights(pl_module), "sq/weights_pre_snap")
        hint = self._hint()
        centroids = dict(hint.centroids) if self._from_codebook else None
        if self.given_clusters is not None:
            params = dict(pl_module.named_parameters())
            # Copies: refinement moves the centroids (and assignments), never the caller's clusters.
            clusters = {n: c.to(params[n].device, copy=True) for n, c in self.given_clusters.items()}
        else:
            clusters = self.snapper.find(pl_module, w_l=dict(hint.w_l), centroids=centroids)
        # Every rank holds the same weights, so the clusters agree; broadcasting rank 0's
        # makes that a guarantee rather than a property of floating-point determinism.
        clusters = trainer.strategy.broadcast(clusters, src=0)
        self.snapper.snap(pl_module, clusters=clusters, given=self.given_clusters is not None)
        if self.reassign_from == "coupling_start":  # reassign=True: a snap at once, never a gradual one
            if self.latent_source:
                self.snapper.start_latent_from({n: t for n, t in self.latent_source.items() if n in self.snapper.clusters})
            else:
                rank_zero_warn(
                    "ClusterRefine(reassign_from='coupling_start'): the coupling had not started before the snap, so no "
                    "weights from before it were kept: the latent weights start from the weights at the snap."
                )
            self.latent_source = {}
        if recalibrate and self.snapper.exact:  # a gradual snap has not moved the weights yet
            self._recalibrate(trainer, pl_module)
        log_histograms(trainer, self._weights(pl_module), "sq/weights_snapped")
        log_scalars(trainer, self._metrics())
        rank_zero_info(f"ClusterRefine: snapped at epoch {trainer.current_epoch}\n" + self.snapper.table())

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())
        if not (has_bn and self.recalibrate_bn_batches and trainer.train_dataloader is not None):
            return
        from sq_lightning.models.batchnorm import recalibrate_batchnorm

        forward = None
        if not has_forward(pl_module):
            if not getattr(self, "_bn_via_training_step", pl_module.automatic_optimization):
                return  # manual optimization: skipped, as said at setup
            forward = _training_step_forward(pl_module)
        recalibrate_batchnorm(pl_module, trainer.train_dataloader, self.recalibrate_bn_batches,
                              device=pl_module.device, forward=forward)

    def _metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"sq/snap_pull": self.snapper.pull()} if self.snapper.ramp_steps else {}
        for name, r in self.snapper.reports.items():
            out[f"sq/bits/{name}"] = r.bits
            out[f"sq/clusters/{name}"] = float(r.k)
            out[f"sq/snap_error/{name}"] = r.snap_error
            out[f"sq/entropy/{name}"] = r.entropy
        out.update({f"sq/{k}": v for k, v in self.snapper.summary().items()})
        return out

    def clusters(self) -> dict:
        """``{name: (centroids, assignments)}`` of the snapped layers, for :func:`sq_lightning.export.save_compressed`."""
        return self.snapper.export_clusters()

    # -- state --------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"snapper": self.snapper.state_dict(), **({"latent_source": self.latent_source} if self.latent_source else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapper.load_state_dict(state_dict.get("snapper", {}))
        self.latent_source = {n: t.float() for n, t in state_dict.get("latent_source", {}).items()}
