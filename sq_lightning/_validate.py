"""Argument checks shared by the package's constructors: one wording for every message."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional


def check_int(name: str, value: Any, minimum: int = 0, hint: str = "", allow_none: bool = False) -> None:
    """``value`` is an int (not a bool) ``>= minimum`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an int >= {minimum}{none}{hint}, got {value!r}.")


def check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False,
                 maximum: Optional[float] = None, hint: str = "") -> None:
    """``value`` is a finite real (not a bool) ``>= minimum`` (``>`` when ``strict``), ``<= maximum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum) or (maximum is not None and value > maximum):
        bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        raise ValueError(f"`{name}` must be a finite number {bound}{hint}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
