"""Weight-coupling loss of soft quantization.

Bernstein, Di Carlo, Schwab, "Soft Quantization: Model Compression Via Weight
Coupling", arXiv:2601.21219 (2026).

For the weights ``θ`` (N entries) of one layer, with range ``w`` and strength ``h``::

    U_w(x) = (|x| - w) · 1[|x| < w]                  triangular well, depth -w at 0
    L      = h Σ_{i≠j} U_w(θ_i - θ_j)                 ordered pairs, one layer
    ∂L/∂θ_i = 2 h (n_<(i) - n_>(i))                   n_< / n_>: weights within w
                                                      strictly below / above θ_i

Three backends compute the same loss and gradient:

* ``pairwise``: O(N²), blockwise; the reference for tests.
* ``exact``: sort + searchsorted + prefix sums, O(N log N); exact counts and loss.
* ``histogram``: the paper's scheme, O(N + N_b log N_b): the weights are deposited
  linearly ("cloud in cell") on a grid of ``n_bins`` points spanning
  ``[min θ - w, max θ + w]``; the force field is the linear (zero-padded, not
  circular) convolution of that histogram with the odd sign kernel of half-width
  ``w``; the field is interpolated linearly back at each weight. The grid kernel is
  the sign box convolved with the deposit's hat function, so its two edge taps are
  fractional and the result does not jump when ``w`` crosses a bin boundary.

The histogram of several layers is built in one pass (one deposit, one batched
convolution, one gather) by :func:`coupling_grad_batched`: ResNet-sized models have
many small layers and the per-layer Python overhead would dominate otherwise.

The convolution of a sign box is a difference of prefix sums (``conv="prefix"``,
O(N_b)); the FFT route (``conv="fft"``) is the general one and is kept as an
option and as a cross-check. All arithmetic is float32, prefix sums float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed
from torch import Tensor

from sq_lightning.ops import _cpu_kernels, _triton_kernels

Backend = Literal["histogram", "exact", "pairwise"]
Conv = Literal["prefix", "fft"]

DEFAULT_N_BINS = 2**14
# `auto` picks `exact` below this many weights: sorting a small layer costs less than
# touching 2^14 bins (see benchmarks/results/coupling_scaling.md).
AUTO_EXACT_BELOW = 4096


class CouplingResult(NamedTuple):
    """Loss value (0-dim float32 tensor, or ``None`` when not requested) and gradient."""

    loss: Optional[Tensor]
    grad: Tensor


def triangular_well(x: Tensor, w: float) -> Tensor:
    """``U_w(x) = (|x| - w) · 1[|x| < w]``."""
    a = x.abs()
    return torch.where(a < w, a - w, torch.zeros_like(a))


def _check(theta: Tensor, w: float, h: float, name: str = "theta") -> Tensor:
    if not isinstance(theta, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(theta).__name__}.")
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
        raise ValueError(f"`w` must be a finite number > 0, got {w!r}.")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h >= 0):
        raise ValueError(f"`h` must be a finite number >= 0, got {h!r}.")
    flat = theta.detach().reshape(-1).float()
    if flat.numel() and not bool(torch.isfinite(flat).all()):
        raise ValueError(
            f"`{name}` holds non-finite values (NaN or inf): the coupling force is undefined. "
            "Fix the divergence first (lower the learning rate or `h`)."
        )
    return flat


def coupling_pairwise(
    theta: Tensor, w: float, h: float, compute_loss: bool = True, block: int = 2048
) -> CouplingResult:
    """O(N²) reference, ``block`` rows at a time so memory stays ``block * N``."""
    flat = _check(theta, w, h).double()
    n = flat.numel()
    grad = torch.zeros_like(flat)
    loss = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, n, block):
        d = flat[start : start + block, None] - flat[None, :]
        inside = d.abs() < w
        grad[start : start + block] = (torch.sign(d) * inside).sum(1)
        if compute_loss:
            loss += torch.where(inside, d.abs() - w, torch.zeros_like(d)).sum()
    grad = (2.0 * h * grad).to(torch.float32).reshape(theta.shape)
    if not compute_loss:
        return CouplingResult(None, grad)
    # The diagonal i == j adds U(0) = -w per weight: it is not a pair.
    loss = (h * (loss + n * w)).to(torch.float32)
    return CouplingResult(loss, grad)


def _sort_permutation(flat: Tensor) -> Tensor:
    """Permutation that sorts the finite float32 vector ``flat`` ascending.

    The sort runs on int32 keys: torch sorts integers (radix sort) several times faster
    than floats on CPU. Flipping the magnitude bits of negative numbers makes the
    integer order of IEEE bit patterns the float order (``-0.0`` lands just before
    ``+0.0``, which compare equal anyway: ties are counted by value afterwards).
    """
    bits = flat.contiguous().view(torch.int32)
    return torch.sort(bits ^ ((bits >> 31) & 0x7FFFFFFF)).indices


def coupling_exact(theta: Tensor, w: float, h: float, compute_loss: bool = True) -> CouplingResult:
    """Exact counts and loss by sorting, O(N log N)."""
    flat = _check(theta, w, h)
    if flat.numel() == 0:
        return CouplingResult(flat.new_zeros(()) if compute_loss else None, torch.zeros_like(theta, dtype=torch.float32))
    perm = _sort_permutation(flat)
    s = flat.index_select(0, perm)
    # Every count is taken for the sorted weights (sorted queries: searchsorted walks
    # memory in order) and scattered back to the original order at the end.
    # float64 makes |θ_i - θ_j| < w exact for float32 weights: a pair at the edge of the
    # well is decided as the definition says, not by the rounding of θ_i ± w.
    s64 = s.double()
    lo_in = torch.searchsorted(s64, s64 - w, side="right")  # first index with s > θ - w
    eq_lo = torch.searchsorted(s, s, side="left")  # first index with s >= θ
    eq_hi = torch.searchsorted(s, s, side="right")  # first index with s > θ
    hi_in = torch.searchsorted(s64, s64 + w, side="left")  # first index with s >= θ + w
    n_below = eq_lo - lo_in
    n_above = hi_in - eq_hi
    grad_sorted = 2.0 * h * (n_below - n_above).float()
    grad = torch.empty_like(grad_sorted).scatter_(0, perm, grad_sorted).reshape(theta.shape)
    if not compute_loss:
        return CouplingResult(None, grad)
    # Centre before the float64 prefix sums so they do not lose the small differences.
    x = (s - s.mean()).double()
    prefix = torch.nn.functional.pad(torch.cumsum(x, 0), (1, 0))
    sum_below = prefix[eq_lo] - prefix[lo_in]
    sum_above = prefix[hi_in] - prefix[eq_hi]
    n_eq = (eq_hi - eq_lo - 1).double()  # ties other than i itself sit at U(0) = -w
    per_i = (
        n_below.double() * (x - w) - sum_below + sum_above - n_above.double() * (x + w) - w * n_eq
    )
    return CouplingResult((h * per_i.sum()).to(torch.float32), grad)


# ---------------------------------------------------------------------------------
# Histogram backend
# ---------------------------------------------------------------------------------


def _edge_taps(r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Splits the hat-smoothed sign kernel of half-width ``r`` bins into its parts.

    For an integer offset ``j >= 1`` the kernel is ``1 - H(j - r)`` with ``H`` the CDF
    of the unit hat on [-1, 1]: exactly 1 for ``j <= q - 1`` (``q = floor(r)``),
    ``1 - (1 - φ)²/2`` at ``j = q`` and ``φ²/2`` at ``j = q + 1`` (``φ = r - q``), 0
    beyond. Returns ``q`` (long) and the two fractional taps.
    """
    q = torch.floor(r)
    phi = r - q
    return q.long(), 1.0 - 0.5 * (1.0 - phi) ** 2, 0.5 * phi**2


