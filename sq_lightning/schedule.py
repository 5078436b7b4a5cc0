"""When a stage acts: epoch/step windows and the geometric ramp, written once.

Both are plain values checked at construction; callbacks ask them with the trainer's
``current_epoch`` and ``global_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sq_lightning._validate import check_int

__all__ = ["Ramp", "Window"]


@dataclass(frozen=True)
class Window:
    """Epochs ``[start_epoch, stop_epoch)`` and, when given, optimizer steps ``[start_step, stop_step)``;
    a ``None`` end is open. The two ranges combine by AND."""

    start_epoch: int = 0
    stop_epoch: Optional[int] = None
    start_step: Optional[int] = None
    stop_step: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("start_epoch", self.start_epoch, 0)
        for name in ("stop_epoch", "start_step", "stop_step"):
            check_int(name, getattr(self, name), 0, allow_none=True)
        if self.stop_epoch is not None and self.stop_epoch <= self.start_epoch:
            raise ValueError(
                f"`stop_epoch` ({self.stop_epoch}) must be > `start_epoch` ({self.start_epoch}): the window would be empty."
            )
        if self.stop_step is not None and self.start_step is not None and self.stop_step <= self.start_step:
            raise ValueError(
                f"`stop_step` ({self.stop_step}) must be > `start_step` ({self.start_step}): the window would be empty."
            )

    def covers_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` lies in the epoch range."""
        return epoch >= self.start_epoch and (self.stop_epoch is None or epoch < self.stop_epoch)

    def covers(self, epoch: int, step: int) -> bool:
        """Whether the optimizer step ``step`` of epoch ``epoch`` lies in the window."""
        if not self.covers_epoch(epoch):
            return False
        if self.start_step is not None and step < self.start_step:
            return False
        return self.stop_step is None or step < self.stop_step


@dataclass(frozen=True)
class Ramp:
    """A factor growing geometrically from ``start`` to 1 over ``steps`` steps:
    ``start ** (1 - min(k / steps, 1))`` at the k-th step (k = 0, 1, ...); 1 when ``steps`` is 0.

    ``prefix`` names the arguments in error messages (``ramp_steps`` / ``snap_ramp_steps``).
    """

    steps: int = 0
    start: float = 0.01
    prefix: str = ""
    what: str = "the fraction of the full strength at the first step, e.g. 0.01"
    zero: str = "no ramp"

    def __post_init__(self) -> None:
        check_int(f"{self.prefix}ramp_steps", self.steps, 0, hint=f" (0: {self.zero})")
        start = self.start
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1:
            raise ValueError(f"`{self.prefix}ramp_from` must be a number in (0, 1] ({self.what}), got {start!r}.")

    def factor(self, k: int) -> float:
        """The factor at the k-th step."""
        if not self.steps:
            return 1.0
        return float(self.start) ** (1.0 - min(k / self.steps, 1.0))

    def done(self, k: int) -> bool:
        """Whether the k-th step has the full value (``k >= steps``)."""
        return k >= self.steps
