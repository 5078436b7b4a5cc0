"""Compressed model artifact: per-layer codebook plus bit-packed or entropy-coded indices, in safetensors.

After clustering (soft quantization, Bernstein, Di Carlo, Schwab, "Soft Quantization: Model
Compression Via Weight Coupling", arXiv:2601.21219, or one of the post-training baselines),
layer ``l`` holds ``K_l`` distinct values. Stored as a ``K_l``-entry codebook plus one
index of ``b_l = ceil(log2 K_l)`` bits per weight (0 bits when ``K_l = 1``), the layer costs
what the bit-widths logged during training promise. Soft quantization leaves unequal
cluster populations (one crowded cluster near zero), so an entropy coder stores the same
indices in about ``H_l`` bits per weight, the entropy of the populations logged as
``sq/entropy/<layer>``: ``coding="ans"`` codes each layer's indices with rANS (the
``constriction`` library, Bamler, https://bamler-lab.github.io/constriction/) under the
layer's empirical distribution. This module writes and reads that artifact; it never
pickles (safetensors holds only raw tensors and string metadata).

File layout, format ``"sq_lightning.compressed"``, version 3, one safetensors file (this
module also reads versions 1 and 2, written by earlier releases: the same layout with a
checksum per tensor, see below):

- ``"<name>"``: every ``state_dict`` entry that is not quantized (other parameters and
  buffers), stored as is (dtype and shape kept).
- ``"<name>:codebook"``: ``[K]`` codebook of quantized parameter ``name``, in the
  parameter's dtype, so that ``codebook[indices]`` is bit-identical to the snapped weight.
- ``"<name>:indices"``: uint8 ``[ceil(N·b/8)]``, the ``N`` indices (the parameter's
  entries in row-major order) bit-packed, absent when ``K = 1``.
- entropy-coded parameters (``"coding": "ans"`` in their layout entry) store instead of
  ``":indices"`` a ``"<name>:ans"``, uint32 ``[words]``: the rANS stream of
  constriction's ``AnsCoder`` (``encode_reverse`` of the ``N`` indices under
  ``Categorical(counts as float64, perfect=False)``, its ``get_compressed()`` words),
  absent when ``K = 1``. Their layout entry also holds ``"counts"``, the population of
  each index (the coding distribution, ``K`` integers), and ``"index_digest"``: the first
  16 hex digits of the SHA-256 of the indices as little-endian int32, checked after
  decoding, so a coder that rebuilt a different fixed-point model (another constriction
  version) fails loudly instead of loading wrong weights.
- string metadata (JSON where structured):
  ``"sq.format"``, ``"sq.format_version"``;
  ``"sq.keys"``: the ``state_dict`` keys in their original order;
  ``"sq.quantized"``: ``{name: {"shape", "k", "bits", "dtype"}}`` (plus ``"coding"``,
  ``"counts"`` and ``"index_digest"`` for entropy-coded ones);
  ``"sq.entropy_coder"`` (when a layer is entropy-coded): the coder that wrote the
  streams, e.g. ``"constriction 0.5.0"``;
  ``"sq.checksum"``: one SHA-256 over the whole content, the hex digest of
  ``json.dumps(sums, sort_keys=True)`` where ``sums`` maps every tensor's key to
  ``sha256(f"{dtype}|{shape}|".encode() + raw bytes)`` (``dtype`` as ``str(torch.dtype)``,
  ``shape`` as a Python tuple) and ``"__metadata__"`` to the SHA-256 of
  ``json.dumps(other metadata, sort_keys=True)``; so a flipped byte anywhere in the file is
  detected (corruption, not forgery: anyone can recompute it). Versions 1 and 2 stored
  ``sums`` itself as ``"sq.checksums"`` (64 hex digits per tensor: 13 kB of a ResNet-20
  file's header, as much as its entropy-coded weights), version 1 only bit-packed layers.
  The caller's own ``metadata`` entries sit beside these (any key not starting ``"sq."``).

Two saves of the same model are the same bytes. safetensors itself writes the header's
metadata entries in a random order (safetensors issue #584); the writer here puts them
back in sorted order (same entries, same header length) before the file is written.

Bit order (little-endian): index ``i`` occupies the bits ``[i·b, (i+1)·b)`` of one bit
stream, least significant bit first; stream bit ``p`` is bit ``p mod 8`` (bit 0 = least
significant) of byte ``p div 8``. This is ``numpy.packbits(..., bitorder="little")``;
the unused high bits of the last byte are zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = [
    "CODINGS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ExportReport",
    "StoredLayer",
    "export_checkpoint",
    "load_compressed",
    "save_compressed",
    "save_state_compressed",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "sq_lightning.compressed"
FORMAT_VERSION = 3  # the version written
_READABLE_VERSIONS = ("1", "2", "3")
CODINGS = ("packed", "ans")

_CODEBOOK = ":codebook"
_INDICES = ":indices"
_ANS = ":ans"
_SUFFIXES = (_CODEBOOK, _INDICES, _ANS)
_META_PREFIX = "sq."
_META_DIGEST_KEY = "__metadata__"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class StoredLayer:
    """Storage of one quantized parameter (the snap's :class:`sq_lightning.snapper.LayerReport`
    reports ``bits = log2 K``; storage needs whole bits per packed index).

    Attributes:
        numel: number of weights ``N``.
        k: codebook size ``K``.
        index_bits: bits per packed index, ``ceil(log2 K)`` (0 for ``K = 1``).
        codebook_bytes: bytes of the codebook.
        index_bytes: bytes of the stored indices: packed, ``ceil(N·index_bits/8)``; entropy-coded,
            the rANS stream (its ``K`` counts sit in the header).
        coding: ``"packed"`` or ``"ans"``.
    """

    numel: int
    k: int
    index_bits: int
    codebook_bytes: int
    index_bytes: int
    coding: str = "packed"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`save_compressed` wrote.

    Attributes:
        path: the file written.
        file_bytes: its size on disk (header included).
        fp32_bytes: size of the same ``state_dict`` with every floating-point entry as
            float32 (other entries at their own size): the uncompressed reference.
        payload_bytes: codebooks + packed indices + the other entries' raw bytes, i.e.
            the file without the safetensors header.
        layers: per quantized parameter, its :class:`StoredLayer`.
    """

    path: str
    file_bytes: int
    fp32_bytes: int
    payload_bytes: int
    layers: dict[str, StoredLayer]

    @property
    def compression_ratio(self) -> float:
        """``fp32_bytes / file_bytes``."""
        return self.fp32_bytes / self.file_bytes

    @property
    def bits_weighted(self) -> float:
        """Packed index bits per quantized weight, ``Σ N_l b_l / Σ N_l`` (0.0 with no layer)."""
        total = sum(layer.numel for layer in self.layers.values())
        return sum(layer.numel * layer.index_bits for layer in self.layers.values()) / total if total else 0.0

    @property
    def stored_bits_weighted(self) -> float:
        """Index bits per quantized weight as written, ``8·Σ index_bytes_l / Σ N_l`` (0.0 with no layer).

        Packed: ``bits_weighted`` plus the byte padding; entropy-coded: close to the
        parameter-weighted entropy of the cluster populations.
        """
        total = sum(layer.numel for layer in self.layers.values())
        return 8 * sum(layer.index_bytes for layer in self.layers.values()) / total if total else 0.0

    def __str__(self) -> str:
        name_width = max([len("parameter"), *(len(n) for n in self.layers)])
        lines = [
            f"{'parameter':<{name_width}}  {'numel':>9}  {'K':>5}  {'bits':>4}  {'coding':>6}  {'bytes':>9}",
            "-" * (name_width + 45),
        ]
        for name, layer in self.layers.items():
            size = layer.codebook_bytes + layer.index_bytes
            lines.append(
                f"{name:<{name_width}}  {layer.numel:>9}  {layer.k:>5}  {layer.index_bits:>4}  {layer.coding:>6}  {size:>9}"
            )
        lines.append(
            f"{self.path}: {self.file_bytes} bytes on disk, {self.fp32_bytes} bytes as fp32, "
            f"ratio {self.compression_ratio:.2f}x, {self.bits_weighted:.2f} bits per quantized weight "
            f"({self.stored_bits_weighted:.2f} as stored)"
        )
        return "\n".join(lines)