def _force_prefix(hist: Tensor, r: Tensor) -> Tensor:
    """Force of each row of ``hist`` (L, M) by prefix sums, O(M); ``r`` (L,) in bins.

    With ``C(x)`` the cumulative mass of the hat-deposited histogram, the force at grid
    point ``k`` is (mass within ``r`` below) - (mass within ``r`` above)::

        F[k] = 2 C(k) - C(k - r) - C(k + r)

    ``C`` is piecewise quadratic: ``C(i + φ) = P[i] + a(φ) H[i] + b(φ) H[i+1]`` with
    ``P`` the exclusive prefix sum, ``a(φ) = 1/2 + φ - φ²/2`` and ``b(φ) = φ²/2``. The
    fraction of ``k ± r`` is the same for every ``k`` of a row, so each term is one
    vector operation and one gather. This equals convolving with the hat-smoothed sign
    kernel of ``_grid_kernel`` (the FFT route), exactly.
    """
    n_layers, m = hist.shape
    q = torch.floor(r)
    phi = (r - q)[:, None]
    psi = 1.0 - phi
    q = q.long()
    guard = int(q.max()) + 2
    # Integer counts stay exact in float32 up to 2^24 weights a row; beyond, float64.
    dtype = torch.float64 if float(hist.sum(1).max()) > 2**24 else torch.float32
    hp = torch.nn.functional.pad(hist.to(dtype), (guard, guard + 1))
    prefix = torch.cumsum(hp, 1).sub_(hp)
    nxt = hp[:, 1:]
    hp, prefix = hp[:, :-1], prefix[:, :-1]
    # prefix + a·hp + b·nxt, evaluated in that order with one scratch buffer.
    scratch = torch.empty_like(prefix)
    c_plus = torch.mul(hp, 0.5 + phi - 0.5 * phi**2).add_(prefix).add_(torch.mul(nxt, 0.5 * phi**2, out=scratch))
    c_minus = torch.mul(hp, 0.5 + psi - 0.5 * psi**2).add_(prefix).add_(torch.mul(nxt, 0.5 * psi**2, out=scratch))
    c_mid = torch.mul(hp[:, guard : guard + m], 0.5).add_(prefix[:, guard : guard + m])
    # Row l needs C(k ± r) for k = 0..m-1: a contiguous window of its row shifted by
    # its own q. Windows of the flattened rows (unfold: a view) picked by index_select
    # copy m values each; an (L, m) index for gather would cost more than the rest.
    start = torch.arange(n_layers, device=hist.device) * c_plus.shape[1] + guard
    above = c_plus.reshape(-1).unfold(0, m, 1).index_select(0, start + q)
    below = c_minus.reshape(-1).unfold(0, m, 1).index_select(0, start - q - 1)
    return c_mid.mul_(2.0).sub_(below).sub_(above).float()


