"""Reading a network's weights from a checkpoint, checked before anything is copied."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["check_state_match", "read_network_state"]

# How many offending keys an error message spells out before summarising the rest.
_MAX_KEYS_SHOWN = 8


def read_network_state(path: str, arg: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The bare network's tensors in checkpoint ``path`` (the ``model.`` prefix of a Lightning
    checkpoint removed) and the checkpoint's saved hyperparameters (empty for a plain
    ``state_dict``). ``arg`` names the argument in the errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`{arg}` checkpoint {path!r} does not exist (working directory {os.getcwd()!r}). "
            "Point it at the previous stage's checkpoint, e.g. "
            "`runs/cifar10_resnet20/pretrain/checkpoints/best.ckpt`."
        )
    try:
        # weights_only: a checkpoint is data; never execute code found in one.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"`{arg}` checkpoint {path!r} could not be read: {err}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"`{arg}` file {path!r} holds neither a Lightning checkpoint nor a state_dict of tensors.")
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    saved = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, Mapping) else {}
    return dict(state), dict(saved) if isinstance(saved, Mapping) else {}


def _show(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else "")


def check_state_match(path: str, arg: str, model: nn.Module, state: Mapping, saved: Mapping, arch: Mapping,
                      arch_args: Sequence[str]) -> None:
    """Raises a RuntimeError naming ``arg`` if ``state`` does not fit ``model``.

    ``model`` was built with the architecture arguments ``arch``; where the checkpoint's saved
    hyperparameters ``saved`` differ from them in one of ``arch_args``, the message says so.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        differ = [k for k in arch_args if k in saved and k in arch and saved[k] != arch[k]]
        label = f" (arch={arch['arch']!r})" if "arch" in arch else ""
        parts = [f"`{arg}` checkpoint {path!r} does not match this model{label}."]
        if differ:
            theirs = ", ".join(f"{k}={saved[k]!r}" for k in differ)
            ours = ", ".join(f"{k}={arch[k]!r}" for k in differ)
            parts.append(f"The checkpoint was trained with {theirs}; this model has {ours}.")
        if shapes:
            parts.append(f"Shape mismatches: {_show(shapes)}.")
        if missing:
            parts.append(f"Missing in checkpoint: {_show(missing)}.")
        if unexpected:
            parts.append(f"Unexpected in checkpoint: {_show(unexpected)}.")
        parts.append("Build the model with the checkpoint's architecture arguments. The model was not changed.")
        raise RuntimeError(" ".join(parts))
