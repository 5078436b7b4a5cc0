"""Post-training 1-D quantizers of a weight tensor to ``K`` levels: HEQ, optimal k-means, uniform.

These are the baselines against which soft quantization (Bernstein, Di Carlo, Schwab,
"Soft Quantization: Model Compression Via Weight Coupling", arXiv:2601.21219) is compared
at the same number of levels ``K_l`` per layer (docs/design.md, section 4). Each quantizer
sees one tensor as a flat list of ``N`` numbers ``θ_1 ≤ ... ≤ θ_N`` (after sorting) and
returns a codebook ``c`` of ``K' ≤ K`` levels and an assignment ``a_i`` per entry.

- **HEQ** (histogram-equalized quantization): ``K`` bins of equal population, bin ``b``
  holding the sorted ranks ``[⌊bN/K⌋, ⌊(b+1)N/K⌋)``; representative = bin mean. The same
  percentile partition as "Balanced Quantization" (Zhou et al., arXiv:1706.07145), here
  without the uniform grid inside the bins.
- **k-means**: the exact minimiser of ``Σ_i (θ_i - c_{a_i})²``. In 1-D optimal clusters
  are contiguous runs of the sorted values, so a dynamic program over split points is
  exact (Wang & Song, "Ckmeans.1d.dp", R Journal 2011); the split points are monotone,
  which lets divide and conquer solve each of the ``K`` rows in ``O(N log N)``
  (Grønlund et al., "Fast Exact k-Means, k-Medians and Bregman Divergence Clustering
  in 1D", arXiv:1701.07204).
- **uniform**: ``K`` levels evenly spaced over ``[min θ, max θ]``, nearest level.

All three return :class:`Quantization` and never produce an empty cluster: ``K' < K``
when the data have fewer than ``K`` distinct values, and in the cases documented on each
function. Inputs of any shape, device and floating dtype are accepted; the arithmetic runs
in float64 (sums of up to millions of squares), HEQ and uniform on the input's device,
k-means on the CPU (its dynamic program is numpy).
"""

from __future__ import annotations

import math
import operator
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Quantization", "heq_quantize", "kmeans_quantize", "quantize", "rtn_bits_per_weight", "rtn_per_channel",
    "uniform_quantize",
]

Method = Literal["heq", "kmeans", "uniform"]

# Above this many ``K x N`` split points the k-means backtracking table would take more
# than 64 MiB (int32), so only every s-th DP row is kept and the rest recomputed.
_MAX_SPLIT_TABLE = 1 << 24


class Quantization(NamedTuple):
    """Result of a 1-D quantizer.

    Attributes:
        centroids: ``[K']`` levels, sorted ascending, distinct, ``K' <= K``. float32
            (float64 when the input is float64, so that no precision is lost).
        assignments: int64 tensor of the input's shape, values in ``[0, K')``; every level
            has at least one member.
        values: ``centroids[assignments]`` cast to the input's dtype and shape.
    """

    centroids: Tensor
    assignments: Tensor
    values: Tensor


def quantize(theta: Tensor, k: int, method: Method) -> Quantization:
    """Quantizes ``theta`` to at most ``k`` levels with the chosen baseline.

    Args:
        theta: floating-point tensor of any shape, finite, non-empty.
        k: maximum number of levels, ``>= 1``.
        method: ``"heq"`` (:func:`heq_quantize`), ``"kmeans"`` (:func:`kmeans_quantize`)
            or ``"uniform"`` (:func:`uniform_quantize`).

    Returns:
        The :class:`Quantization` of ``theta``.

    Raises:
        ValueError: unknown ``method``, ``k < 1``, empty or non-finite ``theta``.
        TypeError: ``theta`` is not a floating-point tensor or ``k`` not an integer.

    Example::

        >>> q = quantize(torch.tensor([0.0, 0.1, 1.0, 1.1]), 2, "kmeans")
        >>> q.centroids
        tensor([0.0500, 1.0500])
    """
    try:
        fn = _METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"`method` must be one of {sorted(_METHODS)}, got {method!r}.") from None
    return fn(theta, k)