def _grid_kernel(r: Tensor, half: int, well: bool) -> Tensor:
    """Kernels on integer offsets ``-half..half`` for each row of ``r`` (L,).

    ``well=False``: the hat-smoothed sign box (force). ``well=True``: the triangular
    well ``(|d| - r) 1[|d| < r]`` in bin units, sampled (used for the loss value).
    """
    j = torch.arange(-half, half + 1, device=r.device, dtype=torch.float32)[None, :]
    rr = r[:, None]
    if well:
        a = j.abs()
        return torch.where(a < rr, a - rr, torch.zeros((), device=r.device))
    q, tap_q, tap_q1 = _edge_taps(r)
    a = j.abs()
    mag = torch.where(a <= (q[:, None] - 1).float(), torch.ones((), device=r.device), torch.zeros((), device=r.device))
    mag = torch.where(a == q[:, None].float(), tap_q[:, None].expand_as(mag), mag)
    mag = torch.where(a == (q[:, None] + 1).float(), tap_q1[:, None].expand_as(mag), mag)
    return torch.sign(j) * mag


def _conv_fft(hist: Tensor, kernel: Tensor) -> Tensor:
    """Linear (zero-padded) convolution of each row of ``hist`` (L, M) with ``kernel`` (L, 2J+1)."""
    m = hist.shape[1]
    half = (kernel.shape[1] - 1) // 2
    size = m + kernel.shape[1] - 1
    n_fft = 1 << (size - 1).bit_length()
    spec = torch.fft.rfft(hist, n_fft) * torch.fft.rfft(kernel, n_fft)
    full = torch.fft.irfft(spec, n_fft)
    return full[:, half : half + m]


_LAYOUT_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _index_dtype(n_rows: int, n_bins: int) -> torch.dtype:
    """int32 grid indices while they fit: half the memory traffic of int64 in the
    deposit (``bincount``) and the gather (``index_select``), which both take int32."""
    return torch.int32 if n_rows * n_bins < 2**31 else torch.int64


