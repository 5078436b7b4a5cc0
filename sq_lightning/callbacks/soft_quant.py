"""``SoftQuantCallback``: the weight-coupling loss of soft quantization in any ``Trainer``.

Bernstein, Di Carlo, Schwab, "Soft Quantization: Model Compression Via Weight
Coupling", arXiv:2601.21219 (2026). The math lives in :mod:`sq_lightning.ops.coupling`
and :class:`sq_lightning.coupler.WeightCoupler`; this module only connects it to hooks.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from sq_lightning.callbacks._logging import log_histograms, log_scalars
from sq_lightning.callbacks._checks import check_setup, check_window
from sq_lightning.coupler import WeightCoupler, _std, check_coupling_args
from sq_lightning.handoff import SnapHint
from sq_lightning._validate import check_int, check_number
from sq_lightning.schedule import Ramp, Window
from sq_lightning.sharding import is_sharded
from sq_lightning.layers import LayerSelector
from sq_lightning.ops import _cpu_kernels
from sq_lightning.ops.coupling import DEFAULT_N_BINS

log = logging.getLogger(__name__)

# Default ‖coupling gradient‖ / ‖task gradient‖ per layer and step of the relative strength
# (h=None); chosen on the measurements in experiments/results/relative_strength.md.
DEFAULT_GRAD_RATIO = 3.0


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

    * ``w_l = w · σ_l``: ``σ_l`` is the std of the layer's weights, measured when coupling
      starts and again every ``rescale_every_n_steps`` coupled steps (saved in checkpoints);
    * the strength ``h_l``: by default (``h=None``) *relative*: at every step each layer's
      coupling gradient is scaled so that its norm is ``grad_ratio`` times the norm of the
      task gradient already in ``.grad`` (``h_l = grad_ratio · ‖g_task,l‖ / ‖∂L_C/∂θ_l‖_{h=1}``).
      The coupling then has the same weight against the task in every layer, whatever its
      size, the optimizer (SGD, Adam, AdamW: an adaptive optimizer divides both gradients by
      the same running scale) or the learning rate. The coupling gradient's norm is measured
      in the pass that adds it (from the histogram grid for large layers), at the cost of the
      fixed strength. With a number ``h``, the paper's fixed
      strength ``h_l = h · N_l^(-alpha)``; with ``target_step``, ``h_l`` calibrated once for SGD.

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
        h: ``None`` (default): the relative strength above. A number: the paper's fixed
            strength (dimensionless), ``h_l = h · N_l^(-alpha)``; with SGD (lr 0.01-0.05,
            momentum 0.9) useful values are about 1e-4 to 2e-3; more is chaotic, less leaves
            small layers unclustered. Only ``lr / (1 - momentum) · h`` matters for SGD.
        w: range of the well relative to the layer's std. Larger ``w`` merges more:
            fewer clusters, fewer bits (0.15 / 0.3 / 0.45 gave about 4 / 3 / 2.5 bits on
            an MLP, docs/design.md section 8).
        alpha: exponent of the layer-size scaling of a fixed ``h`` (paper: 0.66).
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
            coupling gradient on those steps; with a fixed ``h`` only (with ``h=None`` the ratio
            is ``grad_ratio`` by construction, and ``True`` is refused). Well above 1 in a layer, the coupling
            drives that layer and accuracy drops during coupling: on ResNet-20 this
            happens in the large layers at ``alpha=0.66`` with ``w >= 0.6``, and
            ``alpha ≈ 1.1`` evens the layers out
            (experiments/results/coupling_vs_task.md).
        histogram_every_n_epochs: TensorBoard weight histograms ``sq/weights/<layer>``
            every this many epochs while coupling (0 disables), to watch the
            distributions collapse into spikes.
        target_step: instead of ``h`` and ``alpha``, calibrate each ``h_l`` at the first
            coupled step so that ``S_l = lr/(1-momentum) · RMS(coupling grad_l) / w_l``
            equals this value in every layer (SGD only; the calibrated ``h_l`` are logged,
            saved and restored). ``S_l`` is how far, in units of ``w_l``, the coupling
            alone moves a typical weight per step: it carries over across learning rates
            and layer sizes where a raw ``h`` does not (docs/design.md section 8). Measured
            (experiments/results/strength_scaling.md): layers of 640 to 32768 weights all
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
        grad_ratio: with ``h=None``, ``‖coupling gradient‖ / ‖task gradient‖`` of every
            layer at every coupled step (times the ramp's factor). Measured in
            ``experiments/results/relative_strength.md``.
        rescale_every_n_steps: re-measure ``σ_l`` (hence ``w_l``) every this many coupled
            steps, so that the well follows a layer whose scale drifts (0: frozen at the
            start, as in the paper).

    Raises:
        ValueError: a bad argument (in ``__init__``) or a selection that matches no
            layer of the model (in ``setup``).

    Example::

        trainer = Trainer(callbacks=[SoftQuantCallback(stop_epoch=8), ClusterRefine()])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        h: Optional[float] = None,
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
        grad_ratio: float = DEFAULT_GRAD_RATIO,
        rescale_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        self.relative = h is None and target_step is None
        check_coupling_args(1.0 if h is None else h, w, alpha, n_bins, backend)
        if h is None and not self.relative:
            h = 1e-3  # target_step calibrates h_l itself
        check_number("grad_ratio", grad_ratio, 0.0, strict=True)
        check_int("rescale_every_n_steps", rescale_every_n_steps, 0, hint=" (0: sigma_l frozen at the start)")
        self.grad_ratio, self.rescale_every_n_steps = float(grad_ratio), rescale_every_n_steps
        self.window = Window(start_epoch, stop_epoch, start_step, stop_step)
        self.ramp = Ramp(ramp_steps, ramp_from)
        check_int("log_every_n_steps", log_every_n_steps, 1)
        check_int("histogram_every_n_epochs", histogram_every_n_epochs, 0, hint=" (0: no histograms)")
        self.selector = LayerSelector(module_types, include, exclude, min_size)
        # Relative strength: the coupler computes the field at unit strength (h_l = 1) and
        # each layer's gradient is scaled to `grad_ratio` times the task gradient's norm.
        self.coupler = WeightCoupler(
            h=1.0 if self.relative else h, w=w, alpha=0.0 if self.relative else alpha, n_bins=n_bins,
            backend=backend, selector=self.selector, target_step=target_step,
        )
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        if log_grad_ratio and self.relative:
            raise ValueError(
                "`log_grad_ratio=True` measures the coupling against the task gradient, but with the relative strength "
                "(`h=None`) every layer's ratio is `grad_ratio` by construction: set `log_grad_ratio=False`, or give a "
                "fixed `h` to watch the ratio."
            )
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
        if self.relative:
            return self._generate_state_key(h=None, w=self.coupler.w, grad_ratio=self.grad_ratio)
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
            if self.relative and any(is_sharded(p) for n, p in pl_module.named_parameters() if n in self.coupler.sigma):
                raise ValueError(
                    "SoftQuantCallback: the relative strength (`h=None`) needs whole layers, and this model's are "
                    "sharded (FSDP2): set `h` (the paper's fixed strength) for sharded training."
                )
            if self.coupler.target_step is not None:
                self.coupler.calibrate(pl_module, _effective_lr(optimizer))
            rank_zero_info(self._describe())
        elif self.rescale_every_n_steps and self.steps_applied % self.rescale_every_n_steps == 0:
            self._rescale(pl_module)
        self.coupler.scale = self.strength_scale()
        want_loss = trainer.global_step % self.log_every_n_steps == 0
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ratios = {}
        if want_loss and self.log_grad_ratio and not self.relative:
            ratios = self.coupler.grad_ratios(pl_module, only=params)
        if self.relative:
            losses = self._add_relative(pl_module, params, want_loss)
        else:
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

    @torch.no_grad()
    def _rescale(self, pl_module: pl.LightningModule) -> None:
        """``σ_l`` re-measured on the current weights: the well follows the layer's scale (a layer
        followed by normalization shrinks under weight decay without changing its function)."""
        for n, p in pl_module.named_parameters():
            if n in self.coupler.sigma:
                std = _std(p.detach())  # collective for a sharded layer: every rank calls it
                if math.isfinite(std) and std > 0:
                    self.coupler.sigma[n] = std

    @torch.no_grad()
    def _add_relative(self, pl_module: pl.LightningModule, only: list, want_loss: bool) -> Optional[dict]:
        """Adds each layer's coupling gradient scaled to ``grad_ratio · scale · ‖task grad‖``.

        The norm of the coupling gradient at unit strength is measured in the same pass that
        adds it in place (for the histogram backend from the grid), so a step costs what the
        fixed strength costs plus one read of the task gradient."""
        allowed = {id(p) for p in only}
        params = {n: p for n, p in pl_module.named_parameters()
                  if n in self.coupler.sigma and p.grad is not None and id(p) in allowed}
        if not params:
            return {} if want_loss else None
        names = list(params)
        grads = [params[n].grad for n in names]
        if _cpu_kernels.enabled(grads):
            task = dict(zip(names, _cpu_kernels.norms(grads)))
        else:
            norms = torch._foreach_norm(grads)
            task = dict(zip(names, torch.stack([t.float().to(norms[0].device) for t in norms]).tolist()))
        target = self.grad_ratio * self.coupler.scale
        factors: dict[str, float] = {}

        def strength(name: str, unit: float) -> float:
            t = task[name]
            factors[name] = target * t / unit if unit > 0 and math.isfinite(unit) and math.isfinite(t) else 0.0
            return factors[name]

        losses = self.coupler.add_gradients(pl_module, compute_loss=want_loss, only=[params[n] for n in names],
                                            strength=strength)
        self.last_h_l = factors  # the effective h_l of this step
        return losses

    def strength_scale(self, k: Optional[int] = None) -> float:
        """Factor on every ``h_l`` at the k-th coupled step (default: the next one)."""
        return self.ramp.factor(self.steps_applied if k is None else k)

    def _describe(self) -> str:
        rows = self.coupler.layer_table()
        if self.relative:
            how = f"relative strength: coupling gradient = {self.grad_ratio:g} x the task gradient, per layer and step"
        elif self.coupler.calibrated:
            how = f"h_l calibrated for target_step={self.coupler.target_step:g}"
        else:
            how = f"h={self.coupler.h:g}, alpha={self.coupler.alpha:g}"
        if self.ramp_steps:
            how += f", ramped from {self.ramp_from:g}x over {self.ramp_steps} steps"
        lines = [f"SoftQuantCallback: coupling {len(rows)} layers ({how}, w={self.coupler.w:g})"]
        h_l = (lambda r: "") if self.relative else (lambda r: f"  h_l={r['h_l']:.4g}")
        lines += [f"  {r['name']:<40} N={r['numel']:>8}  sigma={r['sigma']:.4g}  w_l={r['w_l']:.4g}{h_l(r)}" for r in rows]
        return "\n".join(lines)

    # -- state --------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.coupler.state_dict(), "steps_applied": self.steps_applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.coupler.load_state_dict(state_dict)
        self.steps_applied = int(state_dict.get("steps_applied", 0))
