"""1-D cluster discovery, merging and snapping of one layer's weights.

After soft quantization (arXiv:2601.21219) the weights of a layer sit in a few tight
groups separated by gaps of about the well's range ``w_l``. A group is found by
sorting the weights and splitting wherever two neighbours are more than ``gap``
apart; groups smaller than a minimum population can then be merged into their
nearest neighbour (the paper reassigns small clusters this way). Every weight is
snapped to its group's mean.

Bit-width of a layer with ``K`` clusters: ``b = log2 K`` (0 for one cluster); storing
the indices takes ``ceil(log2 K)`` bits per weight. The Shannon entropy of the
cluster populations, ``H = -Σ p_k log2 p_k`` with ``p_k = n_k / N``, is at most
``log2 K`` and is what an entropy coder (Huffman, arithmetic coding) needs per index:
clusters of very unequal size store in fewer bits than ``log2 K``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from sq_lightning.ops.codebook import nearest_centroid

MergePolicy = Literal["storage", "all", "none"]


@dataclass
class Clusters:
    """Result of clustering one layer.

    Attributes:
        centroids: float32 (K,), ascending: the mean of each cluster's members.
        assignments: int64, the layer's shape: cluster index of every weight.
        counts: int64 (K,): members per cluster.
    """

    centroids: Tensor
    assignments: Tensor
    counts: Tensor

    @classmethod
    def from_quantization(cls, q, device: Optional[torch.device] = None) -> "Clusters":
        """The clusters of a 1-D quantizer's result (:class:`~sq_lightning.ops.baselines.Quantization`:
        its ``centroids`` and ``assignments``), on ``device`` (default: the assignments')."""
        assignments = q.assignments if device is None else q.assignments.to(device)
        counts = torch.bincount(assignments.reshape(-1), minlength=q.centroids.numel())
        return cls(q.centroids.to(device=assignments.device, dtype=torch.float32), assignments, counts)

    @property
    def k(self) -> int:
        return int(self.centroids.numel())

    @property
    def bits(self) -> float:
        """``log2 K`` (0 for a single cluster)."""
        return math.log2(self.k) if self.k > 1 else 0.0

    @property
    def entropy(self) -> float:
        """Shannon entropy of the cluster populations, bits per weight (``<= log2 K``)."""
        return entropy_bits(self.counts)

    @property
    def storage_bits(self) -> int:
        """``ceil(log2 K)``: bits per stored index."""
        return math.ceil(math.log2(self.k)) if self.k > 1 else 0

    def to(self, device: torch.device | str, copy: bool = False) -> "Clusters":
        """The same clusters on ``device``, as a new ``Clusters``; its tensors are this one's where
        they are on ``device`` already, unless ``copy`` (as :meth:`torch.Tensor.to`)."""
        return Clusters(*(t.to(device, copy=copy) for t in (self.centroids, self.assignments, self.counts)))

    def values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The snapped weights ``centroids[assignments]``."""
        return self.centroids[self.assignments].to(dtype)

    def snap_error(self, theta: Tensor) -> float:
        """Relative snap error ``‖θ - snap(θ)‖ / ‖θ‖`` (0 for an all-zero layer)."""
        t = theta.detach().double()
        norm = float(t.norm())
        return float((t - self.centroids.double()[self.assignments]).norm()) / norm if norm > 0 else 0.0


def _segment_means(sorted_vals: Tensor, seg: Tensor, k: int, counts: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    counts = torch.bincount(seg, minlength=k) if counts is None else counts
    sums = torch.zeros(k, dtype=torch.float64, device=sorted_vals.device).index_add_(0, seg, sorted_vals.double())
    return (sums / counts.clamp_min(1).double()), counts


def find_clusters(
    theta: Tensor,
    gap: float,
    min_size: int = 1,
    merge: MergePolicy = "storage",
) -> Clusters:
    """Splits the sorted weights at sparse stretches and merges small groups.

    A stretch of the sorted weights wider than ``gap`` that holds fewer than ``min_size``
    weights separates two clusters; with ``min_size=1`` that is an empty interval wider
    than ``gap``. The weights inside such a stretch (stragglers between clusters) join the
    cluster of the nearer of their two neighbouring cluster weights. Without this, a handful
    of stragglers bridges every valley of a layer with millions of weights and the whole
    layer reads as one cluster.

    Args:
        theta: one layer's weights (any shape, dtype, device).
        gap: split threshold in weight units (> 0); the callbacks use a fraction of
            the well's range ``w_l``.
        min_size: groups with fewer members are merge candidates, and a stretch wider
            than ``gap`` with fewer weights is a valley between clusters.
        merge: ``"storage"`` merges candidates (cheapest squared-error cost first)
            only while that lowers ``ceil(log2 K)``, because a merge that does not
            save an index bit only adds error (tail weights merged into big clusters
            dominated the snap error of the prototype, docs/design.md section 8);
            ``"all"`` merges every candidate; ``"none"`` keeps every group.

    Returns:
        :class:`Clusters` with ascending centroids.

    Raises:
        ValueError: empty or non-finite ``theta``, ``gap <= 0``, bad ``min_size``/``merge``.
    """
    if not (isinstance(gap, (int, float)) and math.isfinite(gap) and gap > 0):
        raise ValueError(f"`gap` must be a finite number > 0, got {gap!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"`min_size` must be an int >= 1, got {min_size!r}.")
    if merge not in ("storage", "all", "none"):
        raise ValueError(f"`merge` must be 'storage', 'all' or 'none', got {merge!r}.")
    flat = theta.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("`theta` is empty: there is nothing to cluster.")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("`theta` holds non-finite values (NaN or inf): clusters are undefined.")
    s, order = torch.sort(flat, stable=True)
    seg = _split_sparse(s, gap, min_size)
    k = int(seg[-1]) + 1
    means, counts = _segment_means(s, seg, k)
    if merge != "none" and k > 1:
        label = _merge_small(means, counts, s, seg, min_size, merge)
        seg = label[seg]
        k = int(label.max()) + 1
        means, counts = _segment_means(s, seg, k)
    assignments = torch.empty_like(seg)
    assignments[order] = seg
    return Clusters(means.float(), assignments.reshape(theta.shape), counts)


def _split_sparse(s: Tensor, gap: float, m: int) -> Tensor:
    """Segment label of each sorted weight: a window of ``m`` consecutive spacings wider than
    ``gap`` is a valley; its interior weights are stragglers and go to the nearer neighbour."""
    n = s.numel()
    if m <= 1 or n <= m:
        seg = torch.zeros(n, dtype=torch.long, device=s.device)
        seg[1:] = torch.cumsum(torch.diff(s) > gap, 0)
        return seg
    sparse = torch.nonzero((s[m:] - s[:-m]) > gap).flatten()  # window i spans s[i] .. s[i + m]
    cover = torch.zeros(n + 1, dtype=torch.long, device=s.device)
    cover.index_add_(0, sparse + 1, torch.ones_like(sparse))  # interior: i + 1 .. i + m - 1
    cover.index_add_(0, sparse + m, -torch.ones_like(sparse))
    core = torch.cumsum(cover, 0)[:n] == 0  # s[0] and s[-1] are never interior
    pos = torch.arange(n, device=s.device)
    core_pos = pos[core]
    # consecutive cluster weights belong to different clusters when stragglers or a gap lie between
    jump = (torch.diff(core_pos) > 1) | (torch.diff(s[core_pos]) > gap)
    core_seg = torch.zeros(core_pos.numel(), dtype=torch.long, device=s.device)
    core_seg[1:] = torch.cumsum(jump, 0)
    # nearest cluster weight on each side of every weight (by sorted position)
    rank = torch.cumsum(core.long(), 0) - 1  # index into core_pos of the last core at or before i
    left = rank.clamp_min(0)
    right = (rank + (~core).long()).clamp_max(core_pos.numel() - 1)
    to_right = (s[core_pos[right]] - s) < (s - s[core_pos[left]])
    return torch.where(to_right, core_seg[right], core_seg[left])


def _merge_small(means: Tensor, counts: Tensor, s: Tensor, seg: Tensor, min_size: int, merge: MergePolicy) -> Tensor:
    """Maps each initial group to its final (contiguous, ascending) label."""
    # Work on small per-cluster arrays in Python: K is at most a few thousand.
    m = means.tolist()
    c = counts.tolist()
    sq = torch.zeros(len(m), dtype=torch.float64, device=s.device).index_add_(0, seg, s.double() ** 2).tolist()
    groups = [[i] for i in range(len(m))]

    def cost(a: int, b: int) -> float:  # increase of squared error when merging a and b
        return c[a] * c[b] / (c[a] + c[b]) * (m[a] - m[b]) ** 2

    def candidates() -> list[tuple[float, int, int]]:
        out = []
        for i in range(len(m)):
            if c[i] >= min_size:
                continue
            for j in (i - 1, i + 1):
                if 0 <= j < len(m):
                    out.append((cost(i, j), i, j))
        return sorted(out)

    while len(m) > 1:
        cand = candidates()
        if not cand:
            break
        if merge == "storage":
            k = len(m)
            target = 1 << (math.ceil(math.log2(k)) - 1) if k > 1 else 1
            small = sum(1 for x in c if x < min_size)
            if k - target > small:
                break  # cannot reach fewer index bits with small groups alone
        _, i, j = cand[0]
        lo, hi = min(i, j), max(i, j)
        n = c[lo] + c[hi]
        m[lo] = (m[lo] * c[lo] + m[hi] * c[hi]) / n
        c[lo] = n
        sq[lo] += sq[hi]
        groups[lo] += groups[hi]
        del m[hi], c[hi], sq[hi], groups[hi]
    label = torch.empty(means.numel(), dtype=torch.long, device=means.device)
    for new, members in enumerate(groups):
        label[members] = new
    return label


def assign_to_centroids(theta: Tensor, centroids: Tensor) -> Clusters:
    """Assigns each weight to its nearest centroid; centroids become the members' means.

    Used with given representatives (a learned codebook, a baseline's levels). The
    nearest-centroid rule (ties included) is the one of
    :func:`sq_lightning.ops.codebook.nearest_centroid`, so a snap here agrees with the
    method-B callback's own. Centroids with no member are dropped.
    """
    if centroids.numel() == 0:
        raise ValueError("`centroids` is empty.")
    flat = theta.detach().reshape(-1).float()
    near = nearest_centroid(flat, centroids.detach().reshape(-1).to(flat.device))
    # Centroid order is ascending value; unique() keeps that order for the used ones.
    order = torch.argsort(centroids.detach().reshape(-1).float().to(flat.device), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    used, dense = torch.unique(rank[near], return_inverse=True)
    means, counts = _segment_means(flat, dense, used.numel())
    return Clusters(means.float(), dense.reshape(theta.shape), counts)


def tie_to_clusters(theta: Tensor, assignments: Tensor, k: int, counts: Optional[Tensor] = None) -> Tensor:
    """Means of the current members of each cluster (assignments fixed), float32 (k,).

    ``counts`` (members per cluster, on ``theta``'s device), when given, spares the
    ``bincount``, which on CUDA waits for the device to size its output: with it the
    whole call is queued without a host sync.
    """
    means, _ = _segment_means(theta.detach().reshape(-1).float(), assignments.reshape(-1), k, counts)
    return means.float()


def entropy_bits(counts: Tensor) -> float:
    """``-Σ p log2 p`` of the populations ``counts`` (empty clusters ignored), in bits."""
    c = counts.detach().double().cpu()
    c = c[c > 0]
    if c.numel() < 2:
        return 0.0
    p = c / c.sum()
    return float(-(p * p.log2()).sum())


def bits_summary(numels: list[int], ks: list[int]) -> dict[str, float]:
    """Parameter-weighted and plain mean bits, and fp32 size over codebook + packed indices."""
    bits = [math.log2(k) if k > 1 else 0.0 for k in ks]
    total = sum(numels)
    weighted = sum(n * b for n, b in zip(numels, bits)) / total if total else 0.0
    mean = sum(bits) / len(bits) if bits else 0.0
    packed = sum(n * (math.ceil(math.log2(k)) if k > 1 else 0) + 32 * k for n, k in zip(numels, ks))
    return {"bits_weighted": weighted, "bits_mean": mean, "compression_ratio": 32.0 * total / max(packed, 1)}