def _layout(sizes: tuple[int, ...], n_bins: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Layer index of every weight and its row offset ``l * n_bins`` (cached: fixed per model)."""
    key = (sizes, n_bins, str(device))
    hit = _LAYOUT_CACHE.get(key)
    if hit is None:
        if len(_LAYOUT_CACHE) > 64:
            _LAYOUT_CACHE.clear()
        lid = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        hit = _LAYOUT_CACHE[key] = (lid, (lid * n_bins).to(_index_dtype(len(sizes), n_bins)))
    return hit


def _layer_bounds(flat: Tensor, sizes: tuple[int, ...], n_bins: int) -> tuple[Tensor, Tensor]:
    """Per-layer minimum and maximum of the concatenated weights ``flat``."""
    n_layers = len(sizes)
    if n_layers == 1:
        mn, mx = torch.aminmax(flat)
        return mn[None], mx[None]
    if 0 not in sizes and flat.numel() >= 2048 * n_layers:
        # One aminmax per layer (a view each) beats two scatter_reduce passes over all
        # the weights unless the layers are many and small.
        mm = [torch.aminmax(seg) for seg in torch.split(flat, sizes)]
        return torch.stack([m[0] for m in mm]), torch.stack([m[1] for m in mm])
    lid, _ = _layout(sizes, n_bins, flat.device)
    mins = flat.new_full((n_layers,), math.inf).scatter_reduce_(0, lid, flat, "amin")
    maxs = flat.new_full((n_layers,), -math.inf).scatter_reduce_(0, lid, flat, "amax")
    return mins, maxs


def _added_into(out: Optional[list[Tensor]], grads: list[Tensor]) -> list[Tensor]:
    """``grads`` added into ``out`` in place (returns ``out``), or ``grads`` when there is no ``out``."""
    if out is None:
        return grads
    for o, g in zip(out, grads):
        o.add_(g)
    return out


def _check_bounds(mins: Tensor, maxs: Tensor) -> None:
    """Non-finite per-layer extremes mean NaN or inf weights: a clear error naming the layers."""
    if not bool(torch.isfinite(mins).all() and torch.isfinite(maxs).all()):
        _raise_non_finite([i for i in range(mins.numel()) if not (math.isfinite(mins[i].item()) and math.isfinite(maxs[i].item()))])


def _raise_non_finite(bad: list[int]) -> None:
    raise ValueError(
        f"layer(s) {bad} hold non-finite weights (NaN or inf): the coupling force is undefined. "
        "Fix the divergence first (lower the learning rate or `h`)."
    )


def _force(hist: Tensor, r: Tensor, conv: Conv) -> Tensor:
    """Force field of every histogram row at unit strength (prefix sums or FFT)."""
    if conv == "prefix":
        return _force_prefix(hist, r)
    half = int(torch.ceil(r.max()).item()) + 1
    return _conv_fft(hist, _grid_kernel(r, half, well=False))


def _deposit(
    flat: Tensor, sizes: tuple[int, ...], w: Tensor, n_bins: int, bounds: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Linear deposit of every layer of ``flat`` into its own row of an (L, M) histogram.

    ``bounds`` (per-layer min and max) defaults to those of ``flat``; a sharded layer
    passes the bounds of the whole layer so that every rank uses the same grid.

    Returns ``(hist, idx, frac, r, delta)``: ``idx`` is each weight's lower grid point
    with its layer's row offset ``l*M`` added, ``frac`` its position between that point
    and the next, ``r`` the well's half-width in bins and ``delta`` the bin width.
    """
    n_layers = len(sizes)
    mins, maxs = bounds if bounds is not None else _layer_bounds(flat, sizes, n_bins)
    if n_layers > 1:
        lid, offset = _layout(sizes, n_bins, flat.device)
    _check_bounds(mins, maxs)
    lo = mins - w
    inv = (n_bins - 1) / (maxs + w - lo)
    # Few large temporaries on purpose: a fresh N-sized tensor costs page faults about
    # as dear as a pass over it, so t is computed in place and then becomes frac.
    if n_layers == 1:
        t = torch.sub(flat, lo).mul_(inv)
    else:
        t = torch.sub(flat, lo.index_select(0, lid)).mul_(inv.index_select(0, lid))
    idx = t.to(_index_dtype(n_layers, n_bins)).clamp_(0, n_bins - 2)
    frac = t.sub_(idx)
    if n_layers > 1:
        # The row offset goes on the integer index, not on t: float32 cannot hold
        # l*M + fraction precisely once l*M is large.
        idx += offset
    size = n_layers * n_bins
    ones = torch.bincount(idx, minlength=size)
    upper = torch.bincount(idx, weights=frac, minlength=size)
    # Bin k keeps (1 - f) of its own weights and receives f from those of bin k-1.
    hist = ones.to(upper.dtype) - upper
    hist[1:] += upper[:-1]
    return hist.float().view(n_layers, n_bins), idx, frac, w * inv, 1.0 / inv


def _interpolate(table: Tensor, idx: Tensor, frac: Tensor) -> Tensor:
    """Linear interpolation of a flat grid table at ``idx + frac``."""
    slope = torch.zeros_like(table)
    slope[:-1] = table[1:] - table[:-1]
    # index_select, not table[idx]: advanced indexing is several times slower on CPU.
    return table.index_select(0, idx).addcmul_(frac, slope.index_select(0, idx))


def _checked_layer_values(w, h, n_layers: int, device) -> tuple[Tensor, Tensor]:
    """Per-layer ``w`` and ``h`` given as tensors: validated with tensor ops."""
    w_t = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)
    h_t = torch.as_tensor(h, dtype=torch.float32, device=device).reshape(-1)
    if w_t.numel() != n_layers or h_t.numel() != n_layers:
        raise ValueError(
            f"`w` and `h` need one value per layer: got {w_t.numel()} and {h_t.numel()} for {n_layers} layers."
        )
    if not bool((w_t > 0).all()) or not bool(torch.isfinite(w_t).all()):
        raise ValueError(f"`w` must be finite and > 0 for every layer, got {w_t.tolist()}.")
    if not bool((h_t >= 0).all()):
        raise ValueError(f"`h` must be >= 0 for every layer, got {h_t.tolist()}.")
    return w_t, h_t


