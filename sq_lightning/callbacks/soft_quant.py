"""``SoftQuantCallback``: the weight-coupling loss of soft quantization in any ``Trainer``.

Bernstein, Di Carlo, Schwab, "Soft Quantization: Model Compression Via Weight
Coupling", arXiv:2601.21219 (2026). The math lives in :mod:`sq_lightning.ops.coupling`
and :class:`sq_lightning.coupler.WeightCoupler`; this module only connects it to hooks.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from sq_lightning.callbacks._logging import log_histograms, log_scalars
from sq_lightning.callbacks._checks import check_setup, check_window
from sq_lightning.coupler import WeightCoupler, check_coupling_args
from sq_lightning.handoff import SnapHint
from sq_lightning._validate import check_int
from sq_lightning.schedule import Ramp, Window
from sq_lightning.layers import LayerSelector
from sq_lightning.ops.coupling import DEFAULT_N_BINS

log = logging.getLogger(__name__)


def _effective_lr(optimizer) -> float:
    """``lr / (1 - momentum)`` of an SGD optimizer (first parameter group)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    if not isinstance(opt, torch.optim.SGD):
        raise ValueError(
            f"`target_step` calibrates h from the SGD step lr/(1-momentum), but the optimizer is "
            f"{type(opt).__name__}, which adapts its step per weight. Set `h` (and `alpha`) instead of "
            "`target_step` with this optimizer."
        )
    group = opt.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    dampening = float(group.get("dampening", 0.0) or 0.0)
    # Steady-state step of heavy-ball momentum: lr (1 - dampening) / (1 - momentum).
    return float(group["lr"]) * (1.0 - dampening if momentum else 1.0) / (1.0 - momentum)


