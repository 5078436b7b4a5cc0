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
many small layers and the per-layer Python overhead would dominate otherwise. One
orchestrator (:func:`_orchestrate`) runs these steps for every device; the kernels
(bounds, deposit, field, gather) are pluggable: numba on the CPU (all torch threads),
Triton on CUDA, torch operations elsewhere. Communication for layers sharded over
ranks is the caller's (the ``reduce`` argument); this module does none.

The convolution of a sign box is a difference of prefix sums (``conv="prefix"``,
O(N_b)); the FFT route (``conv="fft"``) is the general one and is kept as an
option and as a cross-check. All arithmetic is float32, prefix sums float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Optional

import numpy as np
import torch
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
    # float64 prefix sums, as the numba and Triton kernels: the force is a difference
    # of cumulative masses of up to N weights.
    hp = torch.nn.functional.pad(hist.to(torch.float64), (guard, guard + 1))
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


def _raise_non_finite(bad: list[int]) -> None:
    raise ValueError(
        f"layer(s) {bad} hold non-finite weights (NaN or inf): the coupling force is undefined. "
        "Fix the divergence first (lower the learning rate or `h`)."
    )


def _check_bounds(mins: Tensor, maxs: Tensor) -> None:
    """Non-finite per-layer extremes mean NaN or inf weights: a clear error naming the layers."""
    if not bool(torch.isfinite(mins).all() and torch.isfinite(maxs).all()):
        _raise_non_finite([i for i in range(mins.numel()) if not (math.isfinite(mins[i].item()) and math.isfinite(maxs[i].item()))])


def _force(hist: Tensor, r: Tensor, conv: Conv) -> Tensor:
    """Force field of every histogram row at unit strength (prefix sums or FFT)."""
    if conv == "prefix":
        return _force_prefix(hist, r)
    half = int(torch.ceil(r.max()).item()) + 1
    return _conv_fft(hist, _grid_kernel(r, half, well=False))