def heq_quantize(theta: Tensor, k: int) -> Quantization:
    """Histogram-equalized quantization: ``k`` equal-population bins, each at its mean.

    Bin ``b`` of ``N`` sorted values holds the ranks ``[⌊bN/k⌋, ⌊(b+1)N/k⌋)``.

    Tie rule: equal values always share a bin. A boundary that falls inside a run of equal
    values moves to the nearer end of the run (to its start on a draw), which keeps the
    populations as equal as the ties allow. Two boundaries can then land on the same place
    (one value holds more than about ``N/k`` entries); the empty bin is dropped, so
    ``K' < k`` can happen even with ``k`` or more distinct values. With at most ``k``
    distinct values every value is its own level (exact reconstruction).

    Args:
        theta: floating-point tensor of any shape, finite, non-empty.
        k: number of bins, ``>= 1``.

    Returns:
        The :class:`Quantization` of ``theta``.

    Raises:
        ValueError: ``k < 1``, empty or non-finite ``theta``.
        TypeError: ``theta`` is not a floating-point tensor or ``k`` not an integer.
    """
    k = _check(theta, k)
    x = theta.detach().reshape(-1).to(torch.float64)
    uniq, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    m, n = uniq.numel(), x.numel()
    if m <= k:
        return _finish(theta, uniq, inverse)
    ends = torch.cumsum(counts, 0)  # run r covers sorted ranks [ends[r] - counts[r], ends[r])
    starts = ends - counts
    b = torch.arange(1, k, device=x.device, dtype=torch.int64)
    target = torch.div(b * n, k, rounding_mode="floor")
    run = torch.searchsorted(ends, target, right=True)  # run holding rank `target`
    lo, hi = starts[run], ends[run]
    # Boundary as a run index: runs < boundary go to earlier bins.
    boundary = torch.where(target - lo <= hi - target, run, run + 1)
    boundary = torch.unique(boundary[(boundary > 0) & (boundary < m)])
    cluster_of_run = torch.searchsorted(boundary, torch.arange(m, device=x.device), right=True)
    n_clusters = boundary.numel() + 1
    sums = torch.zeros(n_clusters, dtype=torch.float64, device=x.device)
    sums.index_add_(0, cluster_of_run, uniq * counts)
    pops = torch.zeros(n_clusters, dtype=torch.float64, device=x.device)
    pops.index_add_(0, cluster_of_run, counts.to(torch.float64))
    return _finish(theta, sums / pops, cluster_of_run[inverse])


def kmeans_quantize(theta: Tensor, k: int) -> Quantization:
    """Optimal 1-D k-means: the ``k`` levels with minimum ``Σ_i (θ_i - c_{a_i})²``.

    Exact dynamic program on the sorted distinct values ``u_1 < ... < u_M`` weighted by
    their counts ``w_j`` (merging equal values changes nothing in the objective). With
    prefix sums ``W, S1, S2`` of ``w, w·u, w·u²`` the cost of one cluster holding
    ``u_{j+1..i}`` is ``S2[i] - S2[j] - (S1[i] - S1[j])² / (W[i] - W[j])``, and

        ``D[c][i] = min_{c-1 <= j < i} D[c-1][j] + cost(j, i)``.

    The best ``j`` is non-decreasing in ``i`` (the cost is Monge), so each row is solved
    by divide and conquer, one recursion level at a time as one vectorized numpy pass:
    ``O(k M log M)`` time, ``O(M)`` memory per row. Runs on the CPU whatever the
    input's device.

    With at most ``k`` distinct values every value is its own level (exact
    reconstruction); otherwise exactly ``k`` clusters are returned (an optimal
    solution never leaves one empty).

    Args:
        theta: floating-point tensor of any shape, finite, non-empty.
        k: number of clusters, ``>= 1``.

    Returns:
        The :class:`Quantization` of ``theta``.

    Raises:
        ValueError: ``k < 1``, empty or non-finite ``theta``.
        TypeError: ``theta`` is not a floating-point tensor or ``k`` not an integer.
    """
    k = _check(theta, k)
    x = theta.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)  # numpy 2.0-2.1 return it in x's shape
    if uniq.size <= k:
        return _finish(theta, torch.from_numpy(uniq), torch.from_numpy(inverse))
    starts = _kmeans_starts(uniq, counts.astype(np.float64), k)
    sums = np.add.reduceat(uniq * counts, starts)
    pops = np.add.reduceat(counts, starts)
    cluster_of_run = np.repeat(np.arange(k), np.diff(np.append(starts, uniq.size)))
    return _finish(theta, torch.from_numpy(sums / pops), torch.from_numpy(cluster_of_run[inverse]))


