"""Deployment formats of a clustered model: Core ML palettized weights and ONNX codebook + indices.

A model clustered by this package (after ``ClusterRefine``'s snap, or quantized post-training)
holds in each clustered layer ``l`` only ``K_l`` distinct weight values: exactly a palettized
(lookup-table) weight. This module writes such a model in two formats that run outside
PyTorch, each stored so that its size follows ``K_l``, and checks each file in its own
tools:

* **Core ML** (:func:`export_coreml`, checked by :func:`verify_coreml`): an ``.mlpackage``
  (ML program, ``torch.jit.trace`` + ``coremltools.convert``) in which every clustered weight
  is a ``constexpr_lut_to_dense`` op: a lookup table (LUT) holding the layer's ``K_l``
  centroids and one ``log2(LUT size)``-bit index per weight. Every other weight is converted
  as in a plain conversion (fp16 or fp32 constants). Core ML LUT sizes are powers of two
  (``{2, 4, 16, 64, 256}`` entries for iOS16 / macOS13, ``{2, 4, 8, 16, 64, 256}`` for iOS18
  / macOS15): when ``K_l`` is not one of them, the LUT holds the ``K_l`` centroids followed
  by copies of the last centroid up to the next allowed size, and no index points at the
  copies; the LUT's distinct values are then exactly the ``K_l`` centroids (rounded to the
  LUT's precision), which :func:`verify_coreml` checks.
* **ONNX** (:func:`export_onnx`, checked by :func:`verify_onnx`): every clustered weight
  stored as a float32 codebook initializer of exactly ``K_l`` entries plus an integer indices
  initializer of the weight's shape, rebuilt in the graph by ``Gather(codebook,
  Cast(indices, int32))`` whose output carries the weight's original name, so the
  ``Conv`` / ``MatMul`` / ``Gemm`` that reads it is unchanged. The indices are stored as
  uint8 (``K_l <= 256``) or, with ``index_dtype="uint4"`` (ONNX opset 21), as 4-bit values
  for layers with ``K_l <= 16``. ONNX's ``Gather`` accepts only int32 / int64 indices (the
  ONNX checker and onnxruntime 1.32 both reject uint8, int8 and int16 ones), hence the
  ``Cast``: onnxruntime folds it when the session is built, the file keeps the narrow type.

Batch normalization is kept as its own op in both formats (Core ML's conv/batch-norm fusion
passes and the ONNX exporter's fold are turned off): folding a per-channel scale into a
clustered convolution would give it up to ``K_l x channels`` distinct values, no longer a
``K_l``-entry palette. Core ML's runtime and onnxruntime can still fuse at load time.

Sources: a live ``nn.Module`` (clusters given, or found as the weights with few distinct
values), a Lightning checkpoint written after ``ClusterRefine``'s snap (clusters from its
saved state, as :func:`~sq_lightning.export.export_checkpoint` reads them), or a file
written by :func:`~sq_lightning.export.save_compressed` (with the model to load it into).
See :func:`load_clustered`.

``coremltools`` (>= 9.0), ``onnx`` and ``onnxruntime`` are optional dependencies, imported
only inside the functions that need them: ``pip install 'sq_lightning[deploy]'``. Core ML
prediction needs macOS; on Linux the package is converted, palettized, saved and checked
by reading it back (its MIL program and weight blobs), not run.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from sq_lightning.export import _check_cluster, _read_metadata, load_compressed

__all__ = [
    "ClusteredModel",
    "CoreMLCheck",
    "DeployReport",
    "DeployVerificationError",
    "FORMATS",
    "INDEX_DTYPES",
    "NoClusteredLayersError",
    "OnnxCheck",
    "PRECISIONS",
    "export_coreml",
    "export_onnx",
    "find_clusters",
    "load_clustered",
    "verify_coreml",
    "verify_onnx",
]

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "coreml", "onnx")
PRECISIONS = ("fp16", "fp32")
INDEX_DTYPES = ("uint8", "uint4")
TARGETS = ("iOS16", "iOS17", "iOS18")
_LUT_SIZES = {"iOS16": (2, 4, 16, 64, 256), "iOS17": (2, 4, 16, 64, 256), "iOS18": (2, 4, 8, 16, 64, 256)}
_INSTALL = "pip install 'sq_lightning[deploy]'"
_ONNX_INPUT, _ONNX_OUTPUT = "input", "output"

PathLike = Union[str, "os.PathLike[str]"]


class NoClusteredLayersError(ValueError):
    """The source holds no clustered (snapped) layer: nothing to palettize."""


class DeployVerificationError(RuntimeError):
    """An exported Core ML / ONNX file does not hold the clustered model it should."""


def _require(module: str, what: str):
    """Imports an optional dependency, or raises an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the optional package `{module}`, which is not installed: {_INSTALL} "
            "(coremltools>=9.0, onnx, onnxruntime)."
        ) from err


# --------------------------------------------------------------------------- sources


@dataclass
class ClusteredModel:
    """A network ready to export, with its clustered layers.

    Attributes:
        module: the network to trace, on the CPU, in eval mode (the ``.model`` of one of
            this package's LightningModules, or the module given).
        clusters: ``{parameter name in module: (codebook, indices)}``: the codebook a 1-D
            tensor of the ``K`` centroids in the parameter's dtype, the indices an int64
            tensor of the parameter's shape; ``codebook[indices]`` equals the weight exactly.
        example_input: the input traced (batch of 1).
        source: where it came from, for messages.
    """

    module: nn.Module
    clusters: dict[str, tuple[Tensor, Tensor]]
    example_input: Tensor
    source: str

    def weight(self, name: str) -> Tensor:
        return dict(self.module.named_parameters())[name].detach()

    def plain_weights(self) -> list[str]:
        """Conv / Linear / Embedding weights that are not clustered (stay dense)."""
        out = []
        for mod_name, mod in self.module.named_modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)):
                name = f"{mod_name}.weight" if mod_name else "weight"
                if name not in self.clusters:
                    out.append(name)
        return out