def coupling_grad_batched(
    params: Sequence[Tensor],
    w: Sequence[float] | Tensor,
    h: Sequence[float] | Tensor,
    n_bins: int = DEFAULT_N_BINS,
    compute_loss: bool = False,
    conv: Conv = "prefix",
    per_layer_loss: bool = False,
    group: Optional[Any] = None,
    sharded: bool = False,
    out: Optional[Sequence[Tensor]] = None,
) -> tuple[Optional[Tensor], list[Tensor]]:
    """Histogram-backend coupling gradient of several layers in one pass.

    One deposit, one batched convolution and one gather serve every layer, so the
    cost does not grow with the number of layers the way a per-layer loop does.

    Args:
        params: the layers' weight tensors (any shapes, one device).
        w: range of the well per layer, in weight units (``w_l``), each > 0.
        h: strength per layer (``h_l``), each >= 0.
        n_bins: grid points per layer (the paper uses 2^14).
        compute_loss: also return the loss (costs one more convolution).
        conv: ``"prefix"`` (prefix-sum differences, O(N_b)) or ``"fft"``.
        per_layer_loss: return the loss of each layer (shape ``(L,)``) instead of the sum.
        sharded: ``params`` are this rank's shards of layers split over the ranks of
            ``group`` (FSDP, DTensor). The histogram is additive: every rank bins its
            shard on the grid of the whole layer (one all-reduce of the per-layer
            min/max), one all-reduce of the ``L x n_bins`` counts gives every rank the
            whole layer's field, and each rank interpolates it at its own weights.
            Communication per call: ``2L + L·n_bins`` floats, whatever the layer size.
            Empty shards are allowed. Needs an initialised ``torch.distributed``.
        group: the process group of ``sharded`` (default: the world).
        out: tensors (one per layer, the params' shapes, e.g. their ``.grad``) the
            gradient is *added* into, in place; they are returned as the gradients.
            Saves a pass and an N-sized temporary per layer.

    On the CPU with numba installed (extra ``fast``), the deposit and the gather run
    as fused kernels (:mod:`sq_lightning.ops._cpu_kernels`), same arithmetic, one
    read of the weights each; on CUDA with Triton, the deposit, the field and the
    gather run as Triton kernels (:mod:`sq_lightning.ops._triton_kernels`); elsewhere
    (and for ``sharded``) as torch operations.

    Returns:
        ``(loss or None, [grad per layer, float32 (or out's), each param's shape])``.
    """
    if not params:
        return (torch.zeros(()) if compute_loss else None), []
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 16:
        raise ValueError(f"`n_bins` must be an int >= 16, got {n_bins!r}.")
    if conv not in ("prefix", "fft"):
        raise ValueError(f"`conv` must be 'prefix' or 'fft', got {conv!r}.")
    device = params[0].device
    # The Triton path reads w and h on the host: no device tensors for it (every step).
    triton_path = not sharded and _triton_kernels.enabled(params)
    w_t = h_t = None
    if not isinstance(w, Tensor) and not isinstance(h, Tensor):
        # Checked on the Python floats: no tensor op (nor device sync) per training step.
        if len(w) != len(params) or len(h) != len(params):
            raise ValueError(f"`w` and `h` need one value per layer: got {len(w)} and {len(h)} for {len(params)} layers.")
        if not all(math.isfinite(x) and x > 0 for x in w):
            raise ValueError(f"`w` must be finite and > 0 for every layer, got {list(w)}.")
        if not all(x >= 0 for x in h):
            raise ValueError(f"`h` must be >= 0 for every layer, got {list(h)}.")
        if not triton_path:
            w_t = torch.tensor(w, dtype=torch.float32, device=device)
            h_t = torch.tensor(h, dtype=torch.float32, device=device)
    else:
        w_t, h_t = _checked_layer_values(w, h, len(params), device)
    sizes = tuple(p.numel() for p in params)
    if 0 in sizes and not sharded:
        raise ValueError(f"layer(s) {[i for i, n in enumerate(sizes) if n == 0]} of `params` are empty: nothing to couple.")
    if out is not None:
        out = list(out)
        if len(out) != len(params) or any(o.shape != p.shape or o.device != p.device for o, p in zip(out, params)):
            raise ValueError("`out` needs one tensor per layer with the layer's shape and device.")
    if triton_path:
        return _batched_triton(params, sizes, w, h, n_bins, compute_loss, conv, per_layer_loss, out)
    if not sharded and _cpu_kernels.enabled(params):
        return _batched_cpu_kernels(params, sizes, w_t, h_t, n_bins, compute_loss, conv, per_layer_loss, out)
    flat = torch.cat([p.detach().reshape(-1) for p in params]).float() if len(params) > 1 else params[0].detach().reshape(-1).float()
    if sharded:
        bounds = _global_bounds(flat, sizes, n_bins, group)
        hist, idx, frac, r, delta = _deposit(flat, sizes, w_t, n_bins, bounds=bounds)
        torch.distributed.all_reduce(hist, group=group)
    else:
        hist, idx, frac, r, delta = _deposit(flat, sizes, w_t, n_bins)
    force = _force(hist, r, conv) * (2.0 * h_t)[:, None]
    grad_flat = _interpolate(force.reshape(-1), idx, frac)
    grads = _added_into(out, [g.view(p.shape) for g, p in zip(torch.split(grad_flat, sizes), params)])
    if not compute_loss:
        return None, grads
    # Potential V = H ⊛ U in bin units, times Δ for weight units; self pairs add N w.
    half = int(torch.ceil(r.max()).item()) + 1
    pot = _conv_fft(hist, _grid_kernel(r, half, well=True)) * delta[:, None]
    v = _interpolate(pot.reshape(-1), idx, frac)
    per_layer = torch.stack([s.double().sum() for s in torch.split(v, sizes)])
    n = torch.tensor(sizes, dtype=torch.float64, device=device)
    if sharded:
        both = torch.cat([per_layer, n])
        torch.distributed.all_reduce(both, group=group)
        per_layer, n = both[: len(sizes)], both[len(sizes) :]
    loss = (h_t.double() * (per_layer + n * w_t.double())).float()
    return (loss if per_layer_loss else loss.sum()), grads