def save_compressed(
    model: nn.Module,
    path: PathLike,
    clusters: Mapping[str, Sequence[Tensor]],
    metadata: Optional[dict[str, str]] = None,
    *,
    overwrite: bool = False,
    coding: str = "packed",
) -> ExportReport:
    """Writes ``model``'s ``state_dict`` with the ``clusters`` parameters as codebook + packed indices.

    The quantized parameters are stored as ``centroids[assignments]`` (cast to the
    parameter's dtype), whatever their current values in ``model``: snap the model first
    if it should hold the same weights as the file. A tied parameter reachable under a
    second ``state_dict`` key is stored raw under that key.

    The file is written to a temporary file in the same directory, synced, then renamed
    over ``path``, so a crash never leaves a partial file under that name.

    Args:
        model: the model whose ``state_dict`` is saved (moved to CPU for writing).
        path: target file (``.safetensors`` by convention). Its directory must exist.
        clusters: ``{full parameter name: (centroids, assignments)}`` as in
            ``model.named_parameters()``: ``centroids`` a 1-D floating tensor of ``K >= 1``
            finite levels, ``assignments`` an integer tensor of the parameter's shape with
            values in ``[0, K)``. A :class:`~sq_lightning.ops.baselines.Quantization`
            works as the pair.
        metadata: extra ``str -> str`` entries stored in the header (keys must not start
            with ``"sq."``).
        overwrite: replace an existing file at ``path``.
        coding: how the indices are stored: ``"packed"`` (``ceil(log2 K)`` bits each) or
            ``"ans"`` (entropy-coded under each layer's cluster populations, about ``H_l``
            bits each; needs ``constriction``, a dependency of sq_lightning, to write and
            to read).

    Returns:
        The :class:`ExportReport` of the written file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``clusters`` is not a dict, an entry names no parameter or is
            inconsistent with it, ``metadata`` is not ``str -> str`` or uses a reserved key,
            or ``coding`` is not one of ``CODINGS``.
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: ``coding="ans"`` without ``constriction`` installed.

    Example::

        q = quantize(model.fc.weight, 4, "kmeans")
        with torch.no_grad():
            model.fc.weight.copy_(q.values)
        print(save_compressed(model, "model.safetensors", {"fc.weight": q}))
        save_compressed(model, "model.ans.safetensors", {"fc.weight": q}, coding="ans")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    return _write(
        model.state_dict(), dict(model.named_parameters()), type(model).__name__, path, clusters, metadata, overwrite, coding
    )


def save_state_compressed(
    state: Mapping[str, Tensor],
    path: PathLike,
    clusters: Mapping[str, Sequence[Tensor]],
    metadata: Optional[dict[str, str]] = None,
    overwrite: bool = False,
    coding: str = "packed",
) -> ExportReport:
    """:func:`save_compressed` for a ``state_dict`` (say one gathered from FSDP2 shards) instead
    of a module: every entry of ``clusters`` names a key of ``state`` whose tensor holds the
    snapped values. Same file, same checks, same errors."""
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a state_dict (a mapping of name to tensor), got {type(state).__name__}.")
    return _write(state, state, "the state_dict", path, clusters, metadata, overwrite, coding)


def _write(
    state: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    owner: str,
    path: PathLike,
    clusters: Mapping[str, Sequence[Tensor]],
    metadata: Optional[dict[str, str]],
    overwrite: bool,
    coding: str,
) -> ExportReport:
    """:func:`save_compressed` on a ``state_dict`` whose quantizable entries are ``params``."""
    if not isinstance(clusters, Mapping):
        raise ValueError(
            f"`clusters` must be a dict of parameter name to (centroids, assignments), got {type(clusters).__name__}."
        )
    user_meta = _check_metadata(metadata)
    if coding not in CODINGS:
        raise ValueError(f"`coding` must be one of {CODINGS}, got {coding!r}.")
    ans = entropy_coder() if coding == "ans" else None
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict] = {}
    layers: dict[str, StoredLayer] = {}

    for name, pair in clusters.items():
        param = params.get(name)
        if param is None:
            known = ", ".join(list(params)[:8])
            raise ValueError(
                f"`clusters` names {name!r}, which is not a parameter of {owner} "
                f"(parameters: {known}{', ...' if len(params) > 8 else ''}). "
                "Use the full names of `model.named_parameters()`."
            )
        codebook, indices = _check_cluster(name, param, pair)
        k, bits = codebook.numel(), _bits(codebook.numel())
        for key in (name + suffix for suffix in _SUFFIXES):
            if key in state:
                raise ValueError(
                    f"`clusters` entry {name!r} would be stored as {key!r}, which is already a state_dict key."
                )
        tensors[name + _CODEBOOK] = codebook
        layout[name] = {"shape": list(param.shape), "k": k, "bits": bits, "dtype": str(param.dtype)}
        index_bytes = 0
        if ans is not None:
            idx32 = indices.reshape(-1).to(torch.int32).numpy()
            counts = np.bincount(idx32, minlength=k)
            layout[name].update(coding="ans", counts=counts.tolist(), index_digest=_index_digest(idx32))
            if bits:
                words = _ans_encode(ans, idx32, counts)
                tensors[name + _ANS] = words
                index_bytes = words.numel() * words.element_size()
        elif bits:
            packed = _pack(indices, bits)
            tensors[name + _INDICES] = packed
            index_bytes = packed.numel()
        layers[name] = StoredLayer(
            param.numel(), k, bits, codebook.numel() * codebook.element_size(), index_bytes, coding
        )

    fp32_bytes = 0
    for key, value in state.items():
        fp32_bytes += value.numel() * (4 if value.is_floating_point() else value.element_size())
        if key not in layout:
            # A copy: safetensors refuses tensors sharing storage (tied weights, views).
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()

    meta = {
        **user_meta,
        "sq.format": FORMAT_NAME,
        "sq.format_version": str(FORMAT_VERSION),
        "sq.keys": json.dumps(list(state)),
        "sq.quantized": json.dumps(layout),
    }
    if ans is not None:
        meta["sq.entropy_coder"] = f"constriction {_ans_version(ans)}"
    meta["sq.checksum"] = _content_digest(tensors, meta)

    data = _sorted_metadata(safetensors.torch.save(tensors, metadata=meta))
    path = os.fspath(path)
    _atomic_write(path, data, overwrite)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    report = ExportReport(path, len(data), fp32_bytes, payload, layers)
    log.info("Wrote %s (%d bytes, %.2fx smaller than fp32).", path, report.file_bytes, report.compression_ratio)
    return report


def export_checkpoint(
    checkpoint: PathLike,
    path: PathLike,
    *,
    coding: str = "packed",
    overwrite: bool = False,
    metadata: Optional[dict[str, str]] = None,
    callback: Optional[str] = None,
) -> ExportReport:
    """Writes the model of a Lightning checkpoint, saved after a ``ClusterRefine`` snap, as :func:`save_compressed` does.

    No model class is needed: the checkpoint's ``state_dict`` is written as is, with the
    layers that ``ClusterRefine`` snapped (its saved cluster state) stored as codebook +
    indices under their ``state_dict`` names (``model.`` prefixes and all), so that
    :func:`load_compressed` fills the same ``LightningModule`` (or, with
    ``strict=False``, one whose keys overlap). The checkpoint is read with
    ``torch.load(weights_only=True)``: nothing in it is executed. The same as
    ``sq-lightning export CHECKPOINT PATH [--coding ans]`` on the command line.

    Args:
        checkpoint: a ``.ckpt`` written by a ``Trainer`` that ran ``ClusterRefine`` (for
            example by ``ModelCheckpoint``), after the snap.
        path: the file to write; ``coding``, ``overwrite`` and ``metadata`` as in
            :func:`save_compressed`.
        callback: the checkpoint's key of the ``ClusterRefine`` state, needed only when
            it holds more than one.

    Raises:
        ValueError: the checkpoint cannot be read safely, holds no (or several)
            ``ClusterRefine`` states, was saved before the snap, or its weights are not
            exactly the snapped values of its clusters.
    """
    checkpoint = os.fspath(checkpoint)
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable file, or objects outside torch's safe list
        raise ValueError(
            f"`checkpoint` {checkpoint!r} cannot be read with torch.load(weights_only=True) ({err}). "
            "Load it yourself, build the model and call save_compressed(model, path, clusters)."
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"`checkpoint` {checkpoint!r} is not a Lightning checkpoint (no 'state_dict').")
    states = {k: v for k, v in (ckpt.get("callbacks") or {}).items() if str(k).startswith("ClusterRefine")}
    if callback is not None:
        if callback not in states:
            raise ValueError(f"`callback` {callback!r} is not a ClusterRefine state of {checkpoint!r}; it has {sorted(states)}.")
        states = {callback: states[callback]}
    if len(states) != 1:
        raise ValueError(
            f"`checkpoint` {checkpoint!r} holds {len(states)} ClusterRefine states ({sorted(states)}): "
            + ("it was written by a Trainer without ClusterRefine." if not states else "name one with `callback`.")
        )
    saved = next(iter(states.values())).get("snapper", {}).get("clusters", {})
    if not saved:
        raise ValueError(
            f"`checkpoint` {checkpoint!r} was saved before ClusterRefine snapped (no clusters in its state): "
            "export a checkpoint from after the snap epoch."
        )
    if not next(iter(states.values()))["snapper"].get("exact", True):
        raise ValueError(
            f"`checkpoint` {checkpoint!r} was saved during a gradual snap (ClusterRefine(refine=RefineConfig(ramp_steps=...))), before "
            "its weights reached their cluster values: export a checkpoint from after the ramp; nothing was written."
        )
    state = ckpt["state_dict"]
    clusters = {}
    for name, c in saved.items():
        weight = state.get(name)
        if weight is None:
            raise ValueError(f"`checkpoint` {checkpoint!r}: clustered layer {name!r} is not in its state_dict.")
        centroids, assignments = c["centroids"], c["assignments"].long().reshape(weight.shape)
        if not torch.equal(centroids.to(weight.dtype)[assignments], weight):
            raise ValueError(
                f"`checkpoint` {checkpoint!r}: the weights of {name!r} are not the snapped values of its saved "
                "clusters (the state_dict and the ClusterRefine state disagree); nothing was written."
            )
        clusters[name] = (centroids, assignments)
    return _write(state, {n: state[n] for n in clusters}, f"checkpoint {checkpoint!r}", path, clusters, metadata,
                  overwrite, coding)


def load_compressed(path: PathLike, model: Optional[nn.Module] = None, strict: bool = True) -> dict[str, Tensor]:
    """Reads a file written by :func:`save_compressed` back into a full ``state_dict``.

    Every check runs before ``model`` is touched: format and version, the checksum of the
    tensors and the metadata, the layout (codebook sizes, bit-widths, packed lengths,
    indices ``< K``), and, with ``model``, its keys and shapes. On any failure the model
    is left as it was.

    Args:
        path: a file written by :func:`save_compressed`.
        model: if given, loaded with the reconstructed ``state_dict``.
        strict: with ``model``, require the file and the model to have exactly the same
            keys (as ``nn.Module.load_state_dict``); with False, only the common keys are
            loaded. Shapes must match either way.

    Returns:
        The reconstructed ``state_dict`` (quantized parameters = ``codebook[indices]``),
        on the CPU, in the saved model's key order.

    Raises:
        ValueError: the file is not a valid artifact (truncated, modified, unknown format
            or version, inconsistent layout).
        RuntimeError: the file does not fit ``model`` (missing or unexpected keys with
            ``strict``, different shapes).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    meta = _read_metadata(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path!r} is not a readable safetensors file ({err}): truncated or corrupted.") from err
    _verify_checksums(tensors, meta, path)
    try:
        keys = json.loads(meta["sq.keys"])
        layout = json.loads(meta["sq.quantized"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path!r} has missing or malformed `sq.keys`/`sq.quantized` metadata: {err}.") from err

    state: dict[str, Tensor] = {}
    for name, info in layout.items():
        state[name] = _reconstruct(name, info, tensors, path, meta)
    for key in list(tensors):
        if key.endswith(_SUFFIXES):
            raise ValueError(
                f"{path!r} holds {key!r}, which belongs to no quantized parameter: the file is inconsistent."
            )
        state[key] = tensors.pop(key)
    if sorted(keys) != sorted(state):
        missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
        raise ValueError(f"{path!r} lists keys it does not hold (missing {missing}, unlisted {extra}).")
    state = {key: state[key] for key in keys}

    if model is not None:
        _load_into(model, state, strict, path)
    return state


# --------------------------------------------------------------------------- checks


def _check_metadata(metadata: Optional[dict[str, str]]) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"`metadata` must be a dict of str to str, got {type(metadata).__name__}.")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"`metadata` must map str to str, got {key!r}: {value!r}. JSON-encode structured values."
            )
        if key.startswith(_META_PREFIX):
            raise ValueError(f"`metadata` key {key!r} is reserved (keys starting with {_META_PREFIX!r}); rename it.")
    return dict(metadata)