def find_clusters(module: nn.Module, max_k: int = 256) -> dict[str, tuple[Tensor, Tensor]]:
    """The clustered weights of a live module: every floating parameter of 2 or more
    dimensions with at most ``max_k`` distinct values and fewer distinct values than entries.

    Returns ``{name: (codebook, indices)}`` (codebook sorted ascending). A heuristic for
    modules whose clusters are not at hand; pass ``clusters`` explicitly (e.g.
    ``ClusterRefine.clusters()``) when they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    out = {}
    for name, p in module.named_parameters():
        if p.dim() < 2 or not p.is_floating_point():
            continue
        values, inverse = torch.unique(p.detach().cpu(), sorted=True, return_inverse=True)
        if values.numel() <= max_k and values.numel() < p.numel():
            out[name] = (values, inverse.long())
    return out


def load_clustered(
    source: Union[nn.Module, PathLike],
    *,
    model: Union[nn.Module, type, None] = None,
    clusters: Optional[Mapping[str, Sequence[Tensor]]] = None,
    example_input: Optional[Tensor] = None,
    callback: Optional[str] = None,
) -> ClusteredModel:
    """Resolves a clustered model from a live module, a Lightning checkpoint or a compressed file.

    Args:
        source: an ``nn.Module`` (its current weights); a ``.ckpt`` written by a
            ``Trainer`` that ran ``ClusterRefine``, after the snap (read with
            ``torch.load(weights_only=True)``; the clusters are its ``ClusterRefine``
            state); or a ``.safetensors`` file of :func:`~sq_lightning.export.save_compressed`
            / ``export_checkpoint`` (its codebooks are the clusters).
        model: for a file source, what to load the weights into: an ``nn.Module`` instance
            of the saved architecture, or a LightningModule class built from the
            checkpoint's hyperparameters. Left out for a checkpoint of this package's
            ``ImageClassifier`` / ``CharLanguageModel``, recognised from its
            hyperparameters; required for a ``.safetensors`` file (which names no class).
        clusters: ``{parameter name: (centroids, assignments)}`` overriding the ones found
            (names as in ``source``'s ``state_dict`` / ``named_parameters``). For a live
            module without them, :func:`find_clusters` finds them.
        example_input: the input to trace, batch of 1. Left out: ``(1, C, 32, 32)`` images
            for a ``CifarResNet``, ``(1, in_features)`` for an ``MLP``, ``(1, block_size)``
            token ids for a ``CharGPT``, else the module's ``example_input_array``.
        callback: the checkpoint key of the ``ClusterRefine`` state, when it holds several.

    A live module is used in place: it is moved to the CPU and put in eval mode, as tracing
    needs.

    Raises:
        NoClusteredLayersError: no clustered layer (a checkpoint saved without
            ``ClusterRefine`` or before its snap, a module whose weights are not snapped).
        ValueError: unreadable source, weights that are not the snapped values of their
            clusters, or no way to build the model / its example input.
    """
    if isinstance(source, nn.Module):
        module, where = source, f"module {type(source).__name__}"
        found = dict(clusters) if clusters is not None else find_clusters(source)
    else:
        path = os.fspath(source)
        where = repr(path)
        if not os.path.exists(path):
            raise ValueError(f"`source` {path!r} does not exist.")
        if os.path.isdir(path) or zipfile.is_zipfile(path):
            module, found = _from_checkpoint(path, model, clusters, callback)
        else:
            module, found = _from_compressed(path, model, clusters)
    if not found:
        raise NoClusteredLayersError(
            f"`source` {where} has no clustered (snapped) layer: export a model after ClusterRefine's snap "
            "(or quantize it first), or pass `clusters`."
        )
    module, found = _unwrap(module, found)
    module = module.cpu().eval()
    params = dict(module.named_parameters())
    checked = {}
    for name, pair in found.items():
        if name not in params:
            raise ValueError(f"`clusters` names {name!r}, which is not a parameter of {type(module).__name__}.")
        codebook, indices = _check_cluster(name, params[name], pair)
        if not torch.equal(codebook[indices], params[name].detach().cpu()):
            raise ValueError(
                f"{where}: the weights of {name!r} are not the snapped values of its clusters "
                "(codebook[indices] != weight): snap the model (ClusterRefine, or copy the quantized values in) first."
            )
        checked[name] = (codebook, indices)
    if example_input is None:
        example_input = _default_input(module, where)
    elif not isinstance(example_input, Tensor):
        raise ValueError(f"`example_input` must be a tensor, got {type(example_input).__name__}.")
    return ClusteredModel(module, checked, example_input.cpu(), where)


def _from_checkpoint(path, model, clusters, callback) -> tuple[nn.Module, dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable file, or objects outside torch's safe list
        raise ValueError(
            f"`source` {path!r} cannot be read with torch.load(weights_only=True) ({err}). "
            "Load the model yourself and pass the nn.Module."
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"`source` {path!r} is not a Lightning checkpoint (no 'state_dict').")
    state = ckpt["state_dict"]
    module = _build_module(path, model, ckpt.get("hyper_parameters") or {})
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"`source` {path!r} does not fit `model` {type(module).__name__}: {err}") from err
    if clusters is not None:
        return module, dict(clusters)
    states = {k: v for k, v in (ckpt.get("callbacks") or {}).items() if str(k).startswith("ClusterRefine")}
    if callback is not None:
        if callback not in states:
            raise ValueError(f"`callback` {callback!r} is not a ClusterRefine state of {path!r}; it has {sorted(states)}.")
        states = {callback: states[callback]}
    if not states:
        raise NoClusteredLayersError(
            f"`source` {path!r} has no clustered (snapped) layer: it was written by a Trainer without ClusterRefine."
        )
    if len(states) > 1:
        raise ValueError(f"`source` {path!r} holds {len(states)} ClusterRefine states ({sorted(states)}): name one with `callback`.")
    snapper = next(iter(states.values())).get("snapper", {})
    saved = snapper.get("clusters", {})
    if not saved:
        raise NoClusteredLayersError(
            f"`source` {path!r} has no clustered (snapped) layer: it was saved before ClusterRefine snapped. "
            "Export a checkpoint from after the snap epoch."
        )
    if not snapper.get("exact", True):
        raise ValueError(
            f"`source` {path!r} was saved during a gradual snap (ClusterRefine(refine=RefineConfig(ramp_steps=...))), before its "
            "weights reached their cluster values: export a checkpoint from after the ramp."
        )
    found = {}
    for name, c in saved.items():
        if name not in state:
            raise ValueError(f"`source` {path!r}: clustered layer {name!r} is not in its state_dict.")
        found[name] = (c["centroids"], c["assignments"].long().reshape(state[name].shape))
    return module, found


def _build_module(path: str, model, hparams: Mapping) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is None:
        cls = _known_class(hparams)
        if cls is None:
            raise ValueError(
                f"`source` {path!r}: cannot tell its model class from the checkpoint's hyperparameters: pass "
                "`model=` an instance of the architecture (or its LightningModule class)."
            )
    elif isinstance(model, type) and issubclass(model, nn.Module):
        cls = model
    else:
        raise ValueError(f"`model` must be an nn.Module instance or class, got {type(model).__name__}.")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in params and not k.startswith("_")}
    for key in ("init_from", "distill_from"):  # weights come from the checkpoint itself
        if key in params:
            kwargs[key] = None
    try:
        return cls(**kwargs)
    except Exception as err:
        raise ValueError(
            f"`source` {path!r}: could not build {cls.__name__} from the checkpoint's hyperparameters ({err}); "
            "pass `model=` an instance."
        ) from err


def _known_class(hparams: Mapping) -> Optional[type]:
    from sq_lightning.models import CharLanguageModel, ImageClassifier

    path = str(hparams.get("_class_path", ""))
    if path.endswith("CharLanguageModel") or (not path and {"vocab_size", "n_embd"} <= set(hparams)):
        return CharLanguageModel
    if path.endswith("ImageClassifier") or (not path and "arch" in hparams):
        return ImageClassifier
    return None


def _from_compressed(path, model, clusters) -> tuple[nn.Module, dict]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        meta = _read_metadata(data, path)
    except ValueError as err:
        raise ValueError(
            f"`source` {path!r} is neither a Lightning checkpoint nor an sq_lightning compressed file ({err})."
        ) from err
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"`source` {path!r} is a compressed file, which names no model class: pass `model=` an nn.Module "
            "of the saved architecture to load it into."
        )
    state = load_compressed(path, model, strict=True)
    if clusters is not None:
        return model, dict(clusters)
    import safetensors

    layout = json.loads(meta["sq.quantized"])
    found = {}
    with safetensors.safe_open(path, "pt") as f:
        for name in layout:
            codebook = f.get_tensor(name + ":codebook")
            found[name] = (codebook, _lookup(state[name].numpy(), codebook.numpy(), name).reshape(state[name].shape))
    return model, found


def _unwrap(module: nn.Module, clusters: dict) -> tuple[nn.Module, dict]:
    """The network inside one of this package's LightningModules (``.model``), names stripped."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and clusters and all(n.startswith("model.") for n in clusters):
        return inner, {n[len("model."):]: c for n, c in clusters.items()}
    return module, clusters


def _default_input(module: nn.Module, where: str) -> Tensor:
    from sq_lightning.models import MLP, CharGPT, CifarResNet

    if isinstance(module, CifarResNet):
        return torch.randn(1, module.conv1.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    if isinstance(module, MLP):
        first = next(m for m in module.modules() if isinstance(m, nn.Linear))
        return torch.randn(1, first.in_features, generator=torch.Generator().manual_seed(0))
    if isinstance(module, CharGPT):
        return torch.randint(0, module.tok_emb.num_embeddings, (1, module.block_size),
                             generator=torch.Generator().manual_seed(0))
    example = getattr(module, "example_input_array", None)
    if isinstance(example, Tensor):
        return example
    raise ValueError(f"{where}: no default input for {type(module).__name__}: pass `example_input` (a batch of 1).")


def _lookup(values: np.ndarray, codebook: np.ndarray, name: str) -> Tensor:
    """Index in ``codebook`` of every entry of ``values`` (exact match; the first of equal entries)."""
    order = np.argsort(codebook, kind="stable")
    ordered = codebook[order]
    flat = values.reshape(-1)
    pos = np.clip(np.searchsorted(ordered, flat), 0, len(ordered) - 1)
    if not np.array_equal(ordered[pos], flat):
        raise ValueError(f"the weights of {name!r} are not all entries of its codebook: not snapped.")
    return torch.from_numpy(order[pos].astype(np.int64))


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class LayerDeploy:
    """One clustered weight in an exported file.

    Attributes:
        k: distinct centroids ``K``.
        entries: LUT / codebook entries stored (Core ML: the padded power of two; ONNX: ``K``).
        index_bits: bits per stored index.
        dtype: of the LUT / codebook entries.
    """

    k: int
    entries: int
    index_bits: int
    dtype: str


@dataclass(frozen=True)
class DeployReport:
    """What :func:`export_coreml` / :func:`export_onnx` wrote.

    Attributes:
        path: the file (``.onnx``) or directory (``.mlpackage``) written.
        format: ``"coreml"`` or ``"onnx"``.
        bytes: its size on disk (a package: the sum of its files).
        layers: per clustered parameter (names of the traced network), its :class:`LayerDeploy`.
        plain: the Conv / Linear / Embedding weights stored dense.
        note: how it was made (Core ML: the torch frontend used).
    """

    path: str
    format: str
    bytes: int
    layers: dict[str, LayerDeploy]
    plain: list[str] = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        width = max([len("parameter"), *(len(n) for n in self.layers)])
        lines = [f"{'parameter':<{width}}  {'K':>4}  {'entries':>7}  {'bits':>4}  dtype", "-" * (width + 32)]
        for name, layer in self.layers.items():
            lines.append(f"{name:<{width}}  {layer.k:>4}  {layer.entries:>7}  {layer.index_bits:>4}  {layer.dtype}")
        lines.append(
            f"{self.path}: {self.format}, {self.bytes} bytes on disk, {len(self.layers)} clustered weight(s), "
            f"{len(self.plain)} dense: {', '.join(self.plain) or '-'}" + (f"; {self.note}" if self.note else "")
        )
        return "\n".join(lines)


def disk_bytes(path: PathLike) -> int:
    """Size on disk of a file, or the sum of the files under a directory (an ``.mlpackage``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _prepare_target(path: PathLike, overwrite: bool, suffix: str) -> str:
    path = os.fspath(path)
    if not path.endswith(suffix):
        raise ValueError(f"`path` must end with {suffix!r}, got {path!r}.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass `overwrite=True` to replace it.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"`path` {path!r}: directory {parent!r} does not exist.")
    return path


def _replace(tmp: str, path: str) -> None:
    """Moves ``tmp`` (file or directory) to ``path``, replacing what is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(os.path.abspath(path)))
        os.rmdir(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _lut_size(k: int, target: str, name: str) -> int:
    sizes = _LUT_SIZES[target]
    for size in sizes:
        if k <= size:
            return size
    raise ValueError(f"{name!r} has K={k} clusters; a Core ML lookup table holds at most {sizes[-1]}.")


# --------------------------------------------------------------------------- Core ML


def _np_dtype(precision: str):
    return np.float16 if precision == "fp16" else np.float32


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def export_coreml(
    source: Union[nn.Module, PathLike],
    path: PathLike,
    *,
    model: Union[nn.Module, type, None] = None,
    clusters: Optional[Mapping[str, Sequence[Tensor]]] = None,
    example_input: Optional[Tensor] = None,
    callback: Optional[str] = None,
    precision: str = "fp16",
    target: str = "iOS16",
    palettize: bool = True,
    overwrite: bool = False,
) -> DeployReport:
    """Writes a clustered model as a Core ML ``.mlpackage`` whose clustered weights are lookup tables.

    The network is traced (``torch.jit.trace`` on ``example_input``) and converted to an ML
    program (``coremltools.convert``), with the conv/batch-norm fusion passes removed so
    each clustered weight reaches the program unchanged; each clustered weight's constant
    is then palettized (``coremltools.optimize.coreml.palettize_weights``, one
    ``OpPalettizerConfig(mode="custom")`` per weight) with a LUT of the layer's own ``K``
    centroids: the LUT size is the smallest one Core ML allows at ``target`` that holds
    ``K`` entries, the extra entries copies of the last centroid (never indexed). Every
    other weight stays a dense constant.

    Args:
        source: the clustered model: an ``nn.Module``, a Lightning checkpoint or a
            compressed ``.safetensors`` file (see :func:`load_clustered`).
        model: what a file source is loaded into (see :func:`load_clustered`).
        clusters: ``{parameter name: (centroids, assignments)}``, else found (see
            :func:`load_clustered`).
        example_input: the input traced, batch of 1 (see :func:`load_clustered`).
        callback: the checkpoint's ``ClusterRefine`` state key, when it holds several.
        path: the package to write (must end with ``.mlpackage``; a directory).
        precision: ``"fp16"`` (default) or ``"fp32"``: the compute precision of the
            program, hence the dtype of the LUT entries and of every dense weight. fp16 is
            what Core ML deployments usually ship (the Neural Engine computes in fp16, and
            it is coremltools' default): each centroid is then rounded to the nearest
            fp16, a relative error below 2^-11, and the reconstructed weight equals the
            torch weight rounded to fp16. ``"fp32"`` keeps the centroids bit-exact (GPU /
            CPU execution only).
        target: minimum deployment target, ``"iOS16"`` (default: the first with
            palettized weights; LUTs of 2, 4, 16, 64 or 256 entries), ``"iOS17"``, or
            ``"iOS18"`` (also 8-entry, 3-bit LUTs; the iOS18 ``constexpr_lut_to_dense``).
        palettize: False writes the plain conversion (every weight dense), the reference
            for sizes.
        overwrite: replace an existing package at ``path``.

    Returns:
        A :class:`DeployReport` (LUT entries and index bits per clustered weight).

    Raises:
        ImportError: coremltools is not installed (``pip install 'sq_lightning[deploy]'``).
        NoClusteredLayersError: the source has no clustered layer.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a bad argument, or a layer with more than 256 clusters.
        RuntimeError: the conversion did not keep a clustered weight as a constant of
            its own (folded into another tensor), so it could not be palettized.
    """
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("target", target, TARGETS)
    path = _prepare_target(path, overwrite, ".mlpackage")
    cm = load_clustered(source, model=model, clusters=clusters, example_input=example_input, callback=callback)
    ct = _require("coremltools", "Core ML export")
    mlmodel, frontend = _convert_coreml(ct, cm, precision, target)
    layers: dict[str, LayerDeploy] = {}
    if palettize:
        mlmodel, layers = _palettize(ct, mlmodel, cm, precision, target)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        out = os.path.join(tmp, "model.mlpackage")
        mlmodel.save(out)
        _replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain = cm.plain_weights() + ([] if palettize else list(cm.clusters))
    report = DeployReport(path, "coreml", disk_bytes(path), layers, plain, f"traced with {frontend}")
    log.info("Wrote %s (%d bytes).", path, report.bytes)
    return report


def _convert_coreml(ct, cm: ClusteredModel, precision: str, target: str):
    """``(MLModel, frontend)``: the plain ML program conversion, from ``torch.jit.trace``, or,
    where coremltools' TorchScript frontend fails on the trace, from ``torch.export``."""
    x = cm.example_input
    pipeline = ct.PassPipeline.DEFAULT
    # Keep each clustered weight as it is: scaling it per channel (a folded batch norm) would
    # give a layer up to K x channels values.
    pipeline.remove_passes(["common::fuse_conv_batchnorm", "common::fuse_conv_scale"])
    common = dict(
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        pass_pipeline=pipeline,
    )
    dtype = None if x.is_floating_point() else np.int32
    try:
        with torch.no_grad():
            traced = torch.jit.trace(cm.module, x)
        inputs = [ct.TensorType(name=_ONNX_INPUT, shape=tuple(x.shape), **({"dtype": dtype} if dtype else {}))]
        return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=_ONNX_OUTPUT)], **common), "torch.jit.trace"
    except Exception as trace_err:  # the trace, or coremltools' TorchScript frontend on ops it does not handle
        log.warning("coremltools could not convert the torch.jit.trace of %s (%s: %s); trying torch.export.",
                    type(cm.module).__name__, type(trace_err).__name__, trace_err)
        try:
            exported = torch.export.export(cm.module, (x,)).run_decompositions({})
            inputs = [ct.TensorType(name=_ONNX_INPUT, **({"dtype": dtype} if dtype else {}))]
            return ct.convert(exported, inputs=inputs, outputs=[ct.TensorType(name=_ONNX_OUTPUT)], **common), "torch.export"
        except Exception as export_err:
            raise RuntimeError(
                f"Core ML conversion of {type(cm.module).__name__} failed: from torch.jit.trace with "
                f"{type(trace_err).__name__}: {trace_err}; from torch.export with {type(export_err).__name__}: "
                f"{export_err}. Nothing was written."
            ) from export_err


