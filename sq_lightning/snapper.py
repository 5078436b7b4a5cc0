"""Trainer-free snapping and refinement: weights -> clusters -> shared values.

:class:`ClusterSnapper` finds each selected layer's clusters
(:func:`sq_lightning.ops.clustering.find_clusters`, or given representatives such as a
learned codebook), snaps the weights to the cluster means, keeps them tied during
refinement, and reports per-layer ``K_l``, bits and snap error. The callback
:class:`sq_lightning.callbacks.ClusterRefine` drives it from a ``Trainer``; a notebook
can use it directly on a plain ``nn.Module``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from sq_lightning.config import RefineConfig, SnapConfig, check_group, check_w, reject_moved
from sq_lightning.layers import LayerSelector, first_override
from sq_lightning.ops.baselines import quantize
from sq_lightning.ops.codebook import nearest_centroid
from sq_lightning.ops.clustering import Clusters, assign_to_centroids, bits_summary, find_clusters, tie_to_clusters
from sq_lightning.sharding import ShardSpec, all_reduce_sum, is_sharded, shard_spec

log = logging.getLogger(__name__)

# Values of a layer that did not cluster under on_unclustered="kmeans" when it has no bit budget.
_FALLBACK_K = 16


@dataclass
class LayerReport:
    name: str
    numel: int
    k: int
    bits: float
    snap_error: float
    snapped: bool
    # Shannon entropy of the cluster populations (bits per weight an entropy coder
    # needs); 32.0 for a layer kept in full precision, like ``bits``.
    entropy: float = 32.0
    # Whether the layer's own clusters fit within ``max_snap_error`` (False: it did not
    # cluster, and ``on_unclustered`` decided what happened to it).
    clustered: bool = True


class UnclusteredLayerError(RuntimeError):
    """A layer would be destroyed by snapping and ``on_unclustered="raise"``."""


class ClusterSnapper:
    """Clusters, snaps and ties the selected layers of a model.

    Layers sharded across ranks as DTensors (FSDP2, ``fully_shard``) are supported:
    :meth:`find` gathers each whole layer once (the cluster search sorts it);
    :meth:`snap` works on each rank's slice (one all-reduce for the snap error), and
    :meth:`tie` too, with one all-reduce of the per-cluster sums (and sizes) per step;
    :meth:`state_dict` and :meth:`export_clusters` gather the assignments (and latent
    weights). On such a model these calls are collectives: every rank makes them.

    Args:
        w: range of the well relative to the layer's std (as in soft quantization);
            used for ``w_l = w · σ_l`` when no ``w_l`` is passed to :meth:`find`.
        snap: how clusters are found and placed (:class:`~sq_lightning.config.SnapConfig`).
        selector: which parameters are snapped.
        refine: how :meth:`tie` refines after the snap
            (:class:`~sq_lightning.config.RefineConfig`; ``None``: its defaults).

    Raises:
        ValueError: ``w`` out of range.
        TypeError: ``snap``/``refine`` of the wrong type, or a keyword argument of an
            earlier version (the message names the field that replaced it).

    What the fields of ``snap`` and ``refine`` do here:

        gap: split threshold as a fraction of ``w_l``: a stretch of the sorted weights
            wider than ``gap · w_l`` holding fewer than ``max(1, min_cluster_frac · N_l)``
            weights separates two clusters (for small layers: an empty gap; see
            :func:`~sq_lightning.ops.clustering.find_clusters`).
        min_cluster_frac: clusters with fewer than this fraction of the layer's
            weights are merge candidates (see ``merge``), and so few weights in a stretch
            wider than the gap do not bridge two clusters.
        merge: ``"storage"``, ``"all"`` or ``"none"``; see :func:`find_clusters`.
        max_snap_error: a layer whose relative snap error ``‖θ - snap(θ)‖ / ‖θ‖``
            exceeds this is "unclustered" (coupling was too weak for it).
        on_unclustered: ``"kmeans"`` (default) quantizes such a layer by optimal 1-D
            k-means at its bit budget's number of values (``max_bits_overrides``,
            ``max_clusters``, ``2^max_bits``, or 16 without a budget) instead of its
            clusters (clusters the caller gave are snapped to anyway),
            ``"keep"`` leaves it in full precision (reported as 32 bits),
            ``"snap"`` snaps it to its clusters anyway, ``"raise"`` stops with an error.
            The layers are named in one warning with their errors.
        placement: where the ``K_l`` values of a discovered layer go. ``"mean"``: each
            gap-separated cluster snaps to its mean (the paper's snap). ``"kmeans"``:
            the number of clusters ``K_l`` is kept and the values and assignments are
            the optimal 1-D k-means of the layer at that ``K_l``
            (:func:`sq_lightning.ops.baselines.kmeans_quantize`), which never has a larger
            snap error than the means of the gap partition (that partition is one
            candidate of the k-means problem) and is the same where the clusters are
            well separated. Costs an O(K_l N_l log N_l) dynamic program per layer, once.
            The default (``"mean"`` before 2026-12-07): on the digits quickstart, seeds 0-2, it
            snapped every layer where ``"mean"`` left the 640-weight layer of two seeds in
            float32 (``experiments/results/placement_default.md``).
            ``"heq"``: ``K_l`` is kept and the layer is cut into ``K_l`` equal-population
            bins, each at its mean (histogram equalization of the coupled weights,
            :func:`sq_lightning.ops.baselines.heq_quantize`): the highest-entropy
            partition at that ``K_l``, at a larger snap error; it separates what the
            coupling's partition does to refinement from what its ``K_l`` does.
            Layers with given representatives (a codebook) are not affected.
        max_bits: a bit budget per layer: a layer that discovered more than
            ``2^max_bits`` clusters, or at most that many but too loose ones (snap error
            above ``max_snap_error``: it did not cluster), is re-partitioned into exactly
            ``2^max_bits`` values by optimal 1-D k-means of its (coupled) weights, the
            least squared error of any ``2^max_bits``-level snap (by equal-population
            bins with ``placement="heq"``); a layer whose clusters
            fit the budget and are tight keeps them. ``None``: no cap (the bits are what the coupling
            produced). The snap error is then checked against ``max_snap_error`` as
            usual (a tight budget may need ``on_unclustered="snap"``). Layers with given
            representatives are not affected.
        max_clusters: the same budget counted in values instead of bits, for budgets that
            are not a power of two: ``3`` gives ternary layers (a centre value and one on
            each side, the low end of a coupling that keeps a cluster at zero), ``log2 3``
            = 1.58 bits. Exclusive with ``max_bits`` (``max_bits=b`` is
            ``max_clusters=2**b``).
        max_bits_overrides: per-layer bit budgets: regex (``re.search`` on the full
            parameter name) to bits in ``[1, 16]``; the first matching entry wins over
            ``max_bits``, e.g. ``{"^conv1\\.": 4, "^fc\\.": 4}`` to keep a network's first
            convolution and classifier at up to 16 values while the rest get
            ``max_bits`` (the usual exception of low-bit work: small layers that cost
            little storage and much accuracy). A layer matched here is capped even when
            ``max_bits`` is ``None``; it wins over ``max_clusters`` too.
        reassign: refinement with moving assignments. ``False`` (the paper's refinement):
            assignments stay fixed and each centroid moves by the mean update of its
            members. ``True``: each snapped weight keeps a full-precision latent copy
            (the coupled weight at the snap) that receives every optimizer update made
            to the tied weight (straight-through); after each step every latent weight
            joins its nearest centroid and each centroid becomes the mean of its
            members' latent weights (one Lloyd step). With no weight crossing a boundary
            this is the fixed-assignment refinement; near a boundary, a weight whose
            gradient keeps pushing it across changes cluster. ``K_l`` never grows (a
            cluster that empties keeps its value); costs one copy of the snapped weights.
        ramp_steps: a gradual snap. ``0`` (default): :meth:`snap` sets every weight to its
            cluster's value at once. ``> 0``: :meth:`snap` only fixes the partition and the
            weights stay where they are; each :meth:`tie` (one per optimizer step) then moves
            every weight a fraction ``β_k`` of the way to the current mean of its cluster,
            ``β_k = ramp_from ** (1 - min(k / ramp_steps, 1))`` at the k-th tie (k = 0, 1,
            ...): a pull that grows geometrically to the exact tie (``β = 1``) at tie
            ``ramp_steps``, so the network follows its weights into the clusters instead of
            meeting the whole snap error in one step (progressive quantization, as in
            incremental network quantization, arXiv:1702.03044, but continuous and by
            distance rather than in weight groups). Fixed assignments only
            (``reassign=False``). The count of ties is saved in :meth:`state_dict`.
        ramp_from: ``β_0``, the first tie's pull, in (0, 1].
    """

    def __init__(
        self,
        w: float = 0.3,
        snap: SnapConfig = SnapConfig(),
        selector: Optional[LayerSelector] = None,
        refine: Optional[RefineConfig] = None,
        **moved: Any,
    ) -> None:
        reject_moved("ClusterSnapper", moved)
        check_w(w)
        check_group("snap", snap, SnapConfig)
        check_group("refine", refine, RefineConfig, allow_none=True)
        refine = refine or RefineConfig()
        self.config, self.refine_config = snap, refine
        self.ramp = refine.ramp
        self.ramp_steps, self.ramp_from = refine.ramp_steps, float(refine.ramp_from)
        self.ties = 0  # ties since the snap: the position in the ramp
        self.placement, self.max_bits, self.max_clusters = snap.placement, snap.max_bits, snap.max_clusters
        self.reassign = refine.reassign
        self.max_bits_overrides = dict(snap.max_bits_overrides or {})
        self.w, self.gap, self.min_cluster_frac, self.merge = float(w), snap.gap, snap.min_cluster_frac, snap.merge
        self.max_snap_error, self.on_unclustered = snap.max_snap_error, snap.on_unclustered
        self.selector = selector or LayerSelector()
        self.clusters: dict[str, Clusters] = {}
        self.reports: dict[str, LayerReport] = {}
        # reassign=True: full-precision latent weights of the snapped layers (float32).
        self.latent: dict[str, Tensor] = {}
        # Layers sharded across ranks (FSDP2): their assignments and latent weights above
        # hold this rank's slice only; counts and centroids are always the whole layer's.
        self._shards: dict[str, ShardSpec] = {}

    @property
    def snapped(self) -> bool:
        return bool(self.reports)

    def pull(self) -> float:
        """``β`` of the next :meth:`tie`: the fraction of the way to its cluster's mean that
        each weight moves (1: the exact tie; always 1 without a ramp)."""
        return self.ramp.factor(self.ties)

    @property
    def exact(self) -> bool:
        """Whether the snapped layers hold exactly their cluster values (no ramp, or the
        ramp has reached its exact tie)."""
        return self.ties > self.ramp_steps or self.ramp_steps == 0

    def max_bits_for(self, name: str) -> Optional[int]:
        """Bit budget of the parameter ``name``: first matching ``max_bits_overrides``, else ``max_bits``."""
        return first_override(self.max_bits_overrides, name, self.max_bits)

    def _fallback_k(self, name: str) -> int:
        """Values of a layer quantized by ``on_unclustered="kmeans"``: its budget, else the size of
        the codebook it was assigned to, else 16."""
        return self.max_clusters_for(name) or getattr(self, "_given_k", {}).get(name) or _FALLBACK_K

    def max_clusters_for(self, name: str) -> Optional[int]:
        """Most values the parameter ``name`` may keep: ``2**bits`` of its first matching
        ``max_bits_overrides``, else ``max_clusters`` or ``2**max_bits``; ``None``: no cap."""
        bits = self.max_bits_for(name)  # max_bits and max_clusters are never both set
        return self.max_clusters if bits is None else 1 << bits

    @torch.no_grad()
    def find(
        self,
        model: nn.Module,
        w_l: Optional[dict[str, float]] = None,
        centroids: Optional[dict[str, Tensor]] = None,
    ) -> dict[str, Clusters]:
        """Finds the clusters of every selected layer (does not change the model).

        Args:
            model: the model.
            w_l: per-layer well range in weight units (from soft quantization);
                missing layers use ``w · std(θ)``.
            centroids: given representatives per layer (a learned codebook); layers
                listed here are assigned to their nearest representative instead.
        """
        found: dict[str, Clusters] = {}
        self._given_k = {}  # a learned codebook's size is the layer's budget for the fallback
        for name, param in self.selector.select_or_raise(model, type(self).__name__):
            # A sharded layer is gathered (collective): its clusters are the whole layer's.
            theta = param.detach().full_tensor() if is_sharded(param) else param.detach()
            if centroids is not None and name in centroids:
                found[name] = assign_to_centroids(theta, centroids[name])
                self._given_k[name] = int(centroids[name].numel())
                continue
            wl = (w_l or {}).get(name)
            if wl is None:
                wl = self.w * float(theta.float().std()) if theta.numel() > 1 else 1.0
            if not math.isfinite(wl) or wl <= 0:
                wl = 1.0  # a constant layer: one cluster whatever the threshold
            min_size = max(1, int(self.min_cluster_frac * theta.numel()))
            cl = find_clusters(theta, self.gap * wl, min_size=min_size, merge=self.merge)
            cap = self.max_clusters_for(name)
            if cap is not None and (cl.k > cap or cl.snap_error(theta) > self.max_snap_error):
                cl = _quantized_clusters(theta, cap, "heq" if self.placement == "heq" else "kmeans")
            elif self.placement != "mean" and cl.k > 1:
                cl = _quantized_clusters(theta, cl.k, self.placement)
            found[name] = cl
        return found

    @torch.no_grad()
    def snap(
        self,
        model: nn.Module,
        clusters: Optional[dict[str, Clusters]] = None,
        w_l: Optional[dict[str, float]] = None,
        centroids: Optional[dict[str, Tensor]] = None,
        given: Optional[bool] = None,
    ) -> dict[str, LayerReport]:
        """Snaps every selected layer to its clusters and returns the per-layer report.

        Layers whose snap error exceeds ``max_snap_error`` are named together in one
        warning (or one :class:`UnclusteredLayerError`), whose advice depends on where the
        clusters came from: ``given`` (default: whether ``clusters`` was passed) says they
        were the caller's, not found in the weights.

        Raises:
            UnclusteredLayerError: a layer's snap error exceeds ``max_snap_error`` and
                ``on_unclustered="raise"`` (the model is then left unchanged).
        """
        # What to do about a layer too far from its clusters depends on where they came from.
        given = clusters is not None if given is None else given
        hint = ("The clusters given for them fit their weights badly: give more, or exclude those layers." if given else
                "The coupling was too weak or too short for them: raise `grad_ratio` (with a fixed `h`: raise `h` or "
                "`target_step`, watching `sq/grad_ratio/<layer>`) or couple for more steps; or set "
                "`SnapConfig(max_bits=...)` to quantize them by k-means at a bit budget; or exclude them.")
        clusters = clusters if clusters is not None else self.find(model, w_l=w_l, centroids=centroids)
        loose: list[str] = []
        # Given clusters are the caller's choice: "kmeans" snaps to them anyway rather than replace them.
        fallback = self.on_unclustered == "kmeans" and not given
        params = dict(model.named_parameters())
        reports: dict[str, LayerReport] = {}
        keep: dict[str, Clusters] = {}
        # Sharded layers: this rank's slice of the assignments (the clusters stay untouched
        # until every layer has passed, so that "raise" leaves everything as it was).
        sliced: dict[str, tuple[ShardSpec, Tensor]] = {}
        for name, cl in clusters.items():
            theta = params[name]
            if is_sharded(theta):
                spec = shard_spec(theta, name)
                sliced[name] = (spec, spec.local(cl.assignments.to(theta.device)).clone())
                err = _sharded_snap_error(theta.detach().to_local(), cl.centroids, sliced[name][1], spec)
            else:
                err = cl.snap_error(theta)
            ok = err <= self.max_snap_error
            if not ok:
                loose.append(f"{name} (K={cl.k}, error {err:.3f})")
                if fallback and name not in sliced:
                    cl = _quantized_clusters(theta.detach(), self._fallback_k(name), "kmeans")
                    err = cl.snap_error(theta)
            snapped = ok or self.on_unclustered == "snap" or (self.on_unclustered == "kmeans" and name not in sliced)
            reports[name] = LayerReport(
                name, theta.numel(), cl.k, cl.bits if snapped else 32.0, err, snapped, cl.entropy if snapped else 32.0,
                clustered=ok,
            )
            if snapped:
                keep[name] = cl
        if loose:
            # One line for all of them: every rank snaps the same clusters, so rank 0 alone says it.
            msg = (f"{len(loose)} of {len(clusters)} layers did not cluster (relative snap error above "
                   f"max_snap_error={self.max_snap_error}): {', '.join(loose)}. {hint}")
            if self.on_unclustered == "raise":
                raise UnclusteredLayerError(msg)
            action = {"keep": "they stay in full precision", "snap": "they are snapped anyway",
                      "kmeans": "they are quantized by optimal 1-D k-means at their bit budget's number of values "
                                f"({_FALLBACK_K} without one; layers sharded by FSDP stay in full precision)"
                                if fallback else "they are snapped to the given clusters anyway"}[self.on_unclustered]
            if rank_zero_only.rank == 0:
                log.warning("%s (on_unclustered=%r: %s)", msg, self.on_unclustered, action)
        self.latent, self._shards = {}, {}
        for name, cl in keep.items():
            p = params[name]
            if name in sliced:
                self._shards[name], cl.assignments = sliced[name]
                p = p.to_local()
                values = cl.centroids.to(p.device)[cl.assignments].to(p.dtype)
            else:
                values = cl.values(p.dtype).reshape(p.shape)
            if self.reassign:
                self.latent[name] = p.detach().float().clone()
            if not self.ramp_steps:
                p.copy_(values)  # with a ramp the weights reach their values over the ties
        self.clusters, self.reports, self.ties = keep, reports, 0
        return reports

    @torch.no_grad()
    def tie(self, model: nn.Module) -> None:
        """Sets every snapped weight to the current mean of its cluster (assignments fixed;
        with ``reassign=True``, after moving each latent weight to its nearest centroid).

        Called after each optimizer step during refinement, so a centroid moves by
        the mean update of its members: weight sharing. The clusters move to their
        weights' device on the first call (after a resume they are loaded on the
        CPU) and stay there, and the cluster sizes are not counted again: on a GPU
        the tie is queued without a single host sync. With ``ramp_steps`` the weights
        move only the fraction :meth:`pull` of the way to the means, until the ramp ends.
        """
        params = dict(model.named_parameters())
        beta = self.pull()
        self.ties += 1
        sharded: list[tuple[str, Clusters, Tensor]] = []
        for name, cl in self.clusters.items():
            p = params[name]
            if is_sharded(p):
                p = self._localize(name, cl, p)
                sharded.append((name, cl, p))
                continue
            if cl.assignments.device != p.device or cl.counts.device != p.device:
                cl.assignments, cl.counts = cl.assignments.to(p.device), cl.counts.to(p.device)
            if self.reassign:
                self._reassign(name, cl, p)
                continue
            a = cl.assignments
            cl.centroids = tie_to_clusters(p, a, cl.k, cl.counts)
            _pull_to(p, cl.centroids[a].reshape(p.shape), beta)
        if sharded:
            self._tie_sharded(sharded, beta)

    def finish(self, model: nn.Module) -> None:
        """Ends a gradual snap that has not reached its exact tie: one exact :meth:`tie`,
        after which every snapped layer holds its ``K_l`` values. Nothing to do otherwise."""
        if self.clusters and not self.exact:
            self.ties = self.ramp_steps
            self.tie(model)

    @torch.no_grad()
    def start_latent_from(self, weights: dict[str, Tensor]) -> None:
        """Starts the latent weights (``reassign=True``) of the snapped layers named in
        ``weights`` from those values instead of the weights at the snap.

        Each layer's ``weights[name]`` is shifted cluster by cluster so that every cluster's
        latent mean is its snapped value: the tied model is the same, but each member
        keeps its offset from its cluster's mean in ``weights``. Given the weights from
        before the coupling, the members spread again as they did in full precision, and
        those near a decision boundary can change cluster from the first step; the coupled
        weights themselves sit tight on their values, none near a boundary
        (``experiments/results/snap_margins.md``). Call after :meth:`snap`, before the first
        :meth:`tie`.

        Raises:
            ValueError: not ``reassign=True``, nothing snapped, a name that is not a
                snapped layer, a shape that differs from the layer's, a sharded layer.
        """
        if not self.reassign or not self.clusters:
            raise ValueError("start_latent_from needs `reassign=True` and a snap: call it after snap().")
        for name, values in weights.items():  # every layer checked before any latent weight changes
            if name not in self.clusters:
                raise ValueError(f"start_latent_from: {name!r} is not a snapped layer (snapped: {sorted(self.clusters)[:3]} ...).")
            if name in self._shards:
                raise ValueError(f"start_latent_from: layer {name} is sharded (FSDP2); only whole layers are supported.")
            shape = tuple(self._latent_of(name).shape)
            if tuple(values.shape) != shape:
                raise ValueError(f"start_latent_from: {name} has shape {shape}, the given weights {tuple(values.shape)}.")
        for name, values in weights.items():
            cl, latent = self.clusters[name], self.latent[name]
            v = values.detach().to(latent.device, torch.float64).reshape(-1)
            a = cl.assignments.to(latent.device).reshape(-1)
            offset = v - tie_to_clusters(v, a, cl.k).double()[a]
            latent.copy_((cl.centroids.to(latent.device, torch.float64)[a] + offset).reshape(latent.shape))

    def _reassign(self, name: str, cl: Clusters, p: Tensor) -> None:
        """One refinement step with moving assignments (see ``reassign``); no host sync."""
        latent = self._latent_of(name)
        if latent.device != p.device:
            latent = self.latent[name] = latent.to(p.device)
        c = cl.centroids.to(p.device)
        # What the optimizer step did to the tied weight, applied to the latent one.
        latent.add_(p.detach().float() - c[cl.assignments].reshape(p.shape))
        flat = latent.reshape(-1)
        a = nearest_centroid(flat, c)  # the rule (ties included) of every other snap to given centroids
        # Sizes by index_add (bincount would wait for the device to size its output).
        counts = torch.zeros(cl.k, dtype=torch.long, device=p.device).index_add_(0, a, torch.ones_like(a))
        cl.centroids = torch.where(counts > 0, tie_to_clusters(flat, a, cl.k, counts), c)
        cl.assignments, cl.counts = a.reshape(p.shape), counts
        p.copy_(cl.centroids[cl.assignments].to(p.dtype))

    def _localize(self, name: str, cl: Clusters, p: Tensor) -> Tensor:
        """This rank's slice of the sharded layer ``p``; on the first call after a resume
        (whole-layer state) the assignments and latent weights are cut to the slice."""
        local = p.to_local()
        if name not in self._shards:
            spec = self._shards[name] = shard_spec(p, name)
            cl.assignments = spec.local(cl.assignments.to(local.device)).clone()
            if name in self.latent:
                self.latent[name] = spec.local(self.latent[name].to(local.device)).clone()
        if cl.assignments.device != local.device or cl.counts.device != local.device:
            cl.assignments, cl.counts = cl.assignments.to(local.device), cl.counts.to(local.device)
        if cl.centroids.device != local.device:
            cl.centroids = cl.centroids.to(local.device)
        return local

    def _tie_sharded(self, layers: list[tuple[str, Clusters, Tensor]], beta: float = 1.0) -> None:
        """:meth:`tie` for layers sharded across ranks: the same arithmetic as one process,
        each rank summing its slice per cluster and one all-reduce per shard group."""
        groups: dict[int, list[tuple[str, Clusters, Tensor]]] = {}
        for item in layers:
            groups.setdefault(id(self._shards[item[0]].group), []).append(item)
        for items in groups.values():
            partial, assignments = [], []
            for name, cl, local in items:
                if self.reassign:
                    latent = self._latent_of(name)
                    latent.add_(local.detach().float() - cl.centroids[cl.assignments])
                    flat = latent.reshape(-1)
                    a = nearest_centroid(flat, cl.centroids)
                    partial.append(_cluster_sums(torch.ones_like(flat, dtype=torch.float64), a, cl.k))  # sizes
                else:
                    flat, a = local.detach().reshape(-1).float(), cl.assignments.reshape(-1)
                partial.append(_cluster_sums(flat.double(), a, cl.k))
                assignments.append(a)
            totals = iter(all_reduce_sum(partial, self._shards[items[0][0]].group))
            for (name, cl, local), a in zip(items, assignments):
                if self.reassign:
                    counts = next(totals).round().long()
                    means = (next(totals) / counts.clamp_min(1).double()).float()
                    cl.centroids = torch.where(counts > 0, means, cl.centroids)
                    cl.assignments, cl.counts = a.reshape(local.shape), counts
                else:
                    cl.centroids = (next(totals) / cl.counts.clamp_min(1).double()).float()
                _pull_to(local, cl.centroids[cl.assignments], beta)

    def _latent_of(self, name: str) -> Tensor:
        latent = self.latent.get(name)
        if latent is None:
            raise RuntimeError(
                f"reassign=True but layer {name} has no latent weights: the snap state was saved without them. "
                "Resume with reassign=False, or snap again."
            )
        return latent

    def _whole(self, name: str, t: Tensor) -> Tensor:
        """``t`` (assignments or latent weights of ``name``) for the whole layer; gathers a
        sharded layer's slices (collective)."""
        spec = self._shards.get(name)
        return t if spec is None else spec.gather(t).reshape(spec.shape)

    def refresh_reports(self) -> None:
        """Updates the reported entropy of every snapped layer from its current populations
        (assignments move when ``reassign=True``); ``K_l``, bits and snap error stay those of the snap."""
        for name, cl in self.clusters.items():
            if name in self.reports and self.reports[name].snapped:
                self.reports[name].entropy = cl.entropy

    def summary(self) -> dict[str, float]:
        """``bits_weighted``, ``bits_mean``, ``compression_ratio``, ``entropy_weighted`` over the reported layers.

        Layers kept in full precision count as 32 bits and as uncompressed.
        ``entropy_weighted`` is the parameter-weighted Shannon entropy of the cluster
        populations: the bits per weight an entropy coder would need (<= ``bits_weighted``).
        """
        rows = list(self.reports.values())
        numels = [r.numel for r in rows]
        out = bits_summary(numels, [r.k for r in rows])
        total = sum(numels)
        out["entropy_weighted"] = sum(r.numel * r.entropy for r in rows) / total if total else 0.0
        if any(not r.snapped for r in rows) and total:
            out["bits_weighted"] = sum(r.numel * r.bits for r in rows) / total
            out["bits_mean"] = sum(r.bits for r in rows) / len(rows)
            packed = sum(
                r.numel * (math.ceil(math.log2(r.k)) if r.k > 1 else 0) + 32 * r.k if r.snapped else 32 * r.numel for r in rows
            )
            out["compression_ratio"] = 32.0 * total / max(packed, 1)
        return out

    def table(self) -> str:
        """Per-layer table (name, N_l, K_l, bits, snap error) and the averages."""
        lines = [f"{'layer':<40} {'N_l':>9} {'K_l':>5} {'bits':>6} {'entropy':>7} {'snap_err':>9}"]
        for r in self.reports.values():
            flag = "" if r.snapped else "  (kept fp32)"
            lines.append(f"{r.name:<40} {r.numel:>9} {r.k:>5} {r.bits:>6.2f} {r.entropy:>7.2f} {r.snap_error:>9.4f}{flag}")
        s = self.summary()
        lines.append(
            f"bits_weighted={s['bits_weighted']:.3f}  bits_mean={s['bits_mean']:.3f}  compression_ratio={s['compression_ratio']:.2f}x"
            f"  entropy_weighted={s['entropy_weighted']:.3f}"
        )
        return "\n".join(lines)

    def export_clusters(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (centroids, assignments)}`` of the snapped layers, for :mod:`sq_lightning.export`.

        The whole layers': with sharded layers it gathers their assignments (collective).
        """
        return {n: (c.centroids.clone(), self._whole(n, c.assignments).clone()) for n, c in self.clusters.items()}

    # -- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Whole-layer state, the same on every rank; with sharded layers it gathers their
        slices (collective: Lightning asks every rank for it when it saves a checkpoint)."""
        return {
            "clusters": {
                n: {"centroids": c.centroids.cpu(), "assignments": _compact(self._whole(n, c.assignments).cpu(), c.k), "counts": c.counts.cpu()}
                for n, c in self.clusters.items()
            },
            "reports": {n: vars(r).copy() for n, r in self.reports.items()},
            "ties": self.ties,
            "exact": self.exact,  # False: saved during a gradual snap, the weights not yet at their values
            **({"latent": {n: self._whole(n, t).cpu() for n, t in self.latent.items()}} if self.latent else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.clusters = {
            n: Clusters(d["centroids"].float(), d["assignments"].long(), d["counts"].long()) for n, d in state.get("clusters", {}).items()
        }
        self.reports = {n: LayerReport(**r) for n, r in state.get("reports", {}).items()}
        self.latent = {n: t.float() for n, t in state.get("latent", {}).items()}
        # A state written before the gradual snap existed was snapped at once: no ramp left.
        self.ties = int(state.get("ties", self.ramp_steps + 1))
        self._shards = {}  # whole-layer state: sharded layers are cut to their slice at the next tie
        missing = sorted(set(self.clusters) - set(self.latent))
        if self.reassign and self.clusters and missing:
            raise ValueError(
                f"`reassign=True` but the checkpoint's snap state has no latent weights for {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}: it was written by a refinement with fixed assignments. "
                "Resume it with `reassign=False`."
            )
        for n, r in self.reports.items():
            if r.snapped and "entropy" not in state["reports"][n] and n in self.clusters:
                r.entropy = self.clusters[n].entropy  # a checkpoint written before the entropy was reported


def _sharded_snap_error(local: Tensor, centroids: Tensor, assignments: Tensor, spec: ShardSpec) -> float:
    """:meth:`Clusters.snap_error` of a sharded layer from this rank's slice: both squared
    norms are sums, so one all-reduce gives the whole layer's (no gather)."""
    t = local.double()
    diff = t - centroids.to(t.device).double()[assignments]
    err2, norm2 = (float(x) for x in all_reduce_sum([diff.square().sum().reshape(1), t.square().sum().reshape(1)], spec.group))
    return math.sqrt(err2) / math.sqrt(norm2) if norm2 > 0 else 0.0


def _pull_to(p: Tensor, values: Tensor, beta: float) -> None:
    """Moves ``p`` a fraction ``beta`` of the way to ``values`` (``beta=1``: copies them exactly)."""
    if beta >= 1.0:
        p.copy_(values.to(p.dtype))
    else:
        p.lerp_(values.to(p.dtype), beta)


def _cluster_sums(values: Tensor, assignments: Tensor, k: int) -> Tensor:
    """float64 sum of ``values`` per cluster: one rank's part of a whole layer's sum."""
    return torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, assignments, values)


def _quantized_clusters(theta: Tensor, k: int, method: str) -> Clusters:
    """``theta`` quantized at ``k`` levels by ``method`` (``"kmeans"``: optimal 1-D k-means,
    ``"heq"``: equal-population bins), as :class:`Clusters` on ``theta``'s device."""
    return Clusters.from_quantization(quantize(theta.float(), k, method), theta.device)


def _compact(a: Tensor, k: int) -> Tensor:
    """Assignments in the smallest integer type that holds ``k`` labels (checkpoint size)."""
    if k <= 256:
        return a.to(torch.uint8)
    if k <= 32768:
        return a.to(torch.int16)
    return a.to(torch.int32)
