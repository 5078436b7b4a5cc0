"""Trainer-free soft quantization: per-layer coupling strengths and gradient injection.

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219) adds to the task
loss, for every quantized layer ``l`` with ``N_l`` weights::

    L_C = Σ_l h_l Σ_{i≠j} U_{w_l}(θ_i - θ_j)
    w_l = w · σ_l          σ_l: std of the layer's weights when coupling starts (frozen)
    h_l = h · N_l^(-α)     α = 0.66 by default

(the relative range ``w_l`` and the ``N_l^(-α)`` scaling are the project's definitions,
docs/design.md section 1). :class:`WeightCoupler` holds ``σ_l``, ``w_l``, ``h_l`` and adds
``∂L_C/∂θ`` to ``param.grad``; it works on a plain ``nn.Module`` in a hand-written loop,
and :class:`sq_lightning.callbacks.SoftQuantCallback` drives it from a ``Trainer``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Literal, Optional

import torch
import torch.distributed
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from sq_lightning.layers import LayerSelector
from sq_lightning.ops.coupling import (
    AUTO_EXACT_BELOW,
    DEFAULT_N_BINS,
    coupling_exact,
    coupling_grad_batched,
    layer_strength,
)
from sq_lightning.sharding import all_reduce_sum, is_sharded, shard_group, shard_spec

log = logging.getLogger(__name__)

BackendName = Literal["histogram", "exact", "auto"]


def check_coupling_args(h: float, w: float, alpha: float, n_bins: int, backend: str) -> None:
    """Argument checks shared by :class:`WeightCoupler` and the callback."""
    for name, value in (("h", h), ("w", w), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if h < 0:
        raise ValueError(f"`h` must be >= 0, got {h}. It is the coupling strength; 1e-4 to 2e-3 is typical with SGD.")
    if w <= 0:
        raise ValueError(f"`w` must be > 0, got {w}. It is the well's range relative to the layer's std; try 0.15-0.45.")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 16:
        raise ValueError(f"`n_bins` must be an int >= 16, got {n_bins!r}. The paper uses 16384.")
    if backend not in ("histogram", "exact", "auto"):
        raise ValueError(f"`backend` must be one of 'histogram', 'exact', 'auto', got {backend!r}.")


def _all_reduce(group):
    """``reduce(tensor, op)`` of :func:`coupling_grad_batched` for sharded layers: an
    in-place all-reduce over ``group`` (the communication stays here, out of ``ops``)."""
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}

    def reduce(t: Tensor, op: str) -> None:
        torch.distributed.all_reduce(t, op=ops[op], group=group)

    return reduce


def _std(t: Tensor) -> float:
    """Unbiased std of a whole tensor; a sharded DTensor reduces its moments over the ranks."""
    if not is_sharded(t):
        return float(t.float().std())
    local = t.to_local().double().reshape(-1)
    moments = torch.stack([local.new_tensor(float(local.numel())), local.sum(), (local * local).sum()])
    n, s, ss = all_reduce_sum([moments], shard_group(t))[0].tolist()
    return math.sqrt(max(ss - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0


class WeightCoupler:
    """Adds the coupling gradient of soft quantization to the selected weights.

    Args:
        h: global strength; layer ``l`` gets ``h_l = h · N_l^(-alpha)``.
        w: range of the well relative to the layer's std: ``w_l = w · σ_l``.
        alpha: exponent of the layer-size scaling of ``h_l``.
        n_bins: grid points per layer of the histogram backend.
        backend: ``"histogram"`` (the paper's scheme, all layers in one batched pass),
            ``"exact"`` (sort-based, exact counts), or ``"auto"`` (exact for layers
            under ``AUTO_EXACT_BELOW`` weights, histogram for the rest).
        selector: which parameters are coupled (default: Conv/Linear weights).
        target_step: if set, ``h`` and ``alpha`` are replaced by per-layer strengths
            calibrated once (:meth:`calibrate`) so that the coupling alone moves a
            typical weight of every layer by the same fraction of its well per step:
            ``S_l = lr_eff · RMS(∂L_C/∂θ_l) / w_l = target_step`` with ``lr_eff =
            lr / (1 - momentum)`` of SGD. ``S_l`` near 0.3-0.5 in the largest layer
            marks the onset of chaotic training (docs/design.md section 8).

    Example::

        coupler = WeightCoupler(h=1e-3, w=0.3)
        coupler.prepare(model)           # captures σ_l, w_l, h_l
        loss = criterion(model(x), y)
        loss.backward()
        coupler.add_gradients(model)     # adds ∂L_C/∂θ to every .grad
        optimizer.step()
    """

    def __init__(
        self,
        h: float = 1e-3,
        w: float = 0.3,
        alpha: float = 0.66,
        n_bins: int = DEFAULT_N_BINS,
        backend: BackendName = "auto",
        selector: Optional[LayerSelector] = None,
        target_step: Optional[float] = None,
    ) -> None:
        check_coupling_args(h, w, alpha, n_bins, backend)
        if target_step is not None and (
            isinstance(target_step, bool) or not isinstance(target_step, (int, float))
            or not math.isfinite(target_step) or target_step <= 0
        ):
            raise ValueError(
                f"`target_step` must be a finite number > 0 or None, got {target_step!r}. "
                "It is the coupling step per optimizer step in units of w_l; try 0.02-0.2."
            )
        self.h, self.w, self.alpha, self.n_bins, self.backend = float(h), float(w), float(alpha), n_bins, backend
        self.target_step = None if target_step is None else float(target_step)
        self.selector = selector or LayerSelector()
        self.sigma: dict[str, float] = {}
        self.numel: dict[str, int] = {}
        self.h_calibrated: dict[str, float] = {}
        # Multiplies every h_l (SoftQuantCallback's strength ramp); not saved: the
        # callback recomputes it from its step counter.
        self.scale = 1.0

    # -- set-up ------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        return bool(self.sigma)

    def prepare(self, model: nn.Module) -> dict[str, float]:
        """Captures ``σ_l`` of every selected layer (once; later calls keep the frozen values).

        Layers whose std is 0 or not finite cannot define a range: they are skipped
        with a warning (a zero-initialised layer, for instance).
        """
        if self.prepared:
            return self.sigma
        for name, param in self.selector.select_or_raise(model, type(self).__name__):
            std = _std(param.detach()) if param.numel() > 1 else 0.0
            if not math.isfinite(std) or std <= 0:
                if rank_zero_only.rank == 0:  # every rank holds the same weights: one warning, not one a rank
                    log.warning("soft quantization skips %s: its weights have std %s, so `w_l = w·σ_l` is undefined.", name, std)
                continue
            self.sigma[name] = std
            self.numel[name] = param.numel()
        if not self.sigma:
            raise ValueError("every selected layer has zero or non-finite std: there is nothing to couple.")
        return self.sigma

    def w_l(self, name: str) -> float:
        return self.w * self.sigma[name]

    def h_l(self, name: str) -> float:
        if name in self.h_calibrated:
            return self.scale * self.h_calibrated[name]
        return self.scale * layer_strength(self.h, self.numel[name], self.alpha)

    @property
    def calibrated(self) -> bool:
        return bool(self.h_calibrated)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, lr_eff: float) -> dict[str, float]:
        """Sets every ``h_l`` from ``target_step`` on the current weights (once).

        ``h_l = target_step · w_l / (lr_eff · RMS(g_l))`` with ``g_l`` the coupling
        gradient of layer ``l`` at unit strength, so that ``lr_eff · RMS(h_l g_l) / w_l
        = target_step``. A layer with no pair of weights within ``w_l`` (``g_l = 0``)
        keeps ``h · N_l^(-alpha)``.

        Args:
            model: the model (its selected layers are prepared first if needed).
            lr_eff: the optimizer's effective step size, ``lr / (1 - momentum)`` for SGD.
        """
        if self.target_step is None:
            raise ValueError("`calibrate` needs `target_step`: construct the coupler with target_step=...")
        if not (isinstance(lr_eff, (int, float)) and math.isfinite(lr_eff) and lr_eff > 0):
            raise ValueError(f"`lr_eff` must be a finite number > 0, got {lr_eff!r}.")
        if self.calibrated:
            return self.h_calibrated
        self.prepare(model)
        params = {}
        for name, p in model.named_parameters():
            if name in self.sigma:
                params[name] = p.full_tensor() if is_sharded(p) else p
        unit = {n: 1.0 for n in params}
        self.h_calibrated, scale, self.scale = unit, self.scale, 1.0  # h_l = 1 while measuring
        try:
            _, grads = self.gradients(params)
        finally:
            self.h_calibrated, self.scale = {}, scale
        result = {}
        for name, g in grads.items():
            rms = float(g.double().pow(2).mean().sqrt())
            if rms > 0 and math.isfinite(rms):
                result[name] = self.target_step * self.w_l(name) / (lr_eff * rms)
            else:
                if rank_zero_only.rank == 0:
                    log.warning("target_step: %s has no pair of weights within w_l; it keeps h·N_l^-alpha.", name)
                result[name] = layer_strength(self.h, self.numel[name], self.alpha)
        self.h_calibrated = result
        return result

    def layer_table(self) -> list[dict[str, float]]:
        """One row per coupled layer: name, N_l, σ_l, w_l, h_l."""
        return [
            {"name": n, "numel": self.numel[n], "sigma": s, "w_l": self.w_l(n), "h_l": self.h_l(n)}
            for n, s in self.sigma.items()
        ]

    # -- the step -----------------------------------------------------------------
    def gradients(
        self,
        params: dict[str, Tensor],
        compute_loss: bool = False,
        out: Optional[dict[str, Tensor]] = None,
        strength: Optional[Callable[[str, float], float]] = None,
    ) -> tuple[Optional[dict[str, Tensor]], dict[str, Tensor]]:
        """Coupling gradient (float32) and, on request, loss per layer for ``params``.

        With ``out`` (name -> tensor of the layer's shape, e.g. its ``.grad``), the
        gradient is added into those tensors in place and they are returned.
        With ``strength``, each layer's ``h_l`` is ``strength(name, norm)`` of the norm of
        its gradient at unit strength, measured in the same pass (for the histogram
        backend from the grid: see :func:`~sq_lightning.ops.coupling.coupling_grad_batched`);
        ``h``, ``alpha`` and ``scale`` are then not used.
        """
        names = [n for n in params if n in self.sigma]
        exact_names = [n for n in names if self._exact(n)]
        hist_names = [n for n in names if not self._exact(n)]
        grads: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        if strength is None:
            hist_h = [self.h_l(n) for n in hist_names]
        else:
            def hist_h(units):  # noqa: E306 - the names of this call's histogram layers
                return [strength(n, float(u)) for n, u in zip(hist_names, units)]
        try:
            for n in exact_names:
                if strength is None:
                    res = coupling_exact(params[n], self.w_l(n), self.h_l(n), compute_loss=compute_loss)
                    grads[n] = res.grad
                else:
                    res = coupling_exact(params[n], self.w_l(n), 1.0, compute_loss=compute_loss)
                    h = strength(n, float(res.grad.norm()))
                    grads[n] = res.grad.mul_(h)
                    res = res._replace(loss=None if res.loss is None else res.loss * h)
                if compute_loss:
                    losses[n] = res.loss
            if hist_names:
                loss_vec, hist_grads = coupling_grad_batched(
                    [params[n] for n in hist_names],
                    [self.w_l(n) for n in hist_names],
                    hist_h,
                    n_bins=self.n_bins,
                    compute_loss=compute_loss,
                    per_layer_loss=True,
                    out=None if out is None else [out[n] for n in hist_names],
                )
                grads.update(zip(hist_names, hist_grads))
                if compute_loss:
                    losses.update(zip(hist_names, loss_vec.unbind()))
            if out is not None:
                # Exact layers are added last: every layer was checked (finite weights)
                # before anything is written, so a failure leaves ``out`` untouched.
                for n in exact_names:
                    grads[n] = out[n].add_(grads[n].to(out[n].dtype))
        except ValueError as err:
            bad = [n for n in names if not bool(torch.isfinite(params[n].detach()).all())]
            if bad:
                raise RuntimeError(
                    f"soft quantization found non-finite weights in {bad}: training has diverged. "
                    "Lower the learning rate or `h`; the coupling gradient was not applied."
                ) from err
            raise
        return (losses if compute_loss else None), grads

    @torch.no_grad()
    def add_gradients(
        self,
        model: nn.Module,
        compute_loss: bool = False,
        only: Optional[Iterable[Tensor]] = None,
        strength: Optional[Callable[[str, float], float]] = None,
    ) -> Optional[dict[str, Tensor]]:
        """Adds ``∂L_C/∂θ`` to ``param.grad`` of every coupled layer.

        Parameters whose ``.grad`` is ``None`` (frozen or unused this step) are skipped.
        ``only`` restricts the update to these parameter objects (one optimizer's).
        ``strength``: as in :meth:`gradients` (not for layers sharded by FSDP2).

        Returns:
            per-layer loss values when ``compute_loss`` is set, else ``None``.
        """
        if not self.prepared:
            self.prepare(model)
        allowed = None if only is None else {id(p) for p in only}
        params: dict[str, nn.Parameter] = {}
        for name, p in model.named_parameters():
            if name in self.sigma and p.grad is not None and (allowed is None or id(p) in allowed):
                params[name] = p
        if not params:
            return {} if compute_loss else None
        dense = {n: p for n, p in params.items() if not is_sharded(p)}
        sharded = {n: p for n, p in params.items() if is_sharded(p)}
        losses: dict[str, Tensor] = {}
        if dense:
            dense_losses, _ = self.gradients(dict(dense), compute_loss=compute_loss,
                                             out={n: p.grad for n, p in dense.items()}, strength=strength)
            losses.update(dense_losses or {})
        if sharded:
            if strength is not None:
                raise ValueError("a strength function needs whole layers; these are sharded: " + ", ".join(sharded))
            losses.update(self._add_sharded(sharded, compute_loss))
        return losses if compute_loss else None

    def grad_ratios(self, model: nn.Module, only: Optional[Iterable[Tensor]] = None) -> dict[str, float]:
        """Per layer ``‖∂L_C/∂θ_l‖ / ‖θ_l.grad‖``: how the coupling gradient compares
        with the gradient already in ``.grad`` (the task's, when called before
        :meth:`add_gradients`).

        Far above 1, the coupling rather than the task moves that layer's weights
        (experiments/results/coupling_vs_task.md). Costs one extra coupling gradient.
        Layers without a ``.grad``, with an all-zero one, or sharded as DTensors
        (FSDP2) are left out.
        """
        if not self.prepared:
            self.prepare(model)
        allowed = None if only is None else {id(p) for p in only}
        params = {
            n: p
            for n, p in model.named_parameters()
            if n in self.sigma and p.grad is not None and not is_sharded(p) and (allowed is None or id(p) in allowed)
        }
        if not params:
            return {}
        _, grads = self.gradients({n: p.detach() for n, p in params.items()})
        ratios = {}
        for n, g in grads.items():
            task = float(params[n].grad.detach().float().norm())
            if task > 0.0 and math.isfinite(task):
                ratios[n] = float(g.norm()) / task
        return ratios

    def _exact(self, name: str) -> bool:
        """Whether the backend computes layer ``name`` exactly (else on the histogram)."""
        return self.backend == "exact" or (self.backend == "auto" and self.numel[name] < AUTO_EXACT_BELOW)

    def _add_sharded(self, params: dict[str, nn.Parameter], compute_loss: bool) -> dict[str, Tensor]:
        """DTensor (FSDP2) layers: each rank bins its shard, one all-reduce of the counts.

        Layers the backend computes exactly (``"exact"``, or ``"auto"`` under
        ``AUTO_EXACT_BELOW`` weights) are gathered whole (collective) so that the result
        is the one of a single process; each rank adds its slice of their gradient.
        """
        exact = [n for n in params if self._exact(n)]
        losses: dict[str, Tensor] = {}
        for n in exact:
            res = coupling_exact(params[n].detach().full_tensor(), self.w_l(n), self.h_l(n), compute_loss=compute_loss)
            local = params[n].grad.to_local()
            local.add_(shard_spec(params[n], n).local(res.grad).to(local.dtype))
            if compute_loss:
                losses[n] = res.loss
        names = [n for n in params if n not in exact]
        if not names:
            return losses
        first = params[names[0]]
        group = shard_group(first, names[0])
        loss, grads = coupling_grad_batched(
            [params[n].to_local() for n in names],
            [self.w_l(n) for n in names],
            [self.h_l(n) for n in names],
            n_bins=self.n_bins,
            compute_loss=compute_loss,
            per_layer_loss=True,
            reduce=_all_reduce(group),
        )
        for n, g in zip(names, grads):
            local = params[n].grad.to_local()
            local.add_(g.to(local.dtype))
        if compute_loss:
            losses.update(zip(names, loss.unbind()))
        return losses

    # -- persistence --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sigma": dict(self.sigma), "numel": dict(self.numel), "h_calibrated": dict(self.h_calibrated)}

    def load_state_dict(self, state: dict) -> None:
        self.sigma = {k: float(v) for k, v in state.get("sigma", {}).items()}
        self.numel = {k: int(v) for k, v in state.get("numel", {}).items()}
        self.h_calibrated = {k: float(v) for k, v in state.get("h_calibrated", {}).items()}
