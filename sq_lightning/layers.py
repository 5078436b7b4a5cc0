"""Which parameters are quantized.

Every method of the package (soft quantization, the learned-codebook regularizer,
cluster refinement, export) chooses its layers through :class:`LayerSelector`, so a
YAML config that names layers for one callback names the same layers for the next.

A parameter is selected when all of these hold:

1. it is the ``weight`` of a module whose class (or a base class) is named in
   ``module_types`` (default: ``Conv1d``, ``Conv2d``, ``Conv3d``, ``Linear``);
2. if ``include`` is given, its full name matches one of those regexes (``re.search``):
   ``include`` narrows the selection, it never adds a parameter of another type (to
   quantize an ``Embedding``, add ``"Embedding"`` to ``module_types``);
3. its full name matches none of ``exclude``;
4. it has at least ``min_size`` entries.

At setup (:meth:`LayerSelector.select_or_raise`) every ``include`` and ``exclude``
pattern must match at least one candidate of rule 1: a pattern that matches nothing is
an error naming it and the candidate names closest to it.
``select`` can be overridden in a subclass for the unusual case.
"""

from __future__ import annotations

import difflib
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
        include: regexes on the full parameter name (``re.search``); when given, only
            matching weights are selected.
        exclude: regexes on the full parameter name; a match is never selected.
        min_size: parameters with fewer entries are skipped.

    Raises:
        ValueError: a pattern does not compile, a list argument is given as a plain
            string, or ``min_size`` is negative.
    """

    def __init__(
        self,
        module_types: Optional[Sequence[str]] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        min_size: int = 0,
    ) -> None:
        for arg, value in (("module_types", module_types), ("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                what = "class names" if arg == "module_types" else "regexes"
                raise ValueError(f"`{arg}` must be a list of {what}, got the string {value!r}. Write `[{value!r}]`.")
        self.module_types = tuple(DEFAULT_MODULE_TYPES if module_types is None else module_types)
        self.include = tuple(include or ())
        self.exclude = tuple(exclude or ())
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not isinstance(pattern, str):
                    raise ValueError(f"`{arg}` must be a list of regexes (strings), got {pattern!r} in it.")
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

    def candidates(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``(full_name, parameter)`` of every ``weight`` of a module of ``module_types``."""
        out = []
        for mod_name, module in model.named_modules():
            param = module._parameters.get("weight") if self._type_matches(module) else None
            if isinstance(param, nn.Parameter):
                out.append((f"{mod_name}.weight" if mod_name else "weight", param))
        return out

    def select(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Returns ``(full_name, parameter)`` pairs in ``model.named_parameters`` order."""
        chosen = {
            name: param
            for name, param in self.candidates(model)
            if (not self.include or any(re.search(p, name) for p in self.include))
            and not any(re.search(p, name) for p in self.exclude)
            and param.numel() >= self.min_size
        }
        order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
        return sorted(chosen.items(), key=lambda kv: order.get(kv[0], len(order)))

    def check_patterns(self, model: nn.Module, owner: str) -> None:
        """Raises ``ValueError`` for an ``include`` or ``exclude`` pattern that matches no
        candidate weight of ``model``, naming the pattern and the closest candidate names."""
        names = [name for name, _ in self.candidates(model)]
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if any(re.search(pattern, name) for name in names):
                    continue
                close = difflib.get_close_matches(pattern.strip("^$\\"), names, n=3, cutoff=0.3) or names[:3]
                other = [n for n, _ in model.named_parameters() if re.search(pattern, n) and n not in names]
                if other and all(n.endswith(".weight") for n in other):
                    hint = (f" It matches {other[:3]}, weights of modules not in `module_types` "
                            f"{list(self.module_types)}: add their module type to `module_types`.")
                elif other:
                    hint = f" It matches {other[:3]}: only the `weight` of a module is ever quantized."
                else:
                    hint = ""
                raise ValueError(
                    f"{owner}: `{arg}` pattern {pattern!r} matches no weight of {type(model).__name__} "
                    f"(patterns are regexes searched in full parameter names). Closest names: {close}.{hint}"
                )

    def select_or_raise(self, model: nn.Module, owner: str) -> list[tuple[str, nn.Parameter]]:
        """Like :meth:`select`, after :meth:`check_patterns`, and fails with a fix when nothing is selected."""
        self.check_patterns(model, owner)
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