def uniform_quantize(theta: Tensor, k: int) -> Quantization:
    """Uniform min-max quantization: ``k`` evenly spaced levels, nearest one.

    Levels ``L_l = min + l·(max - min)/(k - 1)``, ``l = 0..k-1`` (the last one is exactly
    ``max``); ``k = 1`` gives the single level ``(min + max)/2``. Each entry takes the
    nearest level, an exact midpoint the upper one. Levels that no entry takes are dropped
    from ``centroids`` and the assignments renumbered, so assignments stay dense and no
    cluster is empty (``K' < k`` whenever the data leave a gap wider than a step, and
    ``K' = 1`` when all entries are equal). The levels are grid points, not cluster
    means: reconstruction is exact only for data lying on the grid.

    Args:
        theta: floating-point tensor of any shape, finite, non-empty.
        k: number of levels, ``>= 1``.

    Returns:
        The :class:`Quantization` of ``theta``.

    Raises:
        ValueError: ``k < 1``, empty or non-finite ``theta``.
        TypeError: ``theta`` is not a floating-point tensor or ``k`` not an integer.
    """
    k = _check(theta, k)
    x = theta.detach().reshape(-1).to(torch.float64)
    lo, hi = x.min(), x.max()
    if k == 1 or lo == hi:
        level = ((lo + hi) / 2).reshape(1)
        return _finish(theta, level, torch.zeros_like(x, dtype=torch.int64))
    step = (hi - lo) / (k - 1)
    grid = torch.floor((x - lo) / step + 0.5).to(torch.int64).clamp_(0, k - 1)
    levels = lo + step * torch.arange(k, dtype=torch.float64, device=x.device)
    levels[-1] = hi
    # Renumber the used levels densely: a counting pass, no sort.
    used = torch.bincount(grid, minlength=k) > 0
    rank = torch.cumsum(used, 0) - 1
    return _finish(theta, levels[used], rank[grid])


def rtn_per_channel(theta: Tensor, bits: int) -> Tensor:
    """Round-to-nearest onto a per-output-channel min-max grid of ``2**bits`` levels.

    The standard weight-only baseline for transformers (asymmetric, one scale and one zero
    point per output channel, no training): row ``r`` of ``theta`` viewed as
    ``(out_channels, -1)`` gets the levels ``min_r + q·s_r``, ``q = 0..2**bits - 1``,
    ``s_r = (max_r - min_r) / (2**bits - 1)``, and each entry the nearest level (a
    constant row is kept as it is). Unlike the per-layer quantizers above, a layer holds
    up to ``out_channels · 2**bits`` distinct values: storage is ``bits`` per weight plus
    two scalars per channel (:func:`rtn_bits_per_weight`).

    Args:
        theta: floating-point tensor with at least 1 dimension (dimension 0 = output channels),
            finite, non-empty.
        bits: bits per weight, ``>= 1``.

    Returns:
        The quantized tensor, same shape and dtype.

    Raises:
        ValueError: ``bits < 1``, empty or non-finite ``theta``.
        TypeError: ``theta`` is not a floating-point tensor or ``bits`` not an integer.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"`bits` must be an int, got {bits!r}.")
    if bits < 1:
        raise ValueError(f"`bits` must be >= 1, got {bits}.")
    levels = _check(theta, 2**bits)
    rows = theta.detach().reshape(theta.shape[0] if theta.dim() else 1, -1).to(torch.float64)
    lo, hi = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    step = (hi - lo) / (levels - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.floor((rows - lo) / safe + 0.5).clamp_(0, levels - 1)
    out = torch.where(step > 0, lo + q * step, rows)
    return out.reshape(theta.shape).to(theta.dtype)


def rtn_bits_per_weight(shape: tuple[int, ...], bits: int, scale_bits: int = 16) -> float:
    """Storage of :func:`rtn_per_channel` per weight: ``bits`` plus a scale and a zero point of
    ``scale_bits`` each per output channel, spread over the channel's weights."""
    per_channel = math.prod(shape[1:]) if len(shape) > 1 else 1
    return bits + 2 * scale_bits / per_channel


