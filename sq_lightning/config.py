"""Typed, validated settings of the snap, the refinement and the export.

Each setting group is a frozen dataclass that checks itself once, when it is built, with
the messages of the package's other argument checks. The engine
(:class:`~sq_lightning.snapper.ClusterSnapper`) and the callback
(:class:`~sq_lightning.callbacks.ClusterRefine`) take the same objects, so no argument
list is written twice. In a LightningCLI YAML file a group nests under its name::

    - class_path: sq_lightning.ClusterRefine
      init_args:
        snap: {max_bits: 2, max_bits_overrides: {"^conv1\\\\.": 4}}
        refine: {reassign: true}
        export: {path: model.sq.safetensors}

The flat keyword arguments of earlier versions (``ClusterRefine(gap=0.5, max_bits=2,
reassign=True, export_path=...)``) fail with a message naming the new place
(:data:`MOVED`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

from sq_lightning._validate import check_choice, check_int
from sq_lightning.layers import check_overrides
from sq_lightning.ops.clustering import MergePolicy
from sq_lightning.schedule import Ramp

OnUnclustered = Literal["kmeans", "keep", "snap", "raise"]
Placement = Literal["mean", "kmeans", "heq"]
Coding = Literal["packed", "ans"]


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def check_w(w: Any) -> None:
    """The well range ``w`` (relative to the layer's std) of a snap."""
    _check_finite("w", w)
    if w <= 0:
        raise ValueError(f"`w` must be > 0, got {w}. Use the same `w` as the SoftQuantCallback stage.")


@dataclass(frozen=True)
class SnapConfig:
    """How each layer's weights become its ``K_l`` values (see
    :class:`~sq_lightning.snapper.ClusterSnapper` for the algorithm).

    Args:
        gap: split threshold as a fraction of ``w_l``: a stretch of the sorted weights
            wider than ``gap · w_l`` holding fewer than ``max(1, min_cluster_frac · N_l)``
            weights separates two clusters (:func:`~sq_lightning.ops.clustering.find_clusters`).
        min_cluster_frac: clusters with fewer than this fraction of the layer's weights are
            merge candidates (see ``merge``), and so few weights in a wider stretch do not
            bridge two clusters.
        merge: ``"storage"`` (merge only where it saves an index bit), ``"all"``, ``"none"``.
        max_snap_error: a layer whose relative snap error ``‖θ - snap(θ)‖ / ‖θ‖`` exceeds
            this did not cluster.
        on_unclustered: what happens to such a layer: ``"kmeans"`` (optimal 1-D k-means at
            its budget's number of values, 16 without a budget), ``"keep"`` (full precision,
            32 bits in reports), ``"snap"`` (to its clusters anyway) or ``"raise"``.
        placement: where a discovered layer's ``K_l`` values go: ``"kmeans"`` (keep ``K_l``,
            optimal 1-D k-means: never a larger snap error than the cluster means),
            ``"mean"`` (each cluster at its mean, the paper's snap) or ``"heq"``
            (equal-population bins).
        max_bits: bit budget per layer (at most ``2^max_bits`` values; a layer above it, or
            one that did not cluster, is re-quantized by k-means at the budget);
            ``None``: no cap.
        max_clusters: the budget in values, for one that is not a power of two (``3``:
            ternary layers, 1.58 bits); exclusive with ``max_bits``.
        max_bits_overrides: per-layer budgets: regex (``re.search`` on the full parameter
            name) to bits in ``[1, 16]``; the first match wins over ``max_bits``.
        recalibrate_bn_batches: training batches used by ``ClusterRefine`` to re-estimate
            BatchNorm statistics after the snap (0: none).

    Raises:
        ValueError: a field out of range, with the field named.
    """

    gap: float = 0.5
    min_cluster_frac: float = 0.001
    merge: MergePolicy = "storage"
    max_snap_error: float = 0.3
    on_unclustered: OnUnclustered = "kmeans"
    placement: Placement = "kmeans"
    max_bits: Optional[int] = None
    max_clusters: Optional[int] = None
    max_bits_overrides: Optional[dict[str, int]] = None
    recalibrate_bn_batches: int = 100

    def __post_init__(self) -> None:
        for name in ("gap", "min_cluster_frac", "max_snap_error"):
            _check_finite(name, getattr(self, name))
        if self.gap <= 0:
            raise ValueError(f"`gap` must be > 0, got {self.gap}. It is the split threshold as a fraction of `w_l`; "
                             "0.5 is a good start.")
        if not 0 <= self.min_cluster_frac < 1:
            raise ValueError(f"`min_cluster_frac` must be in [0, 1), got {self.min_cluster_frac}.")
        if self.merge not in ("storage", "all", "none"):
            raise ValueError(f"`merge` must be 'storage', 'all' or 'none', got {self.merge!r}.")
        if self.max_snap_error <= 0:
            raise ValueError(f"`max_snap_error` must be > 0, got {self.max_snap_error}.")
        if self.on_unclustered not in ("kmeans", "keep", "snap", "raise"):
            raise ValueError(f"`on_unclustered` must be 'kmeans', 'keep', 'snap' or 'raise', got {self.on_unclustered!r}.")
        if self.placement not in ("mean", "kmeans", "heq"):
            raise ValueError(f"`placement` must be 'mean' (cluster means), 'kmeans' (optimal 1-D k-means at the "
                             f"discovered K) or 'heq' (equal-population bins at the discovered K), got {self.placement!r}.")
        mb, mc = self.max_bits, self.max_clusters
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or not 1 <= mb <= 16):
            raise ValueError(f"`max_bits` must be None (no cap) or an int in [1, 16] (at most 2^max_bits values per "
                             f"layer), got {mb!r}.")
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or not 2 <= mc <= 1 << 16):
            raise ValueError(f"`max_clusters` must be None (no cap) or an int in [2, 65536] (at most that many values "
                             f"per layer, e.g. 3 for ternary layers), got {mc!r}.")
        if mb is not None and mc is not None:
            raise ValueError(f"`max_bits` ({mb}) and `max_clusters` ({mc}) are the same budget, in bits and in values: "
                             "give one of them (max_bits=b is max_clusters=2**b).")
        overrides = check_overrides("max_bits_overrides", {} if self.max_bits_overrides is None
                                    else self.max_bits_overrides, "bits", 1, 16)
        object.__setattr__(self, "max_bits_overrides", overrides or None)
        check_int("recalibrate_bn_batches", self.recalibrate_bn_batches, 0)


