"""Codebook regularizer with learnable representatives (method B).

Malchiodi, Frasca, Ferraretto, "Quantization-Aware Regularizers for Deep Neural
Networks Compression", arXiv:2602.03614 (2026). Only the abstract is public: per-layer
regularization terms drive the weights into clusters during training, and the
quantization representatives are learned by backpropagation. The formulas below are
this project's definition (``docs/design.md`` section 3), not the paper's.

For the weights ``θ`` (N entries, any shape, flattened) of one layer and its
codebook ``c`` (K representatives), with ``d_ik = (θ_i - c_k)^2``::

    hard (τ = 0):  R = 1/N Σ_i min_k d_ik
    soft (τ > 0):  R = 1/N Σ_i softmin_τ(d_i),   softmin_τ(d) = -τ log Σ_k exp(-d_k / τ)

    hard:  ∂R/∂θ_i = 2/N (θ_i - c_a(i))            a(i) = argmin_k d_ik
           ∂R/∂c_k = -2/N Σ_{i: a(i)=k} (θ_i - c_k)
    soft:  p_ik = softmax_k(-d_ik / τ)
           ∂R/∂θ_i = 2/N Σ_k p_ik (θ_i - c_k)
           ∂R/∂c_k = -2/N Σ_i p_ik (θ_i - c_k)

``τ`` has the units of ``d``: squared weight units. ``min_k d - τ log K <= softmin_τ(d)
<= min_k d``; it tends to the hard minimum as ``τ -> 0``. The soft form is close to
the hard one when ``τ`` is well below ``(Δc / 2)^2``, Δc the spacing of neighbouring
centroids, so a scale-free choice is ``τ = t · Var(θ)`` with ``t`` around 1e-3 to 1e-2
(what :class:`~sq_lightning.callbacks.learned_codebook.LearnedCodebook` does).

Ties (a weight exactly halfway between two centroids, or duplicate centroids) are
broken toward the smaller centroid value, then toward the lower index: the subgradient
``torch.min`` picks on a sorted codebook.

Memory is O(N + K): the hard form sorts the codebook and finds each weight's nearest
centroid with ``torch.searchsorted`` (it is one of the two neighbours of its insertion
point); the soft form walks the weights in chunks of about 2^22 weight-centroid pairs
and never builds the N x K matrix of a whole layer. Arithmetic is float32 (float64
when an input is float64), sums over the weights are accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from sq_lightning.ops.baselines import kmeans_quantize

__all__ = ["CodebookResult", "codebook_regularizer", "init_centroids", "nearest_centroid"]

InitMethod = Literal["linear", "quantile", "kmeans"]
INIT_METHODS = ("linear", "quantile", "kmeans")

# Upper bound on chunk_rows * K for the soft form: a few float32 buffers of this size
# (16 MiB each) are alive at a time, whatever the layer size.
_CHUNK_ELEMENTS = 2**22
# The exact k-means (a CPU dynamic program, O(k N log N)) takes about 2 s at k N = 2^22
# on one core and minutes at 2^28; above this budget Lloyd iterations from quantile
# seeds take over (same result at small k, within a few times the optimal error at
# k = 256, and the codebook is trained afterwards anyway).
_EXACT_KMEANS_BUDGET = 2**22
_LLOYD_ITERS = 50


class CodebookResult(NamedTuple):
    """Regularizer value (0-dim tensor, float32 or float64) and its two gradients.

    ``grad_theta`` has the shape, dtype and device of ``theta``; ``grad_centroids``
    those of ``centroids``.
    """

    value: Tensor
    grad_theta: Tensor
    grad_centroids: Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tensor(x: Tensor, name: str, check_finite: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(x.shape)}.")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"`{name}` holds non-finite values (NaN or inf): the regularizer is undefined. "
            "Fix the divergence first (lower the learning rate or `lam`)."
        )


def _nearest_sorted(t: Tensor, c_sorted: Tensor) -> Tensor:
    """Index into ascending ``c_sorted`` of the nearest centroid of each entry of 1-D ``t``.

    Ties go to the smaller value, duplicates to their first occurrence.
    """
    k = c_sorted.numel()
    if k == 1:
        return torch.zeros(t.shape, dtype=torch.int32, device=t.device)
    # pos: first centroid >= t; the nearest one is c[pos - 1] or c[pos]. int32 indices
    # (K is small) halve the memory of the N-sized temporaries.
    pos = torch.searchsorted(c_sorted, t, out_int32=True)
    lo = (pos - 1).clamp_(0, k - 1)
    hi = pos.clamp_(0, k - 1)
    pick_hi = (c_sorted[hi] - t).abs() < (t - c_sorted[lo]).abs()
    idx = torch.where(pick_hi, hi, lo)
    # `lo` may be the last copy of a duplicated value: map every index to the first copy.
    first = torch.searchsorted(c_sorted, c_sorted, out_int32=True)
    return first[idx]


def _sorted_codebook(centroids: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    c = centroids.detach().reshape(-1).to(device=device, dtype=dtype)
    # Stable, so duplicates keep their original order (lower original index first).
    return torch.sort(c, stable=True)


def codebook_regularizer(
    theta: Tensor,
    centroids: Tensor,
    temperature: float = 0.0,
    *,
    check_finite: bool = True,
) -> CodebookResult:
    """Value and closed-form gradients of ``R`` (module docstring) for one layer.

    Args:
        theta: the layer's weights, any shape, dtype and device.
        centroids: the ``K`` representatives (flattened if not 1-D), any order.
        temperature: ``τ`` in squared weight units; 0 selects the hard minimum.
        check_finite: verify that both inputs are finite (one device sync each); a
            caller that has checked already may pass ``False``.

    Returns:
        ``CodebookResult(value, grad_theta, grad_centroids)``; unpacks as a 3-tuple.

    Raises:
        ValueError: empty ``theta`` or ``centroids``, non-finite values, or a negative
            or non-finite ``temperature``.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
    _check_tensor(theta, "theta", check_finite)
    _check_tensor(centroids, "centroids", check_finite)
    dtype = _compute_dtype(theta, centroids)
    t = theta.detach().reshape(-1).to(dtype)
    c_sorted, perm = _sorted_codebook(centroids, dtype, t.device)
    if temperature == 0:
        value, g_t, g_c_sorted = _hard(t, c_sorted)
    else:
        value, g_t, g_c_sorted = _soft(t, c_sorted, float(temperature))
    g_c = torch.empty_like(g_c_sorted).scatter_(0, perm, g_c_sorted)
    return CodebookResult(
        value=value,
        grad_theta=g_t.reshape(theta.shape).to(theta.dtype),
        grad_centroids=g_c.reshape(centroids.shape).to(device=centroids.device, dtype=centroids.dtype),
    )