_METHODS = {"heq": heq_quantize, "kmeans": kmeans_quantize, "uniform": uniform_quantize}


def _check(theta: Tensor, k: int) -> int:
    if not isinstance(theta, Tensor):
        raise TypeError(f"`theta` must be a torch.Tensor, got {type(theta).__name__}.")
    if not theta.is_floating_point():
        raise TypeError(f"`theta` must be a floating-point tensor, got dtype {theta.dtype}.")
    if isinstance(k, bool):
        raise TypeError(f"`k` must be an int, got {k!r}.")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"`k` must be an int, got {type(k).__name__} {k!r}.") from None
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    if theta.numel() == 0:
        raise ValueError(f"`theta` must not be empty, got shape {tuple(theta.shape)}.")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(
            "`theta` must be finite, got NaN or inf entries. Check the weights (a diverged run?) before quantizing."
        )
    return k


def _finish(theta: Tensor, centroids: Tensor, assignments: Tensor) -> Quantization:
    """Packs float64 levels and flat cluster ids into a :class:`Quantization` of ``theta``."""
    # Rounding to float32 is monotone and the levels are means of disjoint sorted runs of
    # values that are themselves at least float32-spaced, so they stay strictly increasing.
    cdtype = torch.float64 if theta.dtype == torch.float64 else torch.float32
    centroids = centroids.to(device=theta.device, dtype=cdtype)
    assignments = assignments.to(device=theta.device, dtype=torch.int64).reshape(theta.shape)
    values = centroids[assignments].to(theta.dtype)
    return Quantization(centroids, assignments, values)