def _deposit_on_grid(flat: Tensor, sizes: tuple[int, ...], lo: Tensor, inv: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Torch deposit of the concatenated layers ``flat`` on the grids ``lo + k/inv``.

    Returns ``(hist (L, M) float64, idx, frac)``: ``idx`` is each weight's lower grid
    point with its layer's row offset ``l*M`` added, ``frac`` its position between
    that point and the next.
    """
    n_layers = len(sizes)
    # Few large temporaries on purpose: a fresh N-sized tensor costs page faults about
    # as dear as a pass over it, so t is computed in place and then becomes frac.
    if n_layers == 1:
        t = torch.sub(flat, lo).mul_(inv)
    else:
        lid, offset = _layout(sizes, n_bins, flat.device)
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
    hist = ones.to(torch.float64) - upper
    hist[1:] += upper[:-1]
    return hist.view(n_layers, n_bins), idx, frac


def _deposit(
    flat: Tensor, sizes: tuple[int, ...], w: Tensor, n_bins: int, bounds: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Torch deposit with the grid of each layer's own bounds (or of ``bounds``).

    Returns ``(hist (L, M) float32, idx, frac, r, delta)``, ``r`` the well's
    half-width in bins and ``delta`` the bin width.
    """
    mins, maxs = bounds if bounds is not None else _layer_bounds(flat, sizes, n_bins)
    _check_bounds(mins, maxs)
    lo = mins - w
    inv = (n_bins - 1) / (maxs + w - lo)
    hist, idx, frac = _deposit_on_grid(flat, sizes, lo, inv, n_bins)
    return hist.float(), idx, frac, w * inv, 1.0 / inv


def _interpolate(table: Tensor, idx: Tensor, frac: Tensor) -> Tensor:
    """Linear interpolation of a flat grid table at ``idx + frac``."""
    slope = torch.zeros_like(table)
    slope[:-1] = table[1:] - table[:-1]
    # index_select, not table[idx]: advanced indexing is several times slower on CPU.
    return table.index_select(0, idx).addcmul_(frac, slope.index_select(0, idx))


def _checked_layer_values(w, h, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer ``w`` (float32) and ``h`` (float64) on the host, validated."""
    if isinstance(w, Tensor) or isinstance(h, Tensor):
        w_np = np.asarray(torch.as_tensor(w).detach().cpu().double().reshape(-1).numpy())
        h_np = np.asarray(torch.as_tensor(h).detach().cpu().double().reshape(-1).numpy())
    else:
        # Plain floats: checked without any tensor op (nor device sync) per training step.
        w_np = np.asarray(list(w), dtype=np.float64).reshape(-1)
        h_np = np.asarray(list(h), dtype=np.float64).reshape(-1)
    if w_np.size != n_layers or h_np.size != n_layers:
        raise ValueError(f"`w` and `h` need one value per layer: got {w_np.size} and {h_np.size} for {n_layers} layers.")
    if not (np.isfinite(w_np).all() and (w_np > 0).all()):
        raise ValueError(f"`w` must be finite and > 0 for every layer, got {w_np.tolist()}.")
    if not (h_np >= 0).all():
        raise ValueError(f"`h` must be >= 0 for every layer, got {h_np.tolist()}.")
    return w_np.astype(np.float32), h_np


# ---------------------------------------------------------------------------------
# One orchestrator, three kernel sets
# ---------------------------------------------------------------------------------
#
# Every path computes the same steps: per-layer bounds -> grid (host, float32) ->
# deposit -> field -> gather (added into the gradient) [-> loss tail]. A kernel set
# implements five operations on a per-call handle of the layers:
#
#   layers(params) -> handle            flat views, addresses, cached plans
#   bounds(handle) -> (mins, maxs)      float32 numpy (L,); NaN where non-finite
#   deposit(handle, lo, inv, n_bins)    (L, n_bins) float tensor on the device
#   field(handle, hist, q, phi, scale)  (L, n_bins) float32 force (prefix route)
#   gather(handle, lo, inv, table, outs, add) / gather_sum(handle, lo, inv, table)
#
# ``reduce(tensor, op)`` (op "sum" or "max", in place) is the caller's: for layers
# sharded over ranks it is an all-reduce (coupler.py); the orchestrator does no
# communication of its own.

Reduce = Callable[[Tensor, str], None]


class _Handle:
    """Per-call state of the torch kernels."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params
        self.sizes = tuple(p.numel() for p in params)
        self.device = params[0].device
        if len(params) > 1:
            self.flat = torch.cat([p.detach().reshape(-1) for p in params]).float()
        else:
            self.flat = params[0].detach().reshape(-1).float()
        self.idx: Optional[Tensor] = None
        self.frac: Optional[Tensor] = None


class _TorchKernels:
    """Torch operations (any device): the fallback without numba / Triton."""

    name = "torch"
    needs_f32_out = False

    @staticmethod
    def layers(params: Sequence[Tensor]) -> _Handle:
        return _Handle(params)

    @staticmethod
    def bounds(hd: _Handle) -> tuple[np.ndarray, np.ndarray]:
        n = len(hd.sizes)
        if hd.flat.numel() == 0:
            return np.full(n, np.inf, np.float32), np.full(n, -np.inf, np.float32)
        mins, maxs = _layer_bounds(hd.flat, hd.sizes, 0)
        both = torch.stack([mins, maxs]).cpu().numpy().astype(np.float32)
        # NaN propagates through min/max; an inf extreme is non-finite as well.
        return both[0], both[1]

    @staticmethod
    def deposit(hd: _Handle, lo: np.ndarray, inv: np.ndarray, n_bins: int) -> Tensor:
        lo_t = torch.from_numpy(lo).to(hd.device)
        inv_t = torch.from_numpy(inv).to(hd.device)
        hist, hd.idx, hd.frac = _deposit_on_grid(hd.flat, hd.sizes, lo_t, inv_t, n_bins)
        return hist

    @staticmethod
    def field(hd: _Handle, hist: Tensor, q: np.ndarray, phi: np.ndarray, scale: np.ndarray) -> Tensor:
        r = torch.from_numpy((q + phi).astype(np.float32)).to(hist.device)
        return _force_prefix(hist, r).mul_(torch.from_numpy(scale.astype(np.float32)).to(hist.device)[:, None])

    @staticmethod
    def gather(hd: _Handle, lo, inv, table: Tensor, outs: list[Tensor], add: bool) -> None:
        values = _interpolate(table.reshape(-1), hd.idx, hd.frac)
        for o, v in zip(outs, torch.split(values, hd.sizes)):
            if add:
                o.add_(v.view(o.shape))
            else:
                o.copy_(v.view(o.shape))

    @staticmethod
    def gather_sum(hd: _Handle, lo, inv, table: Tensor) -> Tensor:
        values = _interpolate(table.reshape(-1), hd.idx, hd.frac)
        if not values.numel():
            return torch.zeros(len(hd.sizes), dtype=torch.float64, device=hd.device)
        return torch.stack([s.double().sum() for s in torch.split(values, hd.sizes)])


class _NumbaKernels:
    """Fused numba kernels on both (all) cores: :mod:`sq_lightning.ops._cpu_kernels`."""

    name = "numba"
    needs_f32_out = True

    @staticmethod
    def layers(params: Sequence[Tensor]):
        return _cpu_kernels.Layers(list(params))

    bounds = staticmethod(lambda hd: _cpu_kernels.bounds(hd))
    deposit = staticmethod(lambda hd, lo, inv, n_bins: _cpu_kernels.deposit(hd, lo, inv, n_bins))

    @staticmethod
    def field(hd, hist: Tensor, q: np.ndarray, phi: np.ndarray, scale: np.ndarray) -> Tensor:
        return _cpu_kernels.field(hist, q, phi, scale, hd.plan)

    @staticmethod
    def gather(hd, lo, inv, table: Tensor, outs: list[Tensor], add: bool) -> None:
        _cpu_kernels.gather(hd, lo, inv, table, [o.view(-1) for o in outs], add)

    gather_sum = staticmethod(lambda hd, lo, inv, table: _cpu_kernels.gather_sum(hd, lo, inv, table))


class _TritonKernels:
    """Fused Triton kernels (CUDA): :mod:`sq_lightning.ops._triton_kernels`. One host
    synchronization per call (the layers' extremes, needed on the host to check them
    and to place the grids); everything else is queued on the device."""

    name = "triton"
    needs_f32_out = True

    @staticmethod
    def layers(params: Sequence[Tensor]) -> list[Tensor]:
        return _triton_kernels.flat_weights(params)

    @staticmethod
    def bounds(flats: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        mins, maxs = _triton_kernels.bounds(flats)
        return mins.astype(np.float32), maxs.astype(np.float32)

    @staticmethod
    def deposit(flats, lo, inv, n_bins: int) -> Tensor:
        return _triton_kernels.deposit(flats, lo, inv, n_bins)

    @staticmethod
    def field(flats, hist: Tensor, q: np.ndarray, phi: np.ndarray, scale: np.ndarray) -> Tensor:
        return _triton_kernels.field(hist, q, phi, scale)

    @staticmethod
    def gather(flats, lo, inv, table: Tensor, outs: list[Tensor], add: bool) -> None:
        _triton_kernels.gather(flats, lo, inv, table, [o.view(-1) for o in outs], add=add)

    @staticmethod
    def gather_sum(flats, lo, inv, table: Tensor) -> Tensor:
        v = [torch.empty(f.numel(), dtype=torch.float32, device=f.device) for f in flats]
        _triton_kernels.gather(flats, lo, inv, table, v, add=False)
        return torch.stack([x.double().sum() for x in v])


def _kernels_for(params: Sequence[Tensor]):
    """The kernel set that serves these tensors: Triton on CUDA, numba on CPU, else torch."""
    if _triton_kernels.enabled(params):
        return _TritonKernels
    if _cpu_kernels.enabled(params):
        return _NumbaKernels
    return _TorchKernels


def _dist_reduce(group: Optional[Any]) -> Reduce:
    """All-reduce over ``group`` (torch.distributed), for the deprecated ``sharded=True`` form;
    :class:`sq_lightning.coupler.WeightCoupler` passes its own ``reduce``."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    return lambda t, op: dist.all_reduce(t, op=ops[op], group=group)


def coupling_grad_batched(
    params: Sequence[Tensor],
    w: Sequence[float] | Tensor,
    h: Sequence[float] | Tensor | Callable[[np.ndarray], Sequence[float]],
    n_bins: int = DEFAULT_N_BINS,
    compute_loss: bool = False,
    conv: Conv = "prefix",
    per_layer_loss: bool = False,
    group: Optional[Any] = None,
    sharded: bool = False,
    out: Optional[Sequence[Tensor]] = None,
    reduce: Optional[Reduce] = None,
) -> tuple[Optional[Tensor], list[Tensor]]:
    """Histogram-backend coupling gradient of several layers in one pass.

    One deposit, one field and one gather serve every layer, so the cost does not
    grow with the number of layers the way a per-layer loop does.

    Args:
        params: the layers' weight tensors (any shapes, one device).
        w: range of the well per layer, in weight units (``w_l``), each > 0.
        h: strength per layer (``h_l``), each >= 0; or a function of the layers' gradient
            norms at unit strength (float64 array, one per layer) that returns the ``h_l``
            (the relative strength). The norms come from the histogram and the field on the
            grid, ``sqrt(Σ_b c_b F_b²)``, at no extra pass over the weights: that is the
            norm of the field interpolated at each weight up to the interpolation's Jensen
            gap (``Σ_i lerp(F²)(θ_i)`` against ``Σ_i lerp(F)(θ_i)²``).
        n_bins: grid points per layer (the paper uses 2^14).
        compute_loss: also return the loss (costs one more convolution and gather).
        conv: ``"prefix"`` (prefix-sum differences, O(N_b)) or ``"fft"``.
        per_layer_loss: return the loss of each layer (shape ``(L,)``) instead of the sum.
        reduce: ``reduce(tensor, op)`` with ``op`` ``"sum"`` or ``"max"``, in place: set
            when ``params`` are this rank's shards of layers split over ranks (FSDP,
            DTensor), as an all-reduce over their group. The histogram is additive:
            every rank bins its shard on the grid of the whole layer (one ``"max"`` of
            the per-layer extremes), one ``"sum"`` of the ``L x n_bins`` counts gives
            every rank the whole layer's field, and each rank interpolates it at its own
            weights. Empty shards are allowed.
        sharded: the older form of ``reduce``: ``torch.distributed`` all-reduces over
            ``group``.
        group: with ``sharded``, the process group (default: the world).
        out: tensors (one per layer, the params' shapes, e.g. their ``.grad``) the
            gradient is *added* into, in place; they are returned as the gradients.
            Saves a pass and an N-sized temporary per layer.

    The kernels: on the CPU with numba installed (extra ``fast``), fused kernels on
    every torch thread (:mod:`sq_lightning.ops._cpu_kernels`); on CUDA with Triton,
    Triton kernels (:mod:`sq_lightning.ops._triton_kernels`); elsewhere torch
    operations. Same grid and arithmetic on every path (equal up to float rounding).

    Returns:
        ``(loss or None, [grad per layer, float32 (or out's), each param's shape])``.
    """
    if not params:
        return (torch.zeros(()) if compute_loss else None), []
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 16:
        raise ValueError(f"`n_bins` must be an int >= 16, got {n_bins!r}.")
    if conv not in ("prefix", "fft"):
        raise ValueError(f"`conv` must be 'prefix' or 'fft', got {conv!r}.")
    if sharded and reduce is None:
        reduce = _dist_reduce(group)
    if callable(h):
        w_np, _ = _checked_layer_values(w, [0.0] * len(params), len(params))
        h_np = h
    else:
        w_np, h_np = _checked_layer_values(w, h, len(params))
    sizes = tuple(p.numel() for p in params)
    if 0 in sizes and reduce is None:
        raise ValueError(f"layer(s) {[i for i, n in enumerate(sizes) if n == 0]} of `params` are empty: nothing to couple.")
    if out is not None:
        out = list(out)
        if len(out) != len(params) or any(o.shape != p.shape or o.device != p.device for o, p in zip(out, params)):
            raise ValueError("`out` needs one tensor per layer with the layer's shape and device.")
    return _orchestrate(_kernels_for(params), params, sizes, w_np, h_np, n_bins, compute_loss, conv, per_layer_loss, out, reduce)


def _orchestrate(
    K,
    params: Sequence[Tensor],
    sizes: tuple[int, ...],
    w_np: np.ndarray,
    h_np: np.ndarray | Callable[[np.ndarray], Sequence[float]],
    n_bins: int,
    compute_loss: bool,
    conv: Conv,
    per_layer_loss: bool,
    out: Optional[list[Tensor]],
    reduce: Optional[Reduce],
) -> tuple[Optional[Tensor], list[Tensor]]:
    """The one pipeline of :func:`coupling_grad_batched`, on the kernel set ``K``."""
    strength = h_np if callable(h_np) else None
    if strength is not None:
        h_np = np.ones(len(params), dtype=np.float64)  # the field at unit strength, scaled below
    device = params[0].device
    n_layers = len(params)
    hd = K.layers(params)
    mins, maxs = K.bounds(hd)
    if reduce is not None:
        # MAX of (-min, max, non-finite flag): both extremes and every rank's verdict in one call.
        bad = float(not (np.isfinite(mins[np.array(sizes) > 0]).all() and np.isfinite(maxs[np.array(sizes) > 0]).all()))
        packed = torch.from_numpy(np.concatenate([np.nan_to_num(-mins), np.nan_to_num(maxs), [bad]]).astype(np.float32))
        packed = packed.to(device)
        reduce(packed, "max")
        packed = packed.cpu().numpy()
        if packed[-1] > 0:
            raise ValueError(
                "a shard of `params` holds non-finite weights (NaN or inf) on some rank: the coupling force is "
                "undefined. Fix the divergence first (lower the learning rate or `h`)."
            )
        mins, maxs = -packed[:n_layers], packed[n_layers : 2 * n_layers]
    bad_layers = [i for i in range(n_layers) if not (math.isfinite(float(mins[i])) and math.isfinite(float(maxs[i])))]
    if bad_layers:
        _raise_non_finite(bad_layers)
    # The grid of every layer, float32 as on every path: [min - w, max + w], n_bins points.
    lo = (mins - w_np).astype(np.float32)
    inv = (np.float32(n_bins - 1) / (maxs + w_np - lo)).astype(np.float32)
    r = (w_np * inv).astype(np.float32)
    hist = K.deposit(hd, lo, inv, n_bins)
    if reduce is not None:
        reduce(hist, "sum")
    pot = None
    if compute_loss:
        # Potential V = H ⊛ U in bin units, times Δ for weight units (before the field,
        # which may overwrite the histogram in place).
        r_t = torch.from_numpy(r).to(device)
        half = int(math.ceil(float(r.max()))) + 1
        delta = torch.from_numpy((1.0 / inv).astype(np.float32)).to(device)
        pot = _conv_fft(hist.float(), _grid_kernel(r_t, half, well=True)) * delta[:, None]
    counts = None
    if strength is not None:  # the field may overwrite hist; numpy on the CPU (no OpenMP spin before the kernels)
        counts = np.array(hist.detach().float().numpy(), copy=True) if hist.device.type == "cpu" else hist.float().clone()
    scale = 2.0 * h_np
    if conv == "prefix":
        q = np.floor(r.astype(np.float64))
        force = K.field(hd, hist, q, r.astype(np.float64) - q, scale)
    else:
        force = _force(hist.float(), torch.from_numpy(r).to(device), conv) * torch.from_numpy(scale.astype(np.float32)).to(device)[:, None]
    if strength is not None:
        # ‖∂L_C/∂θ_l‖ at h_l = 1 from the grid (linear deposit and interpolation are adjoint).
        if isinstance(counts, np.ndarray):
            f = force.detach().numpy()
            unit = np.sqrt(np.einsum("lb,lb,lb->l", counts, f, f).astype(np.float64))
        else:
            unit = counts.mul_(force).mul_(force).sum(1).double().sqrt().cpu().numpy()
        h_np = np.asarray(strength(unit), dtype=np.float64).reshape(-1)
        if h_np.size != n_layers or not (np.isfinite(h_np).all() and (h_np >= 0).all()):
            raise ValueError(f"the strength function must return one finite h_l >= 0 per layer, got {h_np.tolist()}.")
        if isinstance(counts, np.ndarray) and force.is_contiguous() and force.dtype == torch.float32:
            f *= h_np.astype(np.float32)[:, None]
        else:
            force.mul_(torch.from_numpy(h_np.astype(np.float32)).to(force.device)[:, None])
    direct = out is not None and (not K.needs_f32_out or all(o.dtype == torch.float32 and o.is_contiguous() for o in out))
    if direct:
        grads = out
    else:
        grads = [torch.empty(p.shape, dtype=torch.float32, device=device) for p in params]
    K.gather(hd, lo, inv, force, grads, add=direct)
    if out is not None and not direct:
        grads = _added_into(out, grads)
    if not compute_loss:
        return None, grads
    per_layer = K.gather_sum(hd, lo, inv, pot)
    n = torch.tensor(sizes, dtype=torch.float64, device=device)
    if reduce is not None:
        both = torch.cat([per_layer.to(device), n])
        reduce(both, "sum")
        per_layer, n = both[:n_layers], both[n_layers:]
    h_d = torch.from_numpy(h_np).to(device)
    w_d = torch.from_numpy(w_np.astype(np.float64)).to(device)
    loss = (h_d * (per_layer.to(device) + n * w_d)).float()
    return (loss if per_layer_loss else loss.sum()), grads


def _added_into(out: Optional[list[Tensor]], grads: list[Tensor]) -> list[Tensor]:
    """``grads`` added into ``out`` in place (returns ``out``), or ``grads`` when there is no ``out``."""
    if out is None:
        return grads
    for o, g in zip(out, grads):
        o.add_(g)
    return out


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
    """The orchestrator on the Triton kernels, whatever the device (tests run it under
    Triton's interpreter on CPU tensors)."""
    w_np, h_np = _checked_layer_values(w, h, len(params))
    return _orchestrate(_TritonKernels, params, sizes, w_np, h_np, n_bins, compute_loss, conv, per_layer_loss,
                        None if out is None else list(out), None)


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