class SoftQuantCallback(Callback):
    r"""Makes the weights of each selected layer cluster during training.

    At every optimizer step the gradient of the coupling loss

    .. math::
        L_C = \sum_l h_l \sum_{i \ne j} U_{w_l}(\theta_i - \theta_j), \quad
        U_w(x) = (|x| - w)\,1[|x| < w]

    is added to ``param.grad`` of each selected layer, with

    * ``w_l = w · σ_l``: ``σ_l`` is the std of the layer's weights when coupling starts,
      frozen afterwards and saved in checkpoints;
    * ``h_l = h · N_l^(-alpha)``, ``N_l`` the layer's number of weights.

    The gradient is injected in ``on_before_optimizer_step``: gradients there are
    already unscaled by mixed precision and all-reduced by DDP, the hook runs once per
    optimizer step (also with gradient accumulation), and the coupling gradient goes
    through gradient clipping together with the task gradient. No autograd graph is
    built and ``training_step`` is untouched. With several optimizers each one's
    parameters get their coupling gradient at that optimizer's step. Layers sharded by
    FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) are binned slice by slice and
    one all-reduce of the histograms gives every rank the whole layer's coupling field;
    layers the ``backend`` computes exactly are gathered whole. ``FSDPStrategy`` (FSDP1)
    is refused at setup.

    Args:
        h: coupling strength (dimensionless). With SGD (lr 0.01-0.05, momentum 0.9)
            useful values are about 1e-4 to 2e-3; more is chaotic, less leaves small
            layers unclustered. Only ``lr / (1 - momentum) · h`` matters for SGD.
        w: range of the well relative to the layer's std. Larger ``w`` merges more:
            fewer clusters, fewer bits (0.15 / 0.3 / 0.45 gave about 4 / 3 / 2.5 bits on
            an MLP, docs/design.md section 8).
        alpha: exponent of the layer-size scaling of ``h_l`` (paper: 0.66).
        n_bins: grid points per layer of the histogram backend (paper: 2^14).
        backend: ``"histogram"``, ``"exact"`` or ``"auto"`` (exact for small layers).
        module_types: module class names whose ``weight`` is coupled
            (default Conv1d/2d/3d and Linear).
        include: regexes on full parameter names (``re.search``); when given, only the
            matching weights of ``module_types`` are coupled. A pattern that matches no
            weight fails at setup, naming the closest ones.
        exclude: regexes on full parameter names never to couple (each must match one).
        min_size: layers with fewer weights are not coupled.
        start_epoch: first epoch with coupling.
        stop_epoch: first epoch without coupling again (``None``: to the end).
        start_step: if set, first optimizer step (``trainer.global_step``) with coupling;
            combined with the epoch window by AND.
        stop_step: if set, first optimizer step without coupling again.
        log_every_n_steps: how often ``sq/coupling_loss`` is computed and logged
            (computing the loss value costs one extra convolution).
        log_per_layer: also log ``sq/coupling_loss/<layer>``.
        log_grad_ratio: also log, on the same steps, ``sq/grad_ratio/<layer>`` =
            ``‖coupling gradient‖ / ‖gradient in .grad‖`` (the task's, one batch, before
            clipping) and their maximum ``sq/grad_ratio_max``; costs one extra
            coupling gradient on those steps. Well above 1 in a layer, the coupling
            drives that layer and accuracy drops during coupling: on ResNet-20 this
            happens in the large layers at ``alpha=0.66`` with ``w >= 0.6``, and
            ``alpha ≈ 1.1`` evens the layers out
            (benchmarks/results/coupling_vs_task.md).
        histogram_every_n_epochs: TensorBoard weight histograms ``sq/weights/<layer>``
            every this many epochs while coupling (0 disables), to watch the
            distributions collapse into spikes.
        target_step: instead of ``h`` and ``alpha``, calibrate each ``h_l`` at the first
            coupled step so that ``S_l = lr/(1-momentum) · RMS(coupling grad_l) / w_l``
            equals this value in every layer (SGD only; the calibrated ``h_l`` are logged,
            saved and restored). ``S_l`` is how far, in units of ``w_l``, the coupling
            alone moves a typical weight per step: it carries over across learning rates
            and layer sizes where a raw ``h`` does not (docs/design.md section 8). Measured
            (benchmarks/results/strength_scaling.md): layers of 640 to 32768 weights all
            started clustering at ``S_l ≈ 0.003`` over 184 steps (``S_l · steps ≈ 0.5``:
            the weights travel about half a well); the small classifier layer was thrown
            apart above ``S_l ≈ 0.01``. Start at 1-4 / (number of coupling steps); on
            ResNet-20 / CIFAR-10 the larger layers needed more than 2.3 / steps.
            The learning rate read is the one of the first coupled step: start coupling
            after a warm-up, not during it.
        ramp_steps: if > 0, every ``h_l`` grows geometrically over the first
            ``ramp_steps`` coupled optimizer steps, from ``ramp_from · h_l`` to ``h_l``:
            at the k-th coupled step (k = 0, 1, ...) it is multiplied by
            ``ramp_from ** (1 - min(k / ramp_steps, 1))``. A weak start lets the task
            keep the weights where it needs them while clusters nucleate; the full
            strength at the end tightens them before the snap. The factor is logged
            as ``sq/h_scale`` and follows the saved step counter on resume.
        ramp_from: strength at the first coupled step as a fraction of the full one,
            in (0, 1].

    Raises:
        ValueError: a bad argument (in ``__init__``) or a selection that matches no
            layer of the model (in ``setup``).

    Example::

        trainer = Trainer(callbacks=[SoftQuantCallback(h=1e-3, w=0.3)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        h: float = 1e-3,
        w: float = 0.3,
        alpha: float = 0.66,
        n_bins: int = DEFAULT_N_BINS,
        backend: Literal["histogram", "exact", "auto"] = "auto",
        module_types: Optional[list[str]] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        min_size: int = 0,
        start_epoch: int = 0,
        stop_epoch: Optional[int] = None,
        start_step: Optional[int] = None,
        stop_step: Optional[int] = None,
        log_every_n_steps: int = 50,
        log_per_layer: bool = False,
        log_grad_ratio: bool = False,
        histogram_every_n_epochs: int = 1,
        target_step: Optional[float] = None,
        ramp_steps: int = 0,
        ramp_from: float = 0.01,
    ) -> None:
        super().__init__()
        check_coupling_args(h, w, alpha, n_bins, backend)
        self.window = Window(start_epoch, stop_epoch, start_step, stop_step)
        self.ramp = Ramp(ramp_steps, ramp_from)
        check_int("log_every_n_steps", log_every_n_steps, 1)
        check_int("histogram_every_n_epochs", histogram_every_n_epochs, 0, hint=" (0: no histograms)")
        self.selector = LayerSelector(module_types, include, exclude, min_size)
        self.coupler = WeightCoupler(
            h=h, w=w, alpha=alpha, n_bins=n_bins, backend=backend, selector=self.selector, target_step=target_step
        )
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.log_grad_ratio = bool(log_grad_ratio)
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.steps_applied = 0

    # The window and the ramp, as the constructor took them.
    start_epoch = property(lambda self: self.window.start_epoch)
    stop_epoch = property(lambda self: self.window.stop_epoch)
    start_step = property(lambda self: self.window.start_step)
    stop_step = property(lambda self: self.window.stop_step)
    ramp_steps = property(lambda self: self.ramp.steps)
    ramp_from = property(lambda self: self.ramp.start)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(h=self.coupler.h, w=self.coupler.w, alpha=self.coupler.alpha)

    # -- hooks --------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_setup(trainer, pl_module, type(self).__name__, self.selector)
        if stage == "fit":
            check_window(trainer, type(self).__name__, self.start_epoch, self.stop_epoch, "the coupling")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.sanity_checking or not self.is_active(trainer):
            return
        self._run_coupling(trainer, pl_module, optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A ClusterRefine in the same Trainer logs the same tags: written once (_logging).
        n = self.histogram_every_n_epochs
        if n and self.coupler.prepared and (trainer.current_epoch + 1) % n == 0:
            log_histograms(trainer, {k: p for k, p in pl_module.named_parameters() if k in self.coupler.sigma}, "sq/weights")

    # -- the hand-off to the snap (sq_lightning.handoff.ClusterSource) ----------------
    provides = "w_l"

    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether the coupling acts at the trainer's current epoch and optimizer step."""
        return self.window.covers(trainer.current_epoch, trainer.global_step)

    def snap_hint(self) -> SnapHint:
        """``w``, the per-layer ``w_l = w · σ_l`` (empty before the coupling's first step) and the
        coupled layers' selection."""
        w_l = {n: self.coupler.w_l(n) for n in self.coupler.sigma} if self.coupler.prepared else {}
        return SnapHint(w=self.coupler.w, w_l=w_l, selector=self.selector)

    # -- helpers --------------------------------------------------------------------
    def _run_coupling(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.coupler.prepared or (self.coupler.target_step is not None and not self.coupler.calibrated):
            self.coupler.prepare(pl_module)
            if self.coupler.target_step is not None:
                self.coupler.calibrate(pl_module, _effective_lr(optimizer))
            rank_zero_info(self._describe())
        self.coupler.scale = self.strength_scale()
        want_loss = trainer.global_step % self.log_every_n_steps == 0
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ratios = self.coupler.grad_ratios(pl_module, only=params) if want_loss and self.log_grad_ratio else {}
        losses = self.coupler.add_gradients(pl_module, compute_loss=want_loss, only=params)
        self.steps_applied += 1
        if want_loss and (losses or ratios):
            # Straight to the loggers: `self.log` from this hook is only flushed on the
            # trainer's own logging steps, which need not match ours.
            metrics = {}
            if losses:
                metrics["sq/coupling_loss"] = float(sum(float(v) for v in losses.values()))
            if self.log_per_layer:
                metrics.update({f"sq/coupling_loss/{n}": float(v) for n, v in (losses or {}).items()})
            if ratios:
                metrics.update({f"sq/grad_ratio/{n}": v for n, v in ratios.items()})
                metrics["sq/grad_ratio_max"] = max(ratios.values())
            if self.ramp_steps:
                metrics["sq/h_scale"] = self.coupler.scale
            log_scalars(trainer, metrics)

    def strength_scale(self, k: Optional[int] = None) -> float:
        """Factor on every ``h_l`` at the k-th coupled step (default: the next one)."""
        return self.ramp.factor(self.steps_applied if k is None else k)

    def _describe(self) -> str:
        rows = self.coupler.layer_table()
        how = (
            f"h_l calibrated for target_step={self.coupler.target_step:g}"
            if self.coupler.calibrated
            else f"h={self.coupler.h:g}, alpha={self.coupler.alpha:g}"
        )
        if self.ramp_steps:
            how += f", ramped from {self.ramp_from:g}x over {self.ramp_steps} steps"
        lines = [f"SoftQuantCallback: coupling {len(rows)} layers ({how}, w={self.coupler.w:g})"]
        lines += [f"  {r['name']:<40} N={r['numel']:>8}  sigma={r['sigma']:.4g}  w_l={r['w_l']:.4g}  h_l={r['h_l']:.4g}" for r in rows]
        return "\n".join(lines)

    # -- state --------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.coupler.state_dict(), "steps_applied": self.steps_applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.coupler.load_state_dict(state_dict)
        self.steps_applied = int(state_dict.get("steps_applied", 0))