def _match(value: np.ndarray, expected: Mapping[str, np.ndarray]) -> Optional[tuple[str, bool]]:
    """``(name, transposed)`` of the expected weight ``value`` equals (as is, or transposed if 2-D)."""
    for name, w in expected.items():
        if w.size != value.size or w.dtype != value.dtype:
            continue
        if w.shape == value.shape and np.array_equal(w, value):
            return name, False
        if w.ndim == 2 and value.shape == w.shape[::-1] and np.array_equal(w.T, value):
            return name, True
    return None


def _same(expected: Mapping[str, np.ndarray], name: str) -> list[str]:
    """``name`` and the other expected weights with exactly its values (tied or identical layers)."""
    w = expected[name]
    return [n for n, v in expected.items() if n == name or (v.shape == w.shape and np.array_equal(v, w))]


def _const_ops(prog):
    for func in prog.functions.values():
        stack = [func]
        while stack:
            block = stack.pop()
            for op in block.operations:
                stack.extend(op.blocks)
                yield op


def _palettize(ct, mlmodel, cm: ClusteredModel, precision: str, target: str):
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    dtype = _np_dtype(precision)
    expected = {n: cm.weight(n).numpy().astype(dtype) for n in cm.clusters}
    configs, matched = {}, {}
    for op in _const_ops(mlmodel._mil_program):
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        if not isinstance(val, np.ndarray) or val.dtype != dtype or val.ndim < 2:
            continue
        hit = _match(val, expected)
        if hit is None:
            continue
        name = hit[0]
        codebook = cm.clusters[name][0].numpy().astype(dtype)
        size = _lut_size(codebook.size, target, name)
        configs[op.name] = OpPalettizerConfig(mode="custom", lut_function=_lut_function(codebook, size, name),
                                              granularity="per_tensor", weight_threshold=0)
        # Clustered weights with identical values may share this one (deduplicated) constant.
        for other in _same(expected, name):
            matched[other] = LayerDeploy(int(codebook.size), size, int(math.log2(size)), np.dtype(dtype).name)
    missing = [n for n in cm.clusters if n not in matched]
    if missing:
        raise RuntimeError(
            f"Core ML conversion: the clustered weight(s) {missing} are not constants of their own in the converted "
            "program (folded with another tensor by a conversion pass), so they cannot be palettized. Report the "
            "architecture; nothing was written."
        )
    compressed = palettize_weights(mlmodel, OptimizationConfig(op_name_configs=configs))
    return compressed, {n: matched[n] for n in cm.clusters}