def _batched_cpu_kernels(
    params: Sequence[Tensor],
    sizes: tuple[int, ...],
    w_t: Tensor,
    h_t: Tensor,
    n_bins: int,
    compute_loss: bool,
    conv: Conv,
    per_layer_loss: bool,
    out: Optional[list[Tensor]],
) -> tuple[Optional[Tensor], list[Tensor]]:
    """:func:`coupling_grad_batched` with the fused numba deposit and gather (CPU)."""
    arrays = _cpu_kernels.as_arrays(list(params))
    mm = [torch.aminmax(torch.from_numpy(a)) for a in arrays]
    mins = torch.stack([m[0] for m in mm])
    maxs = torch.stack([m[1] for m in mm])
    _check_bounds(mins, maxs)
    lo = mins - w_t
    inv = (n_bins - 1) / (maxs + w_t - lo)
    hist = _cpu_kernels.deposit(arrays, lo, inv, n_bins).float()
    r = w_t * inv
    force = _force(hist, r, conv) * (2.0 * h_t)[:, None]
    direct = out is not None and all(o.dtype == torch.float32 and o.is_contiguous() for o in out)
    grads = out if direct else [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    _cpu_kernels.gather(arrays, lo, inv, force, grads)
    if not direct:
        grads = _added_into(out, grads)
    if not compute_loss:
        return None, grads
    half = int(torch.ceil(r.max()).item()) + 1
    pot = _conv_fft(hist, _grid_kernel(r, half, well=True)) * (1.0 / inv)[:, None]
    v = [torch.zeros(n, dtype=torch.float32) for n in sizes]
    _cpu_kernels.gather(arrays, lo, inv, pot, v)
    per_layer = torch.stack([x.double().sum() for x in v])
    n = torch.tensor(sizes, dtype=torch.float64)
    loss = (h_t.double() * (per_layer + n * w_t.double())).float()
    return (loss if per_layer_loss else loss.sum()), grads


def _batched_triton(
    params: Sequence[Tensor],
    sizes: tuple[int, ...],
    w: Sequence[float] | Tensor,
    h: Sequence[float] | Tensor,
    n_bins: int,
    compute_loss: bool,
    conv: Conv,
    per_layer_loss: bool,
    out: Optional[list[Tensor]],
) -> tuple[Optional[Tensor], list[Tensor]]:
    """:func:`coupling_grad_batched` with the fused Triton deposit, field and gather (GPU).

    One host synchronization per call (the layers' extremes, needed on the host to
    check them and to place the grids); everything else is queued on the device.
    """
    K = _triton_kernels
    device = params[0].device
    w_np = (w.detach().cpu().numpy() if isinstance(w, Tensor) else np.asarray(w)).astype(np.float32).reshape(-1)
    h_np = (h.detach().cpu().numpy() if isinstance(h, Tensor) else np.asarray(h)).astype(np.float64).reshape(-1)
    flats = K.flat_weights(params)
    mins, maxs = K.bounds(flats)
    bad = K.non_finite(mins, maxs)
    if bad:
        _raise_non_finite(bad)
    lo, inv, r = K.grid_parameters(mins, maxs, w_np, n_bins)
    hist = K.deposit(flats, lo, inv, n_bins)
    if conv == "prefix":
        q, phi = K.edge_split(r)
        force = K.field(hist, q, phi, 2.0 * h_np)
    else:
        r_t = torch.from_numpy(r).to(device)
        force = _force(hist.float(), r_t, conv) * torch.from_numpy(2.0 * h_np).float().to(device)[:, None]
    direct = out is not None and all(o.dtype == torch.float32 and o.is_contiguous() for o in out)
    grads = out if direct else [torch.empty(p.shape, dtype=torch.float32, device=device) for p in params]
    K.gather(flats, lo, inv, force, [g.view(-1) for g in grads], add=direct)
    if out is not None and not direct:
        grads = _added_into(out, grads)
    if not compute_loss:
        return None, grads
    r_t = torch.from_numpy(r).to(device)
    half = int(math.ceil(float(r.max()))) + 1
    pot = _conv_fft(hist.float(), _grid_kernel(r_t, half, well=True)) * torch.from_numpy(1.0 / inv).to(device)[:, None]
    v = [torch.empty(n, dtype=torch.float32, device=device) for n in sizes]
    K.gather(flats, lo, inv, pot, v, add=False)
    per_layer = torch.stack([x.double().sum() for x in v])
    n = torch.tensor(sizes, dtype=torch.float64, device=device)
    h_d = torch.from_numpy(h_np).to(device)
    loss = (h_d * (per_layer + n * torch.from_numpy(w_np.astype(np.float64)).to(device))).float()
    return (loss if per_layer_loss else loss.sum()), grads


def _global_bounds(flat: Tensor, sizes: tuple[int, ...], n_bins: int, group: Optional[Any]) -> tuple[Tensor, Tensor]:
    """Min and max of each whole layer from the shards of every rank (one all-reduce)."""
    n_layers = len(sizes)
    if flat.numel():
        mins, maxs = _layer_bounds(flat, sizes, n_bins)
        bad = flat.new_tensor([0.0 if bool(torch.isfinite(flat).all()) else 1.0])
    else:
        mins = flat.new_full((n_layers,), math.inf)
        maxs = flat.new_full((n_layers,), -math.inf)
        bad = flat.new_zeros(1)
    # MAX of (-min, max, non-finite flag): both extremes and every rank's verdict in one call.
    packed = torch.cat([torch.nan_to_num(-mins), torch.nan_to_num(maxs), bad])
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX, group=group)
    if packed[-1] > 0:
        raise ValueError(
            "a shard of `params` holds non-finite weights (NaN or inf) on some rank: the coupling force is "
            "undefined. Fix the divergence first (lower the learning rate or `h`)."
        )
    return -packed[:n_layers], packed[n_layers : 2 * n_layers]