def _hard(t: Tensor, c_sorted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = t.numel()
    idx = _nearest_sorted(t, c_sorted)
    diff = t - c_sorted[idx]
    value = diff.square().sum(dtype=torch.float64).div(n).to(t.dtype)
    grad_t = diff.mul(2.0 / n)
    sums = torch.zeros(c_sorted.numel(), dtype=torch.float64, device=t.device)
    sums.index_add_(0, idx, diff.to(torch.float64))
    grad_c = sums.mul_(-2.0 / n).to(t.dtype)
    return value, grad_t, grad_c


def _soft(t: Tensor, c_sorted: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    n, k = t.numel(), c_sorted.numel()
    rows = max(1, _CHUNK_ELEMENTS // k)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    grad_c = torch.zeros(k, dtype=torch.float64, device=t.device)
    grad_t = torch.empty_like(t)
    for start in range(0, n, rows):
        tc = t[start : start + rows]
        diff = tc[:, None] - c_sorted[None, :]
        logits = diff.square().div_(-tau)
        total += torch.logsumexp(logits, dim=1).sum(dtype=torch.float64)
        p = torch.softmax(logits, dim=1)
        pd = p.mul_(diff)
        grad_t[start : start + rows] = pd.sum(dim=1)
        grad_c += pd.sum(dim=0, dtype=torch.float64)
    value = total.mul(-tau / n).to(t.dtype)
    return value, grad_t.mul_(2.0 / n), grad_c.mul_(-2.0 / n).to(t.dtype)


def nearest_centroid(theta: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every weight.

    Args:
        theta: weights, any shape.
        centroids: the ``K`` representatives (flattened if not 1-D), any order.

    Returns:
        A LongTensor of ``theta``'s shape indexing ``centroids.reshape(-1)`` (ties as in
        the module docstring), so ``centroids.reshape(-1)[nearest_centroid(θ, c)]`` is
        the snapped layer.

    Raises:
        ValueError: ``centroids`` is empty.
    """
    _check_tensor(centroids, "centroids", check_finite=False)
    dtype = _compute_dtype(theta, centroids)
    t = theta.detach().reshape(-1).to(dtype)
    c_sorted, perm = _sorted_codebook(centroids, dtype, t.device)
    return perm[_nearest_sorted(t, c_sorted)].reshape(theta.shape)


def init_centroids(theta: Tensor, k: int, method: InitMethod = "kmeans") -> Tensor:
    """Initial codebook of ``k`` centroids from a layer's weights, sorted ascending.

    Methods:

    * ``linear``: ``k`` evenly spaced levels over ``[min θ, max θ]`` (endpoints
      included; the midpoint for ``k = 1``).
    * ``quantile``: the midpoint quantiles ``(j + 1/2) / k``, j = 0..k-1, of the
      weights (the median of each equal-population bin).
    * ``kmeans``: 1-D k-means (least squared distance): the exact optimum of
      :func:`~sq_lightning.ops.baselines.kmeans_quantize` when ``k · N <= 2^22``,
      else up to 50 Lloyd iterations seeded by the quantile levels (a centroid that
      loses all its weights stays where it is).

    Args:
        theta: the layer's weights, any shape.
        k: number of centroids, >= 1.
        method: one of the above.

    Returns:
        A 1-D tensor of ``k`` values (float32, float64 for float64 input) on
        ``theta``'s device. Several may coincide when ``theta`` has fewer than ``k``
        distinct values.

    Raises:
        ValueError: ``k < 1``, an unknown ``method``, empty or non-finite ``theta``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}.")
    if method not in INIT_METHODS:
        raise ValueError(f"`method` must be one of {list(INIT_METHODS)}, got {method!r}.")
    _check_tensor(theta, "theta", check_finite=True)
    t = theta.detach().reshape(-1).to(_compute_dtype(theta))
    if method == "linear":
        lo, hi = t.min(), t.max()
        if k == 1:
            return ((lo + hi) / 2).reshape(1)
        levels = torch.linspace(0.0, 1.0, k, dtype=t.dtype, device=t.device) * (hi - lo) + lo
        return levels.clamp_(lo, hi)  # rounding may step past max θ
    if method == "kmeans" and k * t.numel() <= _EXACT_KMEANS_BUDGET:
        return _pad(kmeans_quantize(t, k).centroids, k)
    t_sorted = t.sort().values
    c = _quantile_levels(t_sorted, k)
    if method == "kmeans":
        c = _lloyd(t_sorted, c, _LLOYD_ITERS)
    return c


def _pad(c: Tensor, k: int) -> Tensor:
    """Repeats levels, evenly, up to ``k`` (fewer distinct weights than ``k``)."""
    return c[torch.arange(k, device=c.device) * c.numel() // k]


def _quantile_levels(t_sorted: Tensor, k: int) -> Tensor:
    n = t_sorted.numel()
    # torch.quantile refuses inputs above 2^24 entries; on sorted data an index does it.
    idx = (torch.arange(k, device=t_sorted.device) * 2 + 1) * n // (2 * k)
    return t_sorted[idx.clamp_(max=n - 1)]


def _lloyd(t_sorted: Tensor, c: Tensor, iters: int) -> Tensor:
    for _ in range(iters):
        idx = _nearest_sorted(t_sorted, c)
        sums = torch.zeros(c.numel(), dtype=torch.float64, device=c.device).index_add_(0, idx, t_sorted.double())
        counts = torch.bincount(idx, minlength=c.numel())
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).to(c.dtype)
        # An emptied centroid keeps its old value, which may now be out of order.
        new = new.sort().values
        if torch.equal(new, c):
            break
        c = new
    return c