def _lut_function(codebook: np.ndarray, size: int, name: str):
    lut = np.concatenate([codebook, np.repeat(codebook[-1:], size - codebook.size)]).astype(codebook.dtype)

    def lut_function(val: np.ndarray):
        indices = _lookup(np.asarray(val), codebook, name).numpy()
        return lut, indices.astype(np.uint8)

    return lut_function


@dataclass(frozen=True)
class LayerCheck:
    """What :func:`verify_coreml` / :func:`verify_onnx` found for one clustered weight.

    Attributes:
        op: the op / initializer holding it (``constexpr_lut_to_dense`` op, or the ONNX
            ``Gather`` output name).
        k: distinct centroids.
        entries: LUT / codebook entries stored.
        distinct: distinct values among them.
        max_centroid_error: largest ``|stored entry - centroid|`` (0 in fp32).
        transposed: the stored weight is the transpose of the torch weight (a folded
            ``Linear`` in a ``MatMul``).
    """

    op: str
    k: int
    entries: int
    distinct: int
    max_centroid_error: float
    transposed: bool = False


@dataclass(frozen=True)
class CoreMLCheck:
    """Result of :func:`verify_coreml`.

    Attributes:
        path: the package checked.
        spec_version: the Core ML specification version of the package (7: iOS16, 9: iOS18).
        layers: per clustered weight, its :class:`LayerCheck`.
        plain: names of the dense weight constants (``const`` ops read by conv / linear /
            matmul / gather ops).
        lut_dtype: dtype of the LUT entries.
    """

    path: str
    spec_version: int
    layers: dict[str, LayerCheck]
    plain: list[str]
    lut_dtype: str


