"""Which parameters are quantized.

Every method of the package (soft quantization, the learned-codebook regularizer,
cluster refinement, export) chooses its layers through :class:`LayerSelector`, so a
YAML config that names layers for one callback names the same layers for the next.

Selection order (first that applies wins):

1. a parameter whose full name matches one of ``exclude`` is never selected;
2. a parameter whose full name matches one of ``include`` is selected (any type);
3. otherwise the parameter must be the ``weight`` of a module whose class name is in
   ``module_types``.

Finally, parameters with fewer than ``min_size`` entries are dropped.
``select`` can be overridden in a subclass for the unusual case.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from torch import nn

DEFAULT_MODULE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


class LayerSelector:
    """Chooses the parameters that a quantization method acts on.

    Args:
        module_types: class names of modules whose ``weight`` is selected
            (``"Conv2d"``, ``"Linear"``, ...). Subclasses match too.
        include: regexes on the full parameter name (``re.search``); a match selects
            the parameter whatever its module type.
        exclude: regexes on the full parameter name; a match always deselects.
        min_size: parameters with fewer entries are skipped.

    Raises:
        ValueError: a pattern does not compile, or ``min_size`` is negative.
    """

    def __init__(
        self,
        module_types: Optional[Sequence[str]] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        min_size: int = 0,
    ) -> None:
        self.module_types = tuple(DEFAULT_MODULE_TYPES if module_types is None else module_types)
        if isinstance(module_types, str):
            raise ValueError(
                f"`module_types` must be a list of class names, got the string {module_types!r}. "
                f"Write `[{module_types!r}]`."
            )
        self.include = tuple(include or ())
        self.exclude = tuple(exclude or ())
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            if isinstance(patterns, str):
                raise ValueError(f"`{arg}` must be a list of regexes, got a string {patterns!r}.")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"`{arg}` pattern {pattern!r} is not a valid regex: {err}.") from err
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
            raise ValueError(f"`min_size` must be an int >= 0, got {min_size!r}.")
        self.min_size = min_size

    def _type_matches(self, module: nn.Module) -> bool:
        names = {cls.__name__ for cls in type(module).__mro__}
        return any(t in names for t in self.module_types)

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Returns ``(full_name, parameter)`` pairs in ``model.named_parameters`` order."""
        chosen: dict[str, nn.Parameter] = {}
        for mod_name, module in model.named_modules():
            for p_name, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if any(re.search(p, full) for p in self.exclude):
                    continue
                if any(re.search(p, full) for p in self.include) or (
                    p_name == "weight" and self._type_matches(module)
                ):
                    if param.numel() >= self.min_size:
                        chosen[full] = param
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        return sorted(chosen.items(), key=lambda kv: order.get(kv[0], len(order)))

    def select_or_raise(self, model: nn.Module, owner: str) -> list[tuple[str, nn.Parameter]]:
        """Like :meth:`select` but fails with a fix when nothing is selected."""
        selected = self.select(model)
        if not selected:
            raise ValueError(
                f"{owner}: no parameter of {type(model).__name__} was selected "
                f"(module_types={list(self.module_types)}, include={list(self.include)}, "
                f"exclude={list(self.exclude)}, min_size={self.min_size}). "
                "Widen `module_types`/`include`, or lower `min_size`."
            )
        return selected


def check_overrides(arg: str, overrides: object, what: str, low: int, high: Optional[int] = None) -> dict[str, int]:
    """Validates a per-layer override table (regex on the full parameter name -> int).

    Returns a copy; raises ``ValueError`` naming ``arg`` for a non-dict, a bad regex or
    a value outside ``[low, high]`` (``high=None``: no upper bound).
    """
    if not isinstance(overrides, dict):
        raise ValueError(f"`{arg}` must be a dict of regex -> {what}, got {type(overrides).__name__}.")
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    for pattern, value in overrides.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`{arg}` pattern {pattern!r} is not a valid regex: {err}.") from err
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ValueError(f"`{arg}[{pattern!r}]` must be an int {bound}, got {value!r}.")
    return dict(overrides)


def first_override(overrides: dict[str, int], name: str, default: Optional[int]) -> Optional[int]:
    """The value of the first pattern of ``overrides`` found in ``name`` (``re.search``), else ``default``."""
    for pattern, value in overrides.items():
        if re.search(pattern, name):
            return value
    return default