def _kmeans_starts(u: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Start indices (first is 0) of the ``k`` optimal contiguous clusters of ``u``.

    Args:
        u: sorted distinct values, float64, ``len(u) > k``.
        w: their positive weights (counts).
        k: number of clusters.
    """
    m = u.size
    # Centring keeps the prefix sums small: S2[i] - S2[j] then loses fewer digits.
    x = u - np.dot(w, u) / w.sum()
    W = np.concatenate(([0.0], np.cumsum(w)))
    S1 = np.concatenate(([0.0], np.cumsum(w * x)))
    S2 = np.concatenate(([0.0], np.cumsum(w * x * x)))
    with np.errstate(divide="ignore", invalid="ignore"):
        first = S2 - S1 * S1 / W
    first[0] = np.inf
    if k == 1:
        return np.zeros(1, dtype=np.int64)

    def row(state: tuple[np.ndarray, np.ndarray], c: int) -> tuple[np.ndarray, np.ndarray]:
        # Row c only needs prefixes that leave >= 1 value for each of the k - c later clusters;
        # the last row is only read at i = m (all values, k clusters).
        return _dp_row(*state, W, S1, S2, q_lo=c if c < k else m, q_hi=m - (k - c), j_lo=c - 1)

    store_all = k * (m + 1) <= _MAX_SPLIT_TABLE
    stride = k if store_all else max(1, math.isqrt(k))
    state = (first, np.zeros(m + 1, dtype=np.int64))  # (D[c], split points of row c)
    checkpoints = {1: state}
    splits: dict[int, np.ndarray] = {}
    for c in range(2, k + 1):
        state = row(state, c)
        if store_all:
            splits[c] = state[1]
        elif (c - 1) % stride == 0:
            checkpoints[c] = state

    starts = np.zeros(k, dtype=np.int64)
    i = m
    for base in sorted(checkpoints, reverse=True):
        top = k if store_all else min(base + stride, k)
        if not store_all:
            # Recompute this block's rows from its checkpoint, keeping their split points.
            splits, state = {}, checkpoints[base]
            for c in range(base + 1, top + 1):
                state = row(state, c)
                splits[c] = state[1]
        for c in range(top, base, -1):
            i = int(splits[c][i])
            starts[c - 1] = i
        if store_all:
            break
    return starts


def _dp_row(
    prev: np.ndarray,
    floor: np.ndarray,
    W: np.ndarray,
    S1: np.ndarray,
    S2: np.ndarray,
    q_lo: int,
    q_hi: int,
    j_lo: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One row ``D[c][i] = min_j D[c-1][j] + cost(j, i)`` for ``i`` in ``[q_lo, q_hi]``.

    Divide and conquer on the monotone argmin, breadth first: every pending interval of
    queries evaluates its middle query against its whole candidate range in one flat
    vectorized pass, then splits the candidate range at the argmin for its two halves.
    Each level touches ``O(M)`` candidates and there are ``log2 M`` levels.

    ``floor[i]`` is row ``c-1``'s split point for prefix ``i``: with one cluster more the
    last cluster can only start later (``opt[c-1][i] <= opt[c][i]``, the cost being
    Monge), which prunes the upper levels, where few queries face long ranges. It halves
    the candidates evaluated at ``k = 256``.

    Args:
        prev: ``D[c-1]``, length ``M + 1``, ``inf`` where undefined.
        floor: split points of row ``c-1`` (0 where undefined: no bound).
        W: prefix sums of the weights, length ``M + 1``; ``S1``, ``S2`` likewise of
            ``w·x`` and ``w·x²``.
        q_lo: first prefix length queried.
        q_hi: last prefix length queried.
        j_lo: smallest admissible split point.

    Returns:
        ``(D, best)``, both of length ``M + 1``; ``D`` is ``inf`` outside the queried range.
    """
    size = prev.size
    A = prev - S2  # S2[i] is common to all candidates of a query: added back at the end
    D = np.full(size, np.inf)
    best_of = np.zeros(size, dtype=np.int32 if size < 2**31 else np.int64)
    ql, qh = np.array([q_lo]), np.array([q_hi])
    ol, oh = np.array([j_lo]), np.array([q_hi - 1])
    while ql.size:
        mid = (ql + qh) >> 1
        hi = np.minimum(oh, mid - 1)
        # The clamp only guards against rounding breaking the bound; it never binds exactly.
        lo = np.minimum(np.maximum(ol, floor[mid]), hi)
        lens = hi - lo + 1
        offsets = np.zeros_like(lens)
        np.cumsum(lens[:-1], out=offsets[1:])
        seg = np.repeat(np.arange(lens.size), lens)  # query slot of each flat candidate
        j = np.arange(seg.size)
        j += (lo - offsets)[seg]
        d1 = S1[mid][seg]
        d1 -= S1[j]
        np.square(d1, out=d1)
        den = W[mid][seg]
        den -= W[j]
        d1 /= den
        val = A[j]
        val -= d1
        mins = np.minimum.reduceat(val, offsets)
        # The first candidate reaching the minimum: the smallest argmin keeps splits monotone.
        hit = np.flatnonzero(val == mins[seg])
        best = j[hit[np.searchsorted(hit, offsets)]]
        D[mid] = mins + S2[mid]
        best_of[mid] = best
        left, right = ql < mid, mid < qh
        ql, qh = np.concatenate((ql[left], mid[right] + 1)), np.concatenate((mid[left] - 1, qh[right]))
        ol, oh = np.concatenate((ol[left], best[right])), np.concatenate((best[left], oh[right]))
    return D, best_of