def _check_cluster(name: str, param: Tensor, pair: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Validates one ``(centroids, assignments)`` pair; returns the CPU codebook and indices."""
    try:
        centroids, assignments = pair[0], pair[1]
    except (TypeError, IndexError, KeyError):
        raise ValueError(
            f"`clusters[{name!r}]` must be a (centroids, assignments) pair, got {type(pair).__name__}."
        ) from None
    if not isinstance(centroids, Tensor) or centroids.ndim != 1 or centroids.numel() < 1:
        raise ValueError(f"`clusters[{name!r}]` centroids must be a non-empty 1-D tensor, got {_describe(centroids)}.")
    if not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all()):
        raise ValueError(
            f"`clusters[{name!r}]` centroids must be finite floating-point values, got {_describe(centroids)}."
        )
    if (
        not isinstance(assignments, Tensor)
        or assignments.is_floating_point()
        or assignments.is_complex()
        or assignments.dtype == torch.bool
    ):
        raise ValueError(f"`clusters[{name!r}]` assignments must be an integer tensor, got {_describe(assignments)}.")
    if assignments.shape != param.shape:
        raise ValueError(
            f"`clusters[{name!r}]` assignments have shape {tuple(assignments.shape)}, "
            f"the parameter has {tuple(param.shape)}."
        )
    if not param.is_floating_point():
        raise ValueError(
            f"`clusters` names {name!r}, a {param.dtype} parameter; only floating-point ones can be quantized."
        )
    k = centroids.numel()
    indices = assignments.detach().to("cpu", torch.int64)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
        raise ValueError(
            f"`clusters[{name!r}]` assignments must lie in [0, {k}) for {k} centroids, "
            f"got values in [{int(indices.min())}, {int(indices.max())}]."
        )
    codebook = centroids.detach().to("cpu", param.dtype, copy=True).contiguous()
    return codebook, indices


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _bits(k: int) -> int:
    """``ceil(log2 k)``: 0 for 1, 1 for 2, 2 for 3 and 4, ..."""
    return (k - 1).bit_length()


# --------------------------------------------------------------------------- packing


def _pack(indices: Tensor, bits: int) -> Tensor:
    """Packs non-negative int64 ``indices`` at ``bits`` each, little-endian (module docstring)."""
    idx = indices.reshape(-1).numpy()
    bitmat = np.empty((idx.size, bits), dtype=np.uint8)
    for b in range(bits):  # one vectorized pass per bit plane: no N x bits int64 temporary
        bitmat[:, b] = (idx >> b) & 1
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def _unpack(packed: Tensor, bits: int, n: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`_pack`; also tells whether the padding bits are all zero."""
    stream = np.unpackbits(packed.numpy(), bitorder="little")
    bitmat = stream[: n * bits].reshape(n, bits)
    idx = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        idx |= bitmat[:, b].astype(np.int64) << b
    return idx, not stream[n * bits :].any()


# --------------------------------------------------------------------------- entropy coding


def entropy_coder():
    """The ``constriction`` module (the rANS coder behind ``coding="ans"``), or an ImportError that says how to get it."""
    try:
        import constriction
    except ImportError as err:
        raise ImportError(
            "coding='ans' (entropy-coded indices) needs the `constriction` package, a dependency of "
            "sq_lightning that is missing here: `pip install 'constriction>=0.4'`."
        ) from err
    return constriction


def _ans_version(ans) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("constriction")
    except PackageNotFoundError:
        return getattr(ans, "__version__", "unknown")


def _ans_model(ans, counts: np.ndarray):
    """The coding distribution of a layer: its index populations, as constriction's categorical model."""
    return ans.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _index_digest(idx32: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the indices as little-endian int32."""
    return hashlib.sha256(np.ascontiguousarray(idx32, dtype="<i4").tobytes()).hexdigest()[:16]


def _ans_encode(ans, idx32: np.ndarray, counts: np.ndarray) -> Tensor:
    """rANS-codes ``idx32`` (int32, values in ``[0, K)``) under ``counts``; returns the uint32 words."""
    coder = ans.stream.stack.AnsCoder()
    coder.encode_reverse(idx32, _ans_model(ans, counts))
    return torch.from_numpy(np.ascontiguousarray(coder.get_compressed(), dtype=np.uint32))


# --------------------------------------------------------------------------- checksums


def _digest(t: Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _content_sums(tensors: Mapping[str, Tensor], meta: Mapping[str, str], checksum_key: str) -> dict[str, str]:
    """Per tensor and for the metadata (all of it but ``checksum_key``, where the result is
    stored): the checksums of versions 1-2, the input of version 3's one."""
    sums = {key: _digest(t) for key, t in tensors.items()}
    canonical = json.dumps({k: v for k, v in meta.items() if k != checksum_key}, sort_keys=True)
    sums[_META_DIGEST_KEY] = hashlib.sha256(canonical.encode()).hexdigest()
    return sums


def _content_digest(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> str:
    sums = _content_sums(tensors, meta, "sq.checksum")
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def _read_metadata(data: bytes, path: str) -> dict[str, str]:
    """The safetensors header's metadata, with the format name and version checked."""
    if len(data) < 8:
        raise ValueError(f"{path!r} is {len(data)} bytes long: too short for a safetensors file (truncated?).")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise ValueError(
            f"{path!r} announces a {n}-byte header but holds {len(data) - 8} bytes after the length: "
            "truncated or corrupted."
        )
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"`__metadata__` is a {type(meta).__name__}")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path!r} has an unreadable safetensors header ({err}): corrupted.") from err
    if meta.get("sq.format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r} is not an sq_lightning compressed model (`sq.format` is {meta.get('sq.format')!r}, "
            f"expected {FORMAT_NAME!r}). Write it with `save_compressed`."
        )
    version = meta.get("sq.format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path!r} has format version {version!r}; this sq_lightning reads versions "
            f"{', '.join(_READABLE_VERSIONS)}. Upgrade sq_lightning, or re-export with this one."
        )
    return meta


def _verify_checksums(tensors: Mapping[str, Tensor], meta: Mapping[str, str], path: str) -> None:
    if meta["sq.format_version"] not in ("1", "2"):
        expected = meta.get("sq.checksum")
        if not isinstance(expected, str) or "sq.checksums" in meta:
            raise ValueError(f"{path!r} has a missing or malformed `sq.checksum`: corrupted.")
        if expected != _content_digest(tensors, meta):
            raise ValueError(f"{path!r}: checksum mismatch: a tensor or the header was modified or corrupted.")
        return
    try:
        checksums = json.loads(meta["sq.checksums"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path!r} has missing or malformed `sq.checksums` metadata: corrupted.") from err
    expected = set(tensors) | {_META_DIGEST_KEY}
    if not isinstance(checksums, dict) or set(checksums) != expected:
        raise ValueError(f"{path!r}: its checksum list does not match its tensors: the file was modified.")
    sums = _content_sums(tensors, meta, "sq.checksums")
    if checksums[_META_DIGEST_KEY] != sums[_META_DIGEST_KEY]:
        raise ValueError(f"{path!r}: metadata checksum mismatch: the header was modified or corrupted.")
    for key in tensors:
        if checksums[key] != sums[key]:
            raise ValueError(f"{path!r}: checksum mismatch for tensor {key!r}: the file was modified or corrupted.")


def _reconstruct(name: str, info: Mapping, tensors: dict[str, Tensor], path: str, meta: Mapping[str, str]) -> Tensor:
    """``codebook[indices]`` of one quantized parameter, with its layout checked; pops its tensors."""
    where = f"{path!r}, parameter {name!r}"
    try:
        shape, k, bits = [int(s) for s in info["shape"]], int(info["k"]), int(info["bits"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed layout entry {info!r}.") from err
    if k < 1 or bits != _bits(k) or any(s < 0 for s in shape):
        raise ValueError(
            f"{where}: inconsistent layout (K={k}, bits={bits}, shape={shape}); expected bits={_bits(max(k, 1))}."
        )
    codebook = tensors.pop(name + _CODEBOOK, None)
    if codebook is None or codebook.shape != (k,) or str(codebook.dtype) != info.get("dtype"):
        raise ValueError(f"{where}: codebook missing, not of length K={k} or not of dtype {info.get('dtype')}.")
    n = math.prod(shape)
    coding = info.get("coding", "packed")
    if coding == "ans" and meta.get("sq.format_version") != "1":
        idx_t = _ans_indices(name, info, tensors, k, bits, n, where, meta)
        return codebook[idx_t].reshape(shape)
    if coding != "packed":
        raise ValueError(f"{where}: unknown index coding {coding!r} for format version {meta.get('sq.format_version')}.")
    packed = tensors.pop(name + _INDICES, None)
    if bits == 0:
        if packed is not None:
            raise ValueError(f"{where}: K=1 stores no indices, but the file has some.")
        return codebook.expand(n).reshape(shape).clone()
    if packed is None or packed.dtype != torch.uint8 or packed.shape != ((n * bits + 7) // 8,):
        raise ValueError(f"{where}: packed indices missing or not {(n * bits + 7) // 8} bytes for {n} x {bits} bits.")
    idx, padding_clear = _unpack(packed, bits, n)
    if idx.size and int(idx.max()) >= k:
        raise ValueError(f"{where}: an index is {int(idx.max())}, not below K={k}.")
    if not padding_clear:
        raise ValueError(f"{where}: the padding bits of the packed indices are not zero.")
    return codebook[torch.from_numpy(idx)].reshape(shape)


def _ans_indices(
    name: str, info: Mapping, tensors: dict[str, Tensor], k: int, bits: int, n: int, where: str, meta: Mapping[str, str]
) -> Tensor:
    """Decodes and checks the entropy-coded indices of one parameter; pops its tensors."""
    words = tensors.pop(name + _ANS, None)
    counts = info.get("counts")
    if (
        not isinstance(counts, list)
        or len(counts) != k
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        or sum(counts) != n
    ):
        raise ValueError(f"{where}: index counts missing, not {k} non-negative integers, or not summing to {n}.")
    counts = np.asarray(counts, dtype=np.int64)
    expected_digest = info.get("index_digest")
    if not isinstance(expected_digest, str):
        raise ValueError(f"{where}: entropy-coded layout entry without its `index_digest`.")
    if bits == 0:
        if words is not None:
            raise ValueError(f"{where}: K=1 stores no indices, but the file has some.")
        idx = np.zeros(n, dtype=np.int32)
    else:
        if words is None or words.dtype != torch.uint32 or words.ndim != 1:
            raise ValueError(f"{where}: rANS stream missing or not a 1-D uint32 tensor.")
        ans = entropy_coder()
        try:
            decoder = ans.stream.stack.AnsCoder(words.numpy().copy())
            idx = np.asarray(decoder.decode(_ans_model(ans, counts), n), dtype=np.int32)
            leftover = not decoder.is_empty()
        except Exception as err:  # constriction raises its own errors on an invalid stream
            raise ValueError(f"{where}: the rANS stream does not decode ({err}): corrupted.") from err
        if leftover:
            raise ValueError(f"{where}: the rANS stream holds more than the {n} indices: corrupted.")
    if _index_digest(idx) != expected_digest:
        raise ValueError(
            f"{where}: the decoded indices differ from the encoded ones (written by {meta.get('sq.entropy_coder')!r}, "
            f"read with constriction {_ans_version(entropy_coder())}): install the writer's constriction version, "
            "or re-export the model with coding='packed'."
        )
    return torch.from_numpy(idx.astype(np.int64))


def _load_into(model: nn.Module, state: dict[str, Tensor], strict: bool, path: str) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path!r} does not fit {type(model).__name__}: missing keys {missing}, unexpected keys {unexpected}. "
            "Build the same architecture, or pass `strict=False` to load the common keys."
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if wrong:
        raise RuntimeError(
            f"{path!r} does not fit {type(model).__name__}: shape mismatch for " + "; ".join(wrong) + "."
        )
    common = {k: v for k, v in state.items() if k in target}
    model.load_state_dict(common, strict=strict)


# --------------------------------------------------------------------------- writing


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes ``data`` with the header's ``__metadata__`` entries in sorted order.

    The header is re-serialized compactly, as safetensors does, with every other entry in
    the order it had; where that does not give a header of exactly the same length (an
    escape written differently), ``data`` is returned unchanged.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    old = data[8 : 8 + n]
    if len(text) > n or old[len(text) :].strip(b" ") or len(old.rstrip(b" ")) != len(text):
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _atomic_write(path: str, data: bytes, overwrite: bool) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file in the same directory."""
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path!r} exists; pass `overwrite=True` to replace it.")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                # A hard link creates `path` only if it is still absent: no race with a writer
                # that appeared after the check above.
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path!r} exists; pass `overwrite=True` to replace it.") from None
            except OSError:  # file system without hard links
                if os.path.lexists(path):
                    raise FileExistsError(f"{path!r} exists; pass `overwrite=True` to replace it.") from None
                os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