def _load_mil(ct, path: str):
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = ct.utils.load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise DeployVerificationError(f"{path!r} is not an ML program (its spec holds a {spec.WhichOneof('Type')}).")
    weights = os.path.join(path, "Data", "com.apple.CoreML", "weights")
    return spec, milproto.load(spec, spec.specificationVersion, weights)


def verify_coreml(
    path: PathLike,
    source: Union[nn.Module, PathLike, ClusteredModel],
    *,
    model: Union[nn.Module, type, None] = None,
    clusters: Optional[Mapping[str, Sequence[Tensor]]] = None,
    callback: Optional[str] = None,
) -> CoreMLCheck:
    """Checks, by reading the saved package back, that every clustered weight is a lookup table of its centroids.

    The package's spec and weight blobs are loaded into a MIL program (no prediction:
    that needs macOS). For every clustered torch weight it requires one
    ``constexpr_lut_to_dense`` op whose reconstruction ``lut[indices]`` equals the torch
    weight exactly once rounded to the LUT's dtype (fp32: bit-exact; fp16: the weight
    rounded to fp16), whose LUT has a power-of-two size Core ML allows, and whose distinct
    LUT values are exactly the layer's ``K`` centroids rounded to that dtype (no stray
    entry: padding repeats a centroid). It also requires that no other LUT op exists and
    that the unclustered Conv / Linear weights are plain constants.

    Args:
        path: the ``.mlpackage``.
        source: the clustered model it was exported from (see :func:`load_clustered`), or
            its :class:`ClusteredModel`.
        model: what a file source is loaded into (see :func:`load_clustered`).
        clusters: ``{parameter name: (centroids, assignments)}``, else found (see
            :func:`load_clustered`).
        callback: the checkpoint's ``ClusterRefine`` state key, when it holds several.

    Returns:
        A :class:`CoreMLCheck`.

    Raises:
        ImportError: coremltools is not installed.
        DeployVerificationError: a check failed; the message names the layer.
    """
    ct = _require("coremltools", "Core ML verification")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"`path` {path!r} is not an .mlpackage directory.")
    cm = source if isinstance(source, ClusteredModel) else load_clustered(source, model=model, clusters=clusters, callback=callback)
    spec, prog = _load_mil(ct, path)
    lut_ops = [op for op in _const_ops(prog) if op.op_type == "constexpr_lut_to_dense"]
    if not lut_ops:
        raise DeployVerificationError(f"{path!r} has no constexpr_lut_to_dense op: it is not palettized.")
    dtype = lut_ops[0].lut.val.dtype
    if any(op.lut.val.dtype != dtype for op in lut_ops):
        raise DeployVerificationError(f"{path!r}: its LUTs mix dtypes.")
    expected = {n: cm.weight(n).numpy().astype(dtype) for n in cm.clusters}
    allowed = {s for sizes in _LUT_SIZES.values() for s in sizes}
    layers: dict[str, LayerCheck] = {}
    for op in lut_ops:
        dense = np.asarray(op.materialized_val_inference())
        hit = _match(dense, expected)
        if hit is None:
            raise DeployVerificationError(
                f"{path!r}: LUT op {op.name!r} (shape {dense.shape}) reconstructs no clustered torch weight "
                "(lut[indices] differs from every one)."
            )
        name, transposed = hit
        lut = np.asarray(op.lut.val).reshape(-1)
        if lut.size not in allowed:
            raise DeployVerificationError(f"{path!r}: {op.name!r} has a LUT of {lut.size} entries, not a Core ML size.")
        centroids = cm.clusters[name][0].double().numpy()
        want = np.unique(centroids.astype(dtype))
        got = np.unique(lut)
        if not np.array_equal(want, got):
            raise DeployVerificationError(
                f"{path!r}: the LUT of {name!r} ({op.name!r}) holds the values {got.tolist()}, "
                f"not the {centroids.size} centroids {want.tolist()} ({np.dtype(dtype).name})."
            )
        k = centroids.size
        err = float(np.abs(lut[:k].astype(np.float64) - centroids).max()) if lut[:k].size == k else float("inf")
        for other in _same(expected, name):  # identical clustered weights may share one LUT
            layers[other] = LayerCheck(op.name, k, int(lut.size), int(got.size), err, transposed)
    missing = [n for n in cm.clusters if n not in layers]
    if missing:
        raise DeployVerificationError(f"{path!r}: the clustered weight(s) {missing} are not lookup tables.")
    plain = []
    wanted_plain = {n: cm.weight(n).numpy().astype(dtype) for n in cm.plain_weights()}
    for op in _const_ops(prog):
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.ndim >= 2:
            hit = _match(op.outputs[0].val, wanted_plain)
            if hit is not None:
                plain.append(hit[0])
    missing_plain = [n for n in wanted_plain if n not in plain]
    if missing_plain:
        raise DeployVerificationError(
            f"{path!r}: the unclustered weight(s) {missing_plain} are not plain {np.dtype(dtype).name} constants."
        )
    return CoreMLCheck(path, int(spec.specificationVersion), {n: layers[n] for n in cm.clusters}, sorted(plain),
                       np.dtype(dtype).name)


