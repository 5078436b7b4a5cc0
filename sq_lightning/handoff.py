"""The hand-off from a training stage to the snap.

A training stage (:class:`~sq_lightning.callbacks.SoftQuantCallback`,
:class:`~sq_lightning.callbacks.LearnedCodebook`, or a user's own callback) makes the
weights cluster; :class:`~sq_lightning.callbacks.ClusterRefine` snaps them. The two
talk through this small public interface only:

* the training stage implements :class:`ClusterSource`: its epoch window, whether it
  acts at the trainer's current step, and a :class:`SnapHint` with what the snap needs
  (the per-layer well ranges ``w_l`` of soft quantization, or the learned centroids of
  method B);
* :class:`ClusterRefine` finds the one ``ClusterSource`` among the Trainer's callbacks
  (:func:`find_source`), snaps where its window ends unless told otherwise, and asks it
  for the hint at the snap. Without a source (a refinement stage started from a saved
  checkpoint) it works from the weights alone.

Any callback with these members is a source; it need not inherit from anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol, runtime_checkable

from torch import Tensor

from sq_lightning.layers import LayerSelector

__all__ = ["ClusterSource", "SnapHint", "find_source"]


@dataclass(frozen=True)
class SnapHint:
    """What a training stage tells the snap.

    Attributes:
        w: the well range relative to each layer's std that the stage used (soft
            quantization), for the check that a ``w`` given to the snap agrees;
            ``None`` for a stage without one.
        w_l: per-layer well range in weight units, by full parameter name; the snap
            splits a layer's sorted weights where neighbours are more than
            ``gap · w_l`` apart. Empty before the stage has started.
        centroids: per-layer learned representatives (sorted 1-D tensors), by full
            parameter name; the snap assigns each weight to its nearest one. Empty for a
            stage that learns none, or before it has started.
        selector: the layers the stage works on; a snap given no selection of its own
            snaps these. ``None``: the snap's default selection.
    """

    w: Optional[float] = None
    w_l: Mapping[str, float] = field(default_factory=dict)
    centroids: Mapping[str, Tensor] = field(default_factory=dict)
    selector: Optional[LayerSelector] = None


@runtime_checkable
class ClusterSource(Protocol):
    """A callback that makes weights cluster and hands the clusters to the snap.

    Attributes:
        start_epoch: first epoch in which the stage acts.
        stop_epoch: first epoch in which it no longer acts (``None``: to the end of fit);
            :class:`~sq_lightning.callbacks.ClusterRefine` snaps at its start by default.
        provides: ``"w_l"`` (well ranges: the snap discovers the clusters in the gaps
            between the weights) or ``"centroids"`` (learned representatives: the snap
            assigns each weight to the nearest one).
    """

    start_epoch: int
    stop_epoch: Optional[int]
    provides: Literal["w_l", "centroids"]

    def is_active(self, trainer: Any) -> bool:
        """Whether the stage acts at the trainer's current epoch and step."""

    def snap_hint(self) -> SnapHint:
        """What the snap needs, as the stage stands now."""


def find_source(callbacks: Any, owner: str = "ClusterRefine") -> Optional[ClusterSource]:
    """The one :class:`ClusterSource` among ``callbacks`` (a Trainer's), or ``None``.

    Raises:
        ValueError: more than one: the snap could follow only one of them.
    """
    found = [cb for cb in callbacks if isinstance(cb, ClusterSource)]
    if len(found) > 1:
        names = ", ".join(type(cb).__name__ for cb in found)
        raise ValueError(
            f"{owner}: the Trainer has {len(found)} training stages that cluster weights ({names}); the snap can "
            "follow only one. Keep one of them in this Trainer."
        )
    return found[0] if found else None
