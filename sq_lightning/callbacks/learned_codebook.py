"""Learned-codebook regularizer (method B) as a Lightning callback.

Malchiodi, Frasca, Ferraretto, "Quantization-Aware Regularizers for Deep Neural
Networks Compression", arXiv:2602.03614 (2026). Only the abstract is public; the
regularizer implemented here is this project's definition (``docs/design.md`` section 3),
its formulas and gradients are in :mod:`sq_lightning.ops.codebook`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from sq_lightning._validate import check_int, check_number
from sq_lightning.callbacks._checks import check_window
from sq_lightning.handoff import SnapHint
from sq_lightning.callbacks._strategy import check_strategy
from sq_lightning.layers import LayerSelector, check_overrides, first_override
from sq_lightning.ops.codebook import INIT_METHODS, codebook_regularizer, init_centroids, nearest_centroid
from sq_lightning.schedule import Window
from sq_lightning.sharding import all_reduce_sum, is_sharded, shard_group, shard_spec

log = logging.getLogger(__name__)

__all__ = ["LearnedCodebook"]

_OPTIMIZERS = ("adam", "sgd")
_MAX_BITS = 16
_STATE_VERSION = 1


class LearnedCodebook(Callback):
    """Pulls each chosen layer toward its own learned codebook of ``K`` values.

    Every chosen layer ``l`` (weights ``θ_l``, ``N_l`` entries) owns ``K_l``
    representatives ``c_l``, trained together with the network::

        L = L_task + lam · Σ_l R_l,     R_l = 1/N_l Σ_i min_k (θ_li - c_lk)^2

    (a soft-min with temperature when ``temperature > 0``, see
    :mod:`sq_lightning.ops.codebook`). At the end :meth:`snap` sets every weight to its
    nearest representative, leaving ``K_l`` distinct values per layer.

    How it runs. The task loss and the user's ``training_step`` are not touched. In
    ``on_before_optimizer_step`` (there, gradients are already unscaled by mixed
    precision and all-reduced by DDP, and the hook runs once per optimizer step, also
    with gradient accumulation) the callback adds the closed-form ``lam · ∂R_l/∂θ_l`` to
    each chosen ``param.grad`` (parameters without a gradient are skipped, and so are
    parameters the stepping optimizer does not own) and steps the codebooks with its own
    small optimizer on ``lam · ∂R_l/∂c_l``, keeping each codebook sorted. The codebooks
    are thus independent of the user's ``configure_optimizers``, identical on every DDP
    rank (same weights, same gradients) and saved with the checkpoint. Gradient clipping
    (``Trainer(gradient_clip_val=...)``) runs after this hook and so clips the sum.
    Layers sharded by FSDP2 (``ModelParallelStrategy`` with ``fully_shard``): each rank
    takes its slice, and one all-reduce per step sums the regularizer's value and
    codebook gradients, so every rank steps the same codebooks as one process would;
    the initial codebooks are built from the gathered layers.

    The codebooks are initialised from the weights when the active window starts (first
    epoch ``>= start_epoch``) and frozen after ``stop_epoch``. A non-finite weight,
    gradient or codebook raises ``RuntimeError`` naming the layer; under fp16 mixed
    precision a non-finite gradient is instead the loss scaler's overflow signal and
    the step is skipped, as the scaler skips the weights' step.

    Scale of ``lam``: ``R_l`` is a mean, so each weight feels a pull
    ``2 · lam / N_l · (θ_i - c_k)``, weaker in bigger layers. Under SGD with learning
    rate ``η`` and momentum ``μ`` the distance to the nearest centroid shrinks by about
    ``η / (1 - μ) · 2 · lam / N_l`` per step, which suggests ``lam`` of the order of
    ``N_l / (η · steps)``; under Adam the pull competes with the task gradient instead.

    A Trainer-free core serves notebooks::

        cb = LearnedCodebook(lam=10.0, bits=2)
        cb.init_codebooks(model)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            cb.step(model)  # adds lam · ∂R/∂θ to the gradients, steps the codebooks
            opt.step()
        cb.snap(model)

    Args:
        lam: strength ``λ`` of the regularizer (dimensionless; ``R_l`` is in squared
            weight units). 0 turns the pull off and freezes the codebooks (their
            gradient is ``lam · ∂R/∂c`` too; Adam's steps do not depend on its scale).
        bits: codebook size as ``K = 2**bits``, in ``[0, 16]``. Set ``bits: null`` to
            give ``k`` instead.
        k: codebook size ``K >= 1`` directly; exclusive with ``bits``.
        k_overrides: per-layer ``K``: regex (``re.search`` on the full parameter name)
            to ``K``; the first matching entry wins, e.g. ``{"fc2": 16}``.
        init: codebook initialisation from the layer's weights: ``"linear"`` (evenly
            spaced over ``[min, max]``), ``"quantile"`` (midpoint quantiles) or
            ``"kmeans"`` (1-D k-means).
        temperature: soft-min temperature relative to the layer: the absolute ``τ_l``
            (squared weight units) is ``temperature · Var(θ_l)``, the variance taken
            when the codebook is initialised and saved with it. 0 (default) is the
            hard minimum; about 1e-3 to 1e-2 gives a soft form close to the hard one.
        codebook_lr: learning rate of the codebooks' optimizer. With ``"adam"`` it is
            about the step of a centroid in weight units per optimizer step.
        codebook_optimizer: ``"adam"`` or ``"sgd"`` (plain, no momentum).
        module_types: class names whose ``weight`` is regularized; ``None`` selects
            ``Conv1d/2d/3d`` and ``Linear`` (see :class:`~sq_lightning.layers.LayerSelector`).
        include: regexes on full parameter names (``re.search``); when given, only the
            matching weights of ``module_types`` are regularized. A pattern that matches no
            weight fails at setup, naming the closest ones.
        exclude: regexes on full parameter names that always deselect (each must match one).
        min_size: parameters with fewer entries are left alone.
        start_epoch: first epoch (0-based) of the active window.
        stop_epoch: first epoch after the window (exclusive); ``None`` runs to the end.
        log_every_n_steps: period, in optimizer steps, of the ``sq/codebook_reg``
            metric (``lam · Σ_l R_l`` before the step); align it with the Trainer's
            ``log_every_n_steps``, which decides when the logger writes.

    Raises:
        ValueError: in ``__init__``, an argument out of range or of the wrong type; in
            ``setup``, no parameter selected, or ``start_epoch`` not below the Trainer's
            ``max_epochs``; when a checkpoint is loaded, codebooks that do not match the
            selected layers or their ``K``.
        RuntimeError: a non-finite weight, gradient or codebook during training, or
            :meth:`snap`/:meth:`step` before any codebook exists.

    Example::

        from lightning.pytorch import Trainer
        from sq_lightning.callbacks.learned_codebook import LearnedCodebook

        codebook = LearnedCodebook(lam=10.0, bits=2, start_epoch=5)
        Trainer(max_epochs=20, callbacks=[codebook]).fit(model, datamodule=dm)
        snapped = codebook.snap(model)  # {name: (centroids, assignments)}
    """

    def __init__(
        self,
        lam: float = 1e-2,
        bits: Optional[int] = 2,
        k: Optional[int] = None,
        k_overrides: dict[str, int] = {},  # noqa: B006 (copied, never mutated; LightningCLI shows it)
        init: Literal["linear", "quantile", "kmeans"] = "kmeans",
        temperature: float = 0.0,
        codebook_lr: float = 1e-3,
        codebook_optimizer: Literal["adam", "sgd"] = "adam",
        module_types: Optional[list[str]] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        min_size: int = 0,
        start_epoch: int = 0,
        stop_epoch: Optional[int] = None,
        log_every_n_steps: int = 50,
    ) -> None:
        check_number("lam", lam, minimum=0.0)
        self.k = _resolve_k(bits, k)
        self.k_overrides = _check_k_overrides(k_overrides)
        if init not in INIT_METHODS:
            raise ValueError(f"`init` must be one of {list(INIT_METHODS)}, got {init!r}.")
        check_number("temperature", temperature, minimum=0.0)
        check_number("codebook_lr", codebook_lr, minimum=0.0, strict=True)
        if codebook_optimizer not in _OPTIMIZERS:
            raise ValueError(f"`codebook_optimizer` must be one of {list(_OPTIMIZERS)}, got {codebook_optimizer!r}.")
        self.window = Window(start_epoch, stop_epoch)
        check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self.lam = float(lam)
        self.bits = bits
        self.init = init
        self.temperature = float(temperature)
        self.codebook_lr = float(codebook_lr)
        self.codebook_optimizer = codebook_optimizer
        self.log_every_n_steps = log_every_n_steps
        self._selector = LayerSelector(module_types, include, exclude, min_size)

        self._k_of: dict[str, int] = {}  # selected parameter name -> K, in model order
        self._centroids: dict[str, Tensor] = {}  # sorted, same order; empty before init
        self._weight_var: dict[str, float] = {}  # Var(θ_l) at init, scales the temperature
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._pending_optimizer_state: Optional[dict[str, Any]] = None  # loaded, not yet placed
        self._steps = 0
        self._last_value: Optional[Tensor] = None

    # ------------------------------------------------------------------ Trainer-free core

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters to regularize; override for the unusual case."""
        return self._selector.select_or_raise(model, owner=type(self).__name__)

    def k_for(self, name: str) -> int:
        """Codebook size of the parameter ``name``: first matching ``k_overrides``, else ``K``."""
        return first_override(self.k_overrides, name, self.k)

    def prepare(self, model: nn.Module) -> None:
        """Chooses the layers and their ``K``; codebooks come with :meth:`init_codebooks`.

        Codebooks already loaded with :meth:`load_state_dict` are checked against the
        selection and moved to their layer's device.
        """
        selected = self.select(model)
        self._k_of = {name: self.k_for(name) for name, _ in selected}
        for name, param in selected:
            if self._k_of[name] > param.numel():
                rank_zero_warn(
                    f"LearnedCodebook: `{name}` has {param.numel()} entries, fewer than its K={self._k_of[name]}: "
                    "some representatives will share values. Lower K with `k_overrides` or raise `min_size`."
                )
        if self._centroids:
            self._check_restored()
            self._place(dict(model.named_parameters()))

    def init_codebooks(self, model: nn.Module) -> dict[str, Tensor]:
        """(Re)initialises every codebook from the current weights; resets the codebook optimizer.

        Returns:
            :meth:`codebooks`.
        """
        if not self._k_of:
            self.prepare(model)
        params = dict(model.named_parameters())
        centroids, weight_var = {}, {}
        for name, k in self._k_of.items():
            w = self._param(params, name, model).detach()
            w = w.full_tensor() if is_sharded(w) else w  # collective: every rank builds the same codebook
            if not bool(torch.isfinite(w).all()):
                raise RuntimeError(f"LearnedCodebook: weight `{name}` holds NaN or inf; cannot build its codebook.")
            centroids[name] = init_centroids(w, k, self.init)
            weight_var[name] = float(w.double().var(correction=0))
        self._centroids, self._weight_var = centroids, weight_var
        self._optimizer, self._pending_optimizer_state = None, None
        self._place(params)
        rank_zero_info(f"LearnedCodebook: initialised {len(centroids)} codebooks from the weights (init={self.init!r})")
        return self.codebooks()

    def step(self, model: nn.Module, skip_nonfinite_grads: bool = False) -> Optional[Tensor]:
        """Adds ``lam · ∂R/∂θ`` to the gradients of ``model`` and steps the codebooks.

        Call it after ``backward`` and before the model's ``optimizer.step()``.

        Args:
            model: the model the codebooks were built for.
            skip_nonfinite_grads: on a non-finite gradient do nothing and return ``None``
                (a loss scaler is about to skip the step) instead of raising.

        Returns:
            ``lam · Σ_l R_l`` before the step (0-dim tensor), or ``None`` when nothing ran.

        Raises:
            RuntimeError: no codebooks yet, or a non-finite weight, gradient or codebook.
        """
        return self._step(model, owned=None, skip_nonfinite_grads=skip_nonfinite_grads)

    def codebooks(self) -> dict[str, Tensor]:
        """Sorted centroids per selected parameter name (copies); empty before initialisation.

        float32 (float64 for float64 layers) on the layer's device. Codebooks just
        loaded from a checkpoint are float64 on the CPU until :meth:`prepare` or the
        Trainer's ``on_fit_start`` places them.
        """
        return {name: c.detach().clone() for name, c in self._centroids.items()}

    @torch.no_grad()
    def snap(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        """Sets every selected weight of ``model`` to its nearest centroid.

        Returns:
            ``{name: (centroids, assignments)}``: the sorted codebook and, per weight
            (the parameter's shape), the index of its centroid.

        Raises:
            RuntimeError: no codebooks yet.
        """
        if not self._centroids:
            raise RuntimeError(
                "LearnedCodebook: `snap` needs codebooks, and none exists yet. Train through the active window "
                "(`start_epoch`) first, or call `init_codebooks(model)`."
            )
        params = dict(model.named_parameters())
        snapped = {}
        for name, c in self._centroids.items():
            param = self._param(params, name, model)
            c = c.detach().to(param.device, _centroid_dtype(param)).clone()
            local = param.to_local() if is_sharded(param) else param
            assignments = nearest_centroid(local, c)
            local.copy_(c[assignments].to(local.dtype))
            if is_sharded(param):  # the whole layer's assignments (collective)
                assignments = shard_spec(param, name).gather(assignments)
            snapped[name] = (c, assignments)
        return snapped

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self.prepare(pl_module)  # selects (patterns checked, not empty) as check_setup does
        if stage == "fit":
            check_window(trainer, type(self).__name__, self.start_epoch, self.stop_epoch, "the regularizer")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._centroids:  # restored from a checkpoint: follow the model to its device
            self._place(dict(pl_module.named_parameters()))

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.is_active(trainer) and not self._centroids:
            self.init_codebooks(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.sanity_checking or not self.is_active(trainer):
            return
        self._run_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        self._run_log(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        opt_state = self._optimizer.state_dict() if self._optimizer is not None else self._pending_optimizer_state
        return {
            "version": _STATE_VERSION,
            "centroids": {name: c.detach().cpu().tolist() for name, c in self._centroids.items()},
            "weight_var": dict(self._weight_var),
            "optimizer": None if opt_state is None else {"kind": self.codebook_optimizer, "state": opt_state},
            "steps": self._steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # float64 holds the saved float32 (or float64) values exactly; `_place` casts.
        centroids = state_dict.get("centroids", {})
        self._centroids = {name: torch.tensor(values, dtype=torch.float64) for name, values in centroids.items()}
        weight_var = state_dict.get("weight_var", {})
        self._weight_var = {name: float(weight_var.get(name, 0.0)) for name in self._centroids}
        self._steps = int(state_dict.get("steps", 0))
        self._optimizer = None
        opt = state_dict.get("optimizer")
        if opt is not None and opt.get("kind") != self.codebook_optimizer:
            rank_zero_warn(
                f"LearnedCodebook: the checkpoint's codebook optimizer is {opt.get('kind')!r}, "
                f"`codebook_optimizer` is {self.codebook_optimizer!r}: its state starts afresh."
            )
            opt = None
        self._pending_optimizer_state = None if opt is None else opt.get("state")
        if self._k_of and self._centroids:  # no codebooks: saved before the window started
            self._check_restored()

    # ------------------------------------------------------------------ internals

    # The hand-off to the snap (sq_lightning.handoff.ClusterSource).
    provides = "centroids"
    start_epoch = property(lambda self: self.window.start_epoch)
    stop_epoch = property(lambda self: self.window.stop_epoch)

    def is_active(self, trainer: Trainer) -> bool:
        """Whether the regularizer acts in the trainer's current epoch."""
        return self.window.covers_epoch(trainer.current_epoch)

    def snap_hint(self) -> SnapHint:
        """The learned codebooks (:meth:`codebooks`; empty before they are initialised) and the
        regularized layers' selection."""
        return SnapHint(centroids=self.codebooks(), selector=self._selector)

    def _check_restored(self) -> None:
        if list(self._centroids) != list(self._k_of):
            raise ValueError(
                f"LearnedCodebook: the checkpoint holds codebooks for {list(self._centroids)}, but the callback "
                f"selects {list(self._k_of)}. Select the same layers as the run that wrote it "
                "(`module_types`, `include`, `exclude`, `min_size`)."
            )
        for name, c in self._centroids.items():
            if c.numel() != self._k_of[name]:
                raise ValueError(
                    f"LearnedCodebook: the checkpoint's codebook of `{name}` has {c.numel()} centroids, but the "
                    f"callback asks for K={self._k_of[name]}. Resume with the same `bits`/`k`/`k_overrides`."
                )

    @staticmethod
    def _param(params: dict[str, nn.Parameter], name: str, model: nn.Module) -> nn.Parameter:
        try:
            return params[name]
        except KeyError:
            raise ValueError(
                f"LearnedCodebook: there is a codebook for `{name}`, which {type(model).__name__} lacks. "
                "Pass the model the codebooks were built for."
            ) from None

    def _place(self, params: dict[str, nn.Parameter]) -> None:
        """Moves codebooks to their layer's device and dtype; (re)builds their optimizer."""
        moved = False
        for name, c in self._centroids.items():
            param = params[name]
            dtype = _centroid_dtype(param)
            if c.device != param.device or c.dtype != dtype:
                self._centroids[name] = c.to(param.device, dtype)
                moved = True
        if self._optimizer is not None and not moved:
            return
        state = self._optimizer.state_dict() if self._optimizer is not None else self._pending_optimizer_state
        tensors = list(self._centroids.values())
        if self.codebook_optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(tensors, lr=self.codebook_lr)
        else:
            optimizer = torch.optim.SGD(tensors, lr=self.codebook_lr)
        if state is not None:
            optimizer.load_state_dict(state)  # casts the moments to each codebook's device
            for group in optimizer.param_groups:
                group["lr"] = self.codebook_lr  # the argument wins over the saved value
        self._optimizer, self._pending_optimizer_state = optimizer, None

    def _tau(self, name: str) -> float:
        return self.temperature * self._weight_var[name]

    def _run_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._centroids:  # resumed mid-epoch from before the window
            self.init_codebooks(pl_module)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Under fp16 AMP an inf gradient is the scaler's overflow signal, not a bug.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._step(pl_module, owned=owned, skip_nonfinite_grads=scaler is not None)

    @torch.no_grad()
    def _step(self, model: nn.Module, owned: Optional[set[int]], skip_nonfinite_grads: bool) -> Optional[Tensor]:
        if not self._centroids:
            raise RuntimeError("LearnedCodebook: `step` needs codebooks; call `init_codebooks(model)` first.")
        params = dict(model.named_parameters())
        self._place(params)
        layers = []
        for name in self._centroids:
            param = self._param(params, name, model)
            if param.grad is not None and (owned is None or id(param) in owned):
                layers.append((name, param))
        if not layers:
            return None
        if self._nonfinite(layers, skip_nonfinite_grads):
            return None
        assert self._optimizer is not None
        total = torch.zeros((), device=layers[0][1].device)
        sharded = []
        for name, param in layers:
            c = self._centroids[name]
            if is_sharded(param):
                sharded.append((name, param))
                continue
            value, grad_theta, grad_c = codebook_regularizer(param, c, self._tau(name), check_finite=False)
            param.grad.add_(grad_theta, alpha=self.lam)
            c.grad = grad_c.mul_(self.lam)
            total += self.lam * value.to(total.device, total.dtype)
        if sharded:
            total += self._step_sharded(sharded).to(total.device, total.dtype)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._sort_codebooks([name for name, _ in layers])
        self._steps += 1
        self._last_value = total
        return total

    def _step_sharded(self, layers: list[tuple[str, nn.Parameter]]) -> Tensor:
        """The regularizer on layers sharded across ranks (FSDP2): each rank takes its slice,
        weighted by its share of the layer, and one all-reduce per shard group sums the
        values and codebook gradients, so every rank steps the same codebooks as one
        process would. Returns ``lam · Σ_l R_l`` of these layers."""
        total = torch.zeros((), dtype=torch.float64, device=layers[0][1].device)
        groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for name, param in layers:
            groups.setdefault(id(shard_group(param, name)), []).append((name, param))
        for items in groups.values():
            partial = []
            for name, param in items:
                local, c = param.to_local(), self._centroids[name]
                share = local.numel() / param.numel()
                if local.numel() == 0:  # more ranks than rows: this rank holds none of the layer
                    value, grad_c = torch.zeros((), dtype=c.dtype, device=c.device), torch.zeros_like(c)
                else:
                    value, grad_theta, grad_c = codebook_regularizer(local, c, self._tau(name), check_finite=False)
                    param.grad.to_local().add_(grad_theta, alpha=self.lam * share)
                partial += [value.reshape(1).double() * share, grad_c.double() * share]
            sums = iter(all_reduce_sum(partial, shard_group(items[0][1], items[0][0])))
            for name, _ in items:
                c = self._centroids[name]
                total += self.lam * next(sums)[0]
                c.grad = next(sums).to(c.dtype).mul_(self.lam)
        return total

    def _nonfinite(self, layers: list[tuple[str, nn.Parameter]], skip_grads: bool) -> bool:
        """Raises on a non-finite weight or codebook, and on a gradient unless ``skip_grads``."""
        local = [(n, p.to_local() if is_sharded(p) else p, p) for n, p in layers]
        checks = [(f"weight `{n}`", t) for n, t, _ in local]
        checks += [(f"codebook of `{n}`", self._centroids[n]) for n, _, _ in local]
        checks += [(f"gradient of `{n}`", p.grad.to_local() if is_sharded(p) else p.grad) for n, _, p in local]
        # One device sync for all layers; find the culprit only on failure.
        finite = torch.stack([torch.isfinite(t).all().to(local[0][1].device) for _, t in checks])
        sharded = [p for _, p in layers if is_sharded(p)]
        if sharded:  # every rank must take the same decision, or the next collective hangs
            group = shard_group(sharded[0])
            finite = all_reduce_sum([finite.double()], group)[0] == group.size()
        if bool(finite.all()):
            return False
        what, _ = checks[int((~finite).nonzero()[0])]
        if what.startswith("gradient") and skip_grads:
            log.debug("LearnedCodebook: %s is non-finite, step skipped (loss scaler overflow).", what)
            return True
        hint = {
            "weight": "Training has diverged: lower the learning rate or `lam`.",
            "codebook": "The codebooks diverged: lower `codebook_lr`.",
            "gradient": "The task loss or `lam` produced it: lower the learning rate or `lam`, or clip gradients.",
        }[what.split(" ")[0]]
        raise RuntimeError(f"LearnedCodebook: {what} holds NaN or inf. {hint}")

    def _sort_codebooks(self, names: list[str]) -> None:
        # A step may swap two neighbours; the optimizer's moments follow their centroid.
        assert self._optimizer is not None
        for name in names:
            c = self._centroids[name]
            order = torch.argsort(c, stable=True)
            c.copy_(c[order])
            for value in self._optimizer.state.get(c, {}).values():
                if isinstance(value, Tensor) and value.shape == c.shape:
                    value.copy_(value[order])

    def _run_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_value is None or trainer.global_step % self.log_every_n_steps != 0:
            return
        pl_module.log("sq/codebook_reg", self._last_value, on_step=True, on_epoch=False)
        self._last_value = None  # once per optimizer step, also under gradient accumulation


def _centroid_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _resolve_k(bits: Optional[int], k: Optional[int]) -> int:
    if (bits is None) == (k is None):
        raise ValueError(
            f"Pass exactly one of `bits` and `k`, got bits={bits!r} and k={k!r}. "
            "To give K directly set `bits=None` (`bits: null` in YAML)."
        )
    if bits is not None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= _MAX_BITS:
            raise ValueError(f"`bits` must be an int in [0, {_MAX_BITS}], got {bits!r}.")
        return 2**bits
    check_int("k", k, minimum=1)
    assert k is not None
    return k


def _check_k_overrides(k_overrides: Any) -> dict[str, int]:
    return check_overrides("k_overrides", k_overrides, "K", 1)