# --------------------------------------------------------------------------- ONNX


def export_onnx(
    source: Union[nn.Module, PathLike],
    path: PathLike,
    *,
    model: Union[nn.Module, type, None] = None,
    clusters: Optional[Mapping[str, Sequence[Tensor]]] = None,
    example_input: Optional[Tensor] = None,
    callback: Optional[str] = None,
    opset: int = 17,
    index_dtype: str = "uint8",
    overwrite: bool = False,
) -> DeployReport:
    """Writes a clustered model as ONNX with each clustered weight as codebook + indices.

    The network is exported with ``torch.onnx.export`` (the TorchScript exporter,
    ``dynamo=False``, which needs no extra package; batch norm kept as its own op;
    a dynamic batch axis, and a dynamic sequence axis for token inputs). Every float
    initializer equal to a clustered weight (or, for a ``Linear`` exported as ``MatMul``,
    to its transpose) is then replaced by a float32-or-weight-dtype codebook initializer
    of the layer's ``K`` centroids, an indices initializer of the same shape, and
    ``Cast(indices, to=int32)`` -> ``Gather(codebook, indices)`` producing a tensor of the
    initializer's name. ``onnx.checker.check_model(full_check=True)`` runs on the result.

    Args:
        source: the clustered model: an ``nn.Module``, a Lightning checkpoint or a
            compressed ``.safetensors`` file (see :func:`load_clustered`).
        model: what a file source is loaded into (see :func:`load_clustered`).
        clusters: ``{parameter name: (centroids, assignments)}``, else found (see
            :func:`load_clustered`).
        example_input: the input traced, batch of 1 (see :func:`load_clustered`).
        callback: the checkpoint's ``ClusterRefine`` state key, when it holds several.
        path: the file to write (``.onnx``).
        opset: ONNX opset of the export (default 17).
        index_dtype: ``"uint8"`` (default; one byte per weight, any ``K <= 256``) or
            ``"uint4"`` (half a byte per weight for layers with ``K <= 16``, uint8 for the
            others; needs opset 21, to which the model is converted, and an
            onnxruntime that reads 4-bit tensors, 1.20 or later).
        overwrite: replace an existing file at ``path``.

    Returns:
        A :class:`DeployReport`.

    Raises:
        ImportError: onnx is not installed (``pip install 'sq_lightning[deploy]'``).
        NoClusteredLayersError: the source has no clustered layer.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a bad argument, or a layer with more than 256 clusters.
        RuntimeError: a clustered weight is not an initializer of its own in the export.
    """
    _check_choice("index_dtype", index_dtype, INDEX_DTYPES)
    if not isinstance(opset, int) or not 13 <= opset <= 23:
        raise ValueError(f"`opset` must be an int in [13, 23], got {opset!r}.")
    path = _prepare_target(path, overwrite, ".onnx")
    cm = load_clustered(source, model=model, clusters=clusters, example_input=example_input, callback=callback)
    onnx = _require("onnx", "ONNX export")
    for name, (codebook, _) in cm.clusters.items():
        if codebook.numel() > 256:
            raise ValueError(f"{name!r} has K={codebook.numel()} clusters; export_onnx stores at most 256 (uint8 indices).")
    proto = _torch_to_onnx(onnx, cm, min(opset, 20))
    layers = _rewrite_onnx(onnx, proto, cm, index_dtype)
    if index_dtype == "uint4":
        opset = max(opset, 21)
    if _opset(proto) != opset:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    report = DeployReport(path, "onnx", disk_bytes(path), layers, cm.plain_weights())
    log.info("Wrote %s (%d bytes).", path, report.bytes)
    return report


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _torch_to_onnx(onnx, cm: ClusteredModel, opset: int):
    x = cm.example_input
    axes = {0: "batch"} if x.is_floating_point() else {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            cm.module, (x,), buffer, dynamo=False, opset_version=opset, input_names=[_ONNX_INPUT],
            output_names=[_ONNX_OUTPUT], dynamic_axes={_ONNX_INPUT: axes, _ONNX_OUTPUT: axes},
            # PRESERVE on an eval-mode module: inference graph, without folding batch norm
            # into the preceding convolution (which would unsnap its weights).
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _rewrite_onnx(onnx, proto, cm: ClusteredModel, index_dtype: str) -> dict[str, LayerDeploy]:
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    expected = {n: cm.weight(n).numpy() for n in cm.clusters}
    new_inits, new_nodes, layers = [], [], {}
    for init in list(graph.initializer):
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        value = numpy_helper.to_array(init)
        hit = _match(value, expected)
        if hit is None:
            continue
        name = hit[0]
        codebook = cm.clusters[name][0].numpy()
        indices = _lookup(value, codebook, name).numpy().reshape(value.shape)
        base = init.name
        cb_name, idx_name, cast_name = f"{base}.sq_codebook", f"{base}.sq_indices", f"{base}.sq_indices_int32"
        new_inits.append(numpy_helper.from_array(codebook.astype(value.dtype), cb_name))
        if index_dtype == "uint4" and codebook.size <= 16:
            import ml_dtypes  # a dependency of onnx >= 1.17: numpy's 4-bit types, packed two per byte

            new_inits.append(numpy_helper.from_array(indices.astype(np.uint8).astype(ml_dtypes.uint4), idx_name))
            bits = 4
        else:
            new_inits.append(numpy_helper.from_array(indices.astype(np.uint8), idx_name))
            bits = 8
        new_nodes += [
            helper.make_node("Cast", [idx_name], [cast_name], to=TensorProto.INT32, name=f"{base}.sq_cast"),
            helper.make_node("Gather", [cb_name, cast_name], [base], axis=0, name=f"{base}.sq_gather"),
        ]
        graph.initializer.remove(init)
        for other in _same(expected, name):  # identical (tied) clustered weights share one initializer
            layers[other] = LayerDeploy(int(codebook.size), int(codebook.size), bits, value.dtype.name)
    missing = [n for n in cm.clusters if n not in layers]
    if missing:
        raise RuntimeError(
            f"ONNX export: the clustered weight(s) {missing} are not initializers of their own in the exported "
            "graph (folded with another tensor), so they cannot be stored as codebook + indices; nothing was written."
        )
    graph.initializer.extend(new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    return {n: layers[n] for n in cm.clusters}


@dataclass(frozen=True)
class OnnxCheck:
    """Result of :func:`verify_onnx`.

    Attributes:
        path: the file checked.
        layers: per clustered weight, its :class:`LayerCheck`.
        plain: the unclustered Conv / Linear / Embedding weights found as dense initializers.
        inputs: number of inputs run through onnxruntime and torch.
        max_abs_diff: largest ``|onnxruntime output - torch output|``.
        agree: fraction of inputs whose arg-max over the last axis is the same
            (classification: the predicted class; language model: every position).
    """

    path: str
    layers: dict[str, LayerCheck]
    plain: list[str]
    inputs: int
    max_abs_diff: float
    agree: float


def verify_onnx(
    path: PathLike,
    source: Union[nn.Module, PathLike, ClusteredModel],
    *,
    model: Union[nn.Module, type, None] = None,
    clusters: Optional[Mapping[str, Sequence[Tensor]]] = None,
    callback: Optional[str] = None,
    inputs: Optional[Tensor] = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> OnnxCheck:
    """Checks an ONNX export in onnx and onnxruntime against the torch model.

    ``onnx.checker.check_model(full_check=True)``; every clustered weight stored as a
    codebook of exactly its ``K`` centroids (bit-exact) plus integer indices
    (uint8 / uint4) read by ``Cast`` -> ``Gather``, with ``codebook[indices]`` equal to
    the torch weight (or its transpose) bit for bit, and no dense copy of it left; the
    unclustered Conv / Linear / Embedding weights dense initializers; then ``inputs`` run
    through onnxruntime (CPU) and torch: outputs within ``atol + rtol * |torch|`` and the
    same arg-max (predicted class / next token) everywhere.

    Args:
        path: the ``.onnx`` file.
        source: the clustered model it was exported from (see :func:`load_clustered`), or
            its :class:`ClusteredModel`.
        model: what a file source is loaded into (see :func:`load_clustered`).
        clusters: ``{parameter name: (centroids, assignments)}``, else found (see
            :func:`load_clustered`).
        callback: the checkpoint's ``ClusterRefine`` state key, when it holds several.
        inputs: a batch to run (e.g. CIFAR-10 test images, normalized); default: the
            example input.
        atol: absolute tolerance of the outputs.
        rtol: relative tolerance of the outputs.

    Returns:
        An :class:`OnnxCheck`.

    Raises:
        ImportError: onnx or onnxruntime is not installed.
        DeployVerificationError: a check failed; the message names the layer or the outputs.
    """
    onnx = _require("onnx", "ONNX verification")
    ort = _require("onnxruntime", "ONNX verification")
    from onnx import numpy_helper

    path = os.fspath(path)
    cm = source if isinstance(source, ClusteredModel) else load_clustered(source, model=model, clusters=clusters, callback=callback)
    proto = onnx.load(path)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:
        raise DeployVerificationError(f"{path!r} fails onnx.checker.check_model: {err}") from err
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    expected = {n: cm.weight(n).numpy() for n in cm.clusters}
    layers: dict[str, LayerCheck] = {}
    for node in proto.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        cast = producers.get(node.input[1])
        idx_name = cast.input[0] if cast is not None and cast.op_type == "Cast" else node.input[1]
        if idx_name not in inits:
            continue
        idx_init = inits[idx_name]
        if idx_init.data_type not in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4):
            raise DeployVerificationError(
                f"{path!r}: indices {idx_name!r} are {onnx.helper.tensor_dtype_to_string(idx_init.data_type)}, "
                "not uint8 / uint4."
            )
        codebook = numpy_helper.to_array(inits[node.input[0]])
        if codebook.ndim != 1:
            continue  # an Embedding lookup of a dense table, not a codebook
        dense = codebook[numpy_helper.to_array(idx_init).astype(np.int64)]
        hit = _match(dense, expected)
        if hit is None:
            raise DeployVerificationError(f"{path!r}: codebook Gather {node.output[0]!r} rebuilds no clustered torch weight.")
        name, transposed = hit
        centroids = cm.clusters[name][0].numpy()
        if codebook.size != centroids.size or not np.array_equal(codebook, centroids.astype(codebook.dtype)):
            raise DeployVerificationError(
                f"{path!r}: the codebook of {name!r} is {codebook.tolist()}, not its {centroids.size} centroids."
            )
        for other in _same(expected, name):
            layers[other] = LayerCheck(node.output[0], int(centroids.size), int(codebook.size),
                                       int(np.unique(codebook).size), 0.0, transposed)
    missing = [n for n in cm.clusters if n not in layers]
    if missing:
        raise DeployVerificationError(f"{path!r}: the clustered weight(s) {missing} are not stored as codebook + indices.")
    dense_inits = {n: numpy_helper.to_array(i) for n, i in inits.items()
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    leftover = [v for v in dense_inits.values() if v.ndim >= 2 and _match(v, expected) is not None]
    if leftover:
        raise DeployVerificationError(f"{path!r}: a clustered weight is still stored dense as well.")
    wanted_plain = {n: cm.weight(n).numpy() for n in cm.plain_weights()}
    plain = sorted({hit[0] for v in dense_inits.values() if (hit := _match(v, wanted_plain)) is not None})
    if set(plain) != set(wanted_plain):
        raise DeployVerificationError(
            f"{path!r}: the unclustered weight(s) {sorted(set(wanted_plain) - set(plain))} are not dense initializers."
        )

    x = cm.example_input if inputs is None else inputs
    if not isinstance(x, Tensor):
        raise ValueError(f"`inputs` must be a tensor batch, got {type(x).__name__}.")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = x.cpu().numpy() if x.is_floating_point() else x.cpu().long().numpy()
    got = session.run(None, {session.get_inputs()[0].name: feed})[0]
    with torch.no_grad():
        want = cm.module(x.cpu()).numpy()
    if got.shape != want.shape:
        raise DeployVerificationError(f"{path!r}: onnxruntime output shape {got.shape} != torch {want.shape}.")
    diff = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        raise DeployVerificationError(
            f"{path!r}: onnxruntime and torch outputs differ by up to {diff:.3g} (atol={atol}, rtol={rtol})."
        )
    if agree != 1.0:
        raise DeployVerificationError(f"{path!r}: onnxruntime and torch disagree on {100 * (1 - agree):.2f}% of the predictions.")
    return OnnxCheck(path, {n: layers[n] for n in cm.clusters}, plain, int(x.shape[0]), diff, agree)