@dataclass(frozen=True)
class RefineConfig:
    """Training after the snap, with every cluster's members tied to one value.

    Args:
        reassign: refine with moving assignments: every snapped weight keeps a
            full-precision latent copy that takes the optimizer's updates
            (straight-through) and joins its nearest centroid after each step, each
            centroid being its members' latent mean. ``False`` (the paper's refinement):
            assignments fixed. Costs one float32 copy of the snapped weights (kept in
            checkpoints).
        reassign_from: where the latent weights of ``reassign=True`` start in
            :class:`~sq_lightning.callbacks.ClusterRefine`: ``"snap"`` (the snapped
            weights) or ``"coupling_start"`` (the weights before the coupling of the same
            ``Trainer``, shifted per cluster onto the snapped values; see ClusterRefine).
        ramp_steps: spread the snap over this many training batches: the clusters are
            fixed at the snap and, after each batch, each weight moves a fraction ``β`` of
            the way to its cluster's mean, ``β`` growing geometrically from ``ramp_from``
            to 1; ``0``: snap at once. Needs ``reassign=False``.
        ramp_from: ``β`` of the first step after the snap, in (0, 1].

    Raises:
        ValueError: a field out of range or a combination that cannot work.
    """

    reassign: bool = False
    reassign_from: Literal["snap", "coupling_start"] = "snap"
    ramp_steps: int = 0
    ramp_from: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.reassign, bool):
            raise ValueError(f"`reassign` must be True or False, got {self.reassign!r}.")
        check_choice("reassign_from", self.reassign_from, ("snap", "coupling_start"))
        if self.reassign_from == "coupling_start" and not self.reassign:
            raise ValueError("`reassign_from='coupling_start'` starts the latent weights of a refinement with moving "
                             "assignments from the weights before coupling: it needs `reassign=True`.")
        self.ramp  # validates ramp_steps and ramp_from
        if self.ramp_steps and self.reassign:
            raise ValueError("`ramp_steps` > 0 needs `reassign=False`: the gradual snap pulls each weight toward a "
                             "fixed cluster. Set `ramp_steps`=0 to refine with moving assignments.")

    @property
    def ramp(self) -> Ramp:
        """The gradual snap's pull schedule."""
        return Ramp(self.ramp_steps, self.ramp_from,
                    what="the first step's pull toward the cluster means; 1e-3 is a good start", zero="snap at once")