def coupling_histogram(
    theta: Tensor, w: float, h: float, n_bins: int = DEFAULT_N_BINS, compute_loss: bool = True, conv: Conv = "prefix"
) -> CouplingResult:
    """The paper's histogram + convolution scheme for one layer."""
    _check_scalars(w, h)
    if theta.numel() == 0:
        return CouplingResult(theta.new_zeros((), dtype=torch.float32) if compute_loss else None, torch.zeros_like(theta, dtype=torch.float32))
    loss, grads = coupling_grad_batched([theta], [w], [h], n_bins=n_bins, compute_loss=compute_loss, conv=conv)
    return CouplingResult(loss, grads[0])


def _check_scalars(w: float, h: float) -> None:
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
        raise ValueError(f"`w` must be a finite number > 0, got {w!r}.")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h >= 0):
        raise ValueError(f"`h` must be a finite number >= 0, got {h!r}.")


def coupling(
    theta: Tensor,
    w: float,
    h: float,
    backend: Literal["histogram", "exact", "pairwise", "auto"] = "auto",
    n_bins: int = DEFAULT_N_BINS,
    compute_loss: bool = True,
) -> CouplingResult:
    """Coupling loss and gradient of one layer.

    Args:
        theta: the layer's weights, any shape, dtype and device (computed in float32).
        w: range of the well ``w_l`` in weight units, > 0.
        h: strength ``h_l`` >= 0.
        backend: ``"histogram"``, ``"exact"``, ``"pairwise"``, or ``"auto"``
            (exact below ``AUTO_EXACT_BELOW`` weights, histogram above).
        n_bins: grid points of the histogram backend.
        compute_loss: skip the loss value (the gradient alone is cheaper).

    Returns:
        :class:`CouplingResult` with the gradient in float32 and ``theta``'s shape.

    Raises:
        ValueError: ``w <= 0``, ``h < 0``, unknown backend, non-finite weights.
    """
    if backend == "auto":
        backend = "exact" if theta.numel() < AUTO_EXACT_BELOW else "histogram"
    if backend == "histogram":
        return coupling_histogram(theta, w, h, n_bins=n_bins, compute_loss=compute_loss)
    if backend == "exact":
        return coupling_exact(theta, w, h, compute_loss=compute_loss)
    if backend == "pairwise":
        return coupling_pairwise(theta, w, h, compute_loss=compute_loss)
    raise ValueError(f"`backend` must be one of 'histogram', 'exact', 'pairwise', 'auto', got {backend!r}.")


def layer_strength(h: float, n: int, alpha: float) -> float:
    """``h_l = h · N_l^(-α)`` (project definition, docs/design.md section 1)."""
    return h * float(n) ** (-alpha)