@dataclass(frozen=True)
class ExportConfig:
    """The compressed file written at the end of fit by ``ClusterRefine``.

    Args:
        path: the file (:func:`~sq_lightning.export.save_compressed`). A relative path is
            taken inside the run's log directory (``trainer.log_dir``), so every run gets
            its own file; an existing file is never replaced (checked at setup).
        coding: ``"packed"`` (``ceil(log2 K_l)`` bits per index) or ``"ans"``
            (entropy-coded, about ``H_l`` bits per index).
    """

    path: str
    coding: Coding = "packed"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"`export.path` must be a file path, got {self.path!r}. Leave `export` unset (None) "
                             "for no export.")
        object.__setattr__(self, "path", os.fspath(self.path))
        check_choice("coding", self.coding, ("packed", "ans"))
        if self.coding == "ans":
            from sq_lightning.export import entropy_coder

            entropy_coder()  # a missing entropy coder fails now, not after training


_SNAP_FIELDS = {f.name for f in fields(SnapConfig)}

#: Keyword arguments of earlier versions: old name -> where it is now.
MOVED: dict[str, str] = {
    **{name: f"snap=SnapConfig({name}=...)" for name in _SNAP_FIELDS},
    "reassign": "refine=RefineConfig(reassign=...)",
    "reassign_from": "refine=RefineConfig(reassign_from=...)",
    "snap_ramp_steps": "refine=RefineConfig(ramp_steps=...)",
    "snap_ramp_from": "refine=RefineConfig(ramp_from=...)",
    "ramp_steps": "refine=RefineConfig(ramp_steps=...)",
    "ramp_from": "refine=RefineConfig(ramp_from=...)",
    "export_path": "export=ExportConfig(path=...)",
    "export_coding": "export=ExportConfig(coding=...)",
}


def _yaml_form(python_form: str) -> str:
    group, _, rest = python_form.partition("=")
    field = rest[rest.index("(") + 1:rest.index("=")]
    return f"{group}: {{{field}: ...}}"


def reject_moved(owner: str, given: Mapping[str, Any]) -> None:
    """Fails for keyword arguments that moved into a settings group, naming where they went.

    Raises:
        TypeError: ``given`` holds an old or unknown keyword.
    """
    if not given:
        return
    lines = []
    for name in given:
        if name in MOVED:
            lines.append(f"`{name}` is now `{MOVED[name]}` (YAML: `{_yaml_form(MOVED[name])}`)")
        else:
            lines.append(f"`{name}` is not an argument")
    raise TypeError(f"{owner}: " + "; ".join(lines) + ". See sq_lightning.config.")


def check_group(name: str, value: Any, cls: type, allow_none: bool = False) -> None:
    """A settings group argument holds its dataclass (or ``None`` where that is allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, cls):
        hint = f" (None: {'no refinement' if cls is RefineConfig else 'none'})" if allow_none else ""
        if isinstance(value, bool) and cls is RefineConfig:
            hint = " (`refine=False` is now `refine=None`; `refine=True` is the default `RefineConfig()`)"
        raise TypeError(f"`{name}` must be a {cls.__name__}{' or None' if allow_none else ''}, got {value!r}{hint}.")
