"""Compressed artifact: bit-exact round trip, size, packing order, rejection of bad files."""

import hashlib
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import safetensors.torch
import scipy.stats
import torch
from safetensors import safe_open
from torch import nn

import sq_lightning.export as export
from sq_lightning.export import ExportReport, load_compressed, save_compressed
from sq_lightning.ops.baselines import quantize

QUANTIZED = ("conv1.weight", "conv2.weight", "fc.weight")


class SmallNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _model(seed: int = 0, **kwargs) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet(**kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))  # non-trivial BatchNorm buffers
    return model


def _snap(model: nn.Module, k: int, method: str = "kmeans") -> dict:
    """Quantizes the conv/linear weights in place; returns their clusters."""
    params = dict(model.named_parameters())
    clusters = {}
    for name in QUANTIZED:
        q = quantize(params[name].detach(), k, method)
        with torch.no_grad():
            params[name].copy_(q.values)
        clusters[name] = (q.centroids, q.assignments)
    return clusters


def _snap_exact_k(model: nn.Module, k: int) -> dict:
    """Random codebooks of exactly k entries (so bits = ceil(log2 k) even for small layers)."""
    gen = torch.Generator().manual_seed(k)
    params = dict(model.named_parameters())
    clusters = {}
    for name in QUANTIZED:
        centroids = torch.randn(k, generator=gen)
        assignments = torch.randint(0, k, params[name].shape, generator=gen)
        with torch.no_grad():
            params[name].copy_(centroids[assignments])
        clusters[name] = (centroids, assignments)
    return clusters


def _clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _sha(t: torch.Tensor) -> str:
    """Independent statement of the documented checksum: sha256(dtype|shape| + raw bytes)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode() + raw).hexdigest()


def _rewrite(src, dst, edit_tensors=None, edit_meta=None) -> None:
    """Copies an artifact with edits and *valid* checksums, to reach the checks behind them.

    Signed as its (edited) format version documents it: versions 1-2 a SHA-256 per tensor
    in ``sq.checksums``, version 3 one SHA-256 of those sums in ``sq.checksum``.
    """
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sq.checksums", None)
    meta.pop("sq.checksum", None)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    sums = {k: _sha(t) for k, t in tensors.items()}
    sums["__metadata__"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    if meta.get("sq.format_version") in ("1", "2"):
        meta["sq.checksums"] = json.dumps(sums)
    else:
        meta["sq.checksum"] = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)


def _assert_rejected_untouched(bad, target: nn.Module, match: str) -> None:
    """Loading ``bad`` into ``target`` raises ValueError matching ``match`` and leaves ``target`` as it was."""
    before = _clone_state(target)
    with pytest.raises(ValueError, match=match):
        load_compressed(bad, target)
    _assert_state_equal(_clone_state(target), before)


@pytest.fixture(params=["packed", "ans"])
def saved(tmp_path, request):
    model = _model()
    clusters = _snap(model, 5)
    path = tmp_path / "net.safetensors"
    save_compressed(model, path, clusters, coding=request.param)
    return path, model


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("coding", ["packed", "ans"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 16, 17, 256])
@pytest.mark.parametrize("snap", [_snap, _snap_exact_k], ids=["kmeans", "exact_k"])
def test_round_trip_bit_exact(tmp_path, k, snap, coding):
    model = _model()
    clusters = snap(model, k)
    snapped = _clone_state(model)
    path = tmp_path / "m.safetensors"
    report = save_compressed(model, path, clusters, coding=coding)

    fresh = _model(seed=1)
    state = load_compressed(path, fresh)
    _assert_state_equal(state, snapped)
    _assert_state_equal(_clone_state(fresh), snapped)
    for name in QUANTIZED:
        kk = clusters[name][0].numel()
        assert report.layers[name].k == kk
        assert report.layers[name].index_bits == (math.ceil(math.log2(kk)) if kk > 1 else 0)
    if snap is _snap_exact_k:
        assert {layer.index_bits for layer in report.layers.values()} == {math.ceil(math.log2(k)) if k > 1 else 0}


@pytest.mark.parametrize("coding", ["packed", "ans"])
def test_saves_of_the_same_model_are_the_same_bytes(tmp_path, coding):
    # safetensors alone writes the metadata in a random order on each call (issue #584).
    model = _model()
    clusters = _snap(model, 5)
    files = []
    for i in range(6):
        save_compressed(model, tmp_path / f"{i}.safetensors", clusters, coding=coding, metadata={"run": "a", "b": "x"})
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    _assert_state_equal(load_compressed(tmp_path / "0.safetensors"), _clone_state(model))


@pytest.mark.parametrize("coding", ["packed", "ans"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_round_trip_other_dtypes(tmp_path, dtype, coding):
    model = _model().to(dtype)
    clusters = _snap(model, 6)
    snapped = _clone_state(model)
    save_compressed(model, tmp_path / "m.safetensors", clusters, coding=coding)
    fresh = _model(seed=2).to(dtype)
    load_compressed(tmp_path / "m.safetensors", fresh)
    _assert_state_equal(_clone_state(fresh), snapped)


def test_quantization_tuple_accepted_and_unsnapped_model_exports_snapped_values(tmp_path):
    model = _model()
    w = model.fc.weight.detach().clone()
    q = quantize(w, 3, "heq")
    save_compressed(model, tmp_path / "m.safetensors", {"fc.weight": q})
    state = load_compressed(tmp_path / "m.safetensors")
    assert torch.equal(state["fc.weight"], q.values)
    assert torch.equal(model.fc.weight, w)  # saving never changes the model


def test_packed_bits_follow_documented_little_endian_order(tmp_path):
    model = _model()
    for k in (2, 3, 5, 17, 256):
        clusters = _snap_exact_k(model, k)
        path = tmp_path / f"k{k}.safetensors"
        save_compressed(model, path, clusters)
        bits = math.ceil(math.log2(k))
        with safe_open(str(path), "pt") as f:
            for name in QUANTIZED:
                idx = clusters[name][1].reshape(-1).tolist()
                stream = [(i >> b) & 1 for i in idx for b in range(bits)]
                stream += [0] * (-len(stream) % 8)
                expected = bytes(sum(stream[p + j] << j for j in range(8)) for p in range(0, len(stream), 8))
                assert f.get_tensor(name + ":indices").numpy().tobytes() == expected


def test_k1_stores_no_index_bytes(tmp_path):
    model = _model()
    save_compressed(model, tmp_path / "m.safetensors", _snap(model, 1))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert not any(key.endswith(":indices") for key in f.keys())
        assert f.get_tensor("conv2.weight:codebook").shape == (1,)


# --------------------------------------------------------------------------- size and report


def test_size_matches_codebook_plus_packed_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Linear(256, 10))
    clusters = {}
    for name, k in (("0.weight", 4), ("2.weight", 9)):
        p = dict(model.named_parameters())[name]
        q = quantize(p.detach(), k, "kmeans")
        clusters[name] = (q.centroids, q.assignments)
    path = tmp_path / "m.safetensors"
    report = save_compressed(model, path, clusters)

    theory = 4 * 4 + math.ceil(256 * 256 * 2 / 8) + 9 * 4 + math.ceil(2560 * 4 / 8)
    theory += sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in clusters)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert report.payload_bytes == theory
    assert report.file_bytes == os.path.getsize(path) == 8 + header + theory
    n_tensors = len(model.state_dict()) + len(clusters)  # each quantized one: codebook + indices
    assert header < 512 + 300 * n_tensors  # safetensors entry + SHA-256 per tensor
    fp32 = sum(v.numel() * 4 if v.is_floating_point() else v.numel() * 8 for v in model.state_dict().values())
    assert report.fp32_bytes == fp32
    assert report.compression_ratio == pytest.approx(fp32 / report.file_bytes)
    assert report.compression_ratio > 10
    assert report.bits_weighted == pytest.approx((65536 * 2 + 2560 * 4) / (65536 + 2560))


def test_report_str_is_a_table(saved, tmp_path):
    model = _model()
    report = save_compressed(model, tmp_path / "r.safetensors", _snap(model, 4))
    assert isinstance(report, ExportReport)
    text = str(report)
    for name in QUANTIZED:
        assert name in text
    assert "ratio" in text and "bits per quantized weight" in text


def test_user_metadata_stored(tmp_path):
    model = _model()
    save_compressed(model, tmp_path / "m.safetensors", _snap(model, 2), metadata={"run": "abc", "note": "x"})
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["run"] == "abc" and meta["sq.format"] == "sq_lightning.compressed"
    layout = json.loads(meta["sq.quantized"])["conv1.weight"]
    assert layout == {"shape": [8, 3, 3, 3], "k": 2, "bits": 1, "dtype": "torch.float32"}


# --------------------------------------------------------------------------- rejection


def test_truncated_file_rejected_model_untouched(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    target = _model(seed=3)
    before = _clone_state(target)
    for cut in (0, 5, 8, 20, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.safetensors"):
            load_compressed(bad, target)
        _assert_state_equal(_clone_state(target), before)


def test_every_flipped_byte_rejected_model_untouched(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    target = _model(seed=3)
    before = _clone_state(target)
    bad = tmp_path / "flip.safetensors"
    positions = sorted(set(range(0, len(data), 23)) | {len(data) - 1, 7, 8, 9})
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01  # one bit: keeps ASCII headers valid UTF-8 most of the time
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="flip.safetensors"):
            load_compressed(bad, target)
    _assert_state_equal(_clone_state(target), before)


def test_tampered_tensor_reports_checksum(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # payload, not header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch: a tensor or the header was modified"):
        load_compressed(bad)


def test_tampered_legacy_file_names_the_tensor(saved, tmp_path):
    # Versions 1-2 hold a checksum per tensor: the damaged one is named.
    path, _ = saved
    legacy = tmp_path / "v1.safetensors"
    _rewrite(path, legacy, edit_meta=lambda m: m.update({"sq.format_version": "1"}))
    data = bytearray(legacy.read_bytes())
    data[-3] ^= 0xFF
    legacy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for tensor"):
        load_compressed(legacy)


def test_wrong_model_rejected_untouched(saved):
    path, _ = saved
    other = _model(seed=4, width=32)
    before = _clone_state(other)
    with pytest.raises(RuntimeError, match="shape mismatch for conv2.weight"):
        load_compressed(path, other)
    _assert_state_equal(_clone_state(other), before)

    bigger = _model(seed=4)
    bigger.extra = nn.Linear(2, 2)
    before = _clone_state(bigger)
    with pytest.raises(RuntimeError, match=r"missing keys \['extra.weight', 'extra.bias'\]"):
        load_compressed(path, bigger)
    _assert_state_equal(_clone_state(bigger), before)

    # Non-strict loads the common keys and leaves the rest.
    load_compressed(path, bigger, strict=False)
    assert torch.equal(bigger.extra.weight, before["extra.weight"])
    common = {k: v for k, v in _clone_state(bigger).items() if not k.startswith("extra")}
    _assert_state_equal(common, load_compressed(path))

    smaller = nn.Sequential()
    smaller.conv1 = nn.Conv2d(3, 8, 3, bias=False)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_compressed(path, smaller)


@pytest.mark.parametrize(
    "meta_edit, match",
    [
        ({"sq.format_version": "4"}, "bad.safetensors.*format version '4'.*reads versions 1, 2, 3"),
        ({"sq.checksums": "{}"}, "malformed `sq.checksum`"),  # version 3 with version 2's checksums
    ],
)
def test_unknown_format_version_or_checksum_layout_rejected(saved, tmp_path, meta_edit, match):
    path, _ = saved
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_meta=lambda m: m.update(meta_edit))
    with pytest.raises(ValueError, match=match):
        load_compressed(bad)


def test_foreign_safetensors_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(_model().state_dict(), str(path))
    with pytest.raises(ValueError, match="not an sq_lightning compressed model"):
        load_compressed(path)


def test_rewrite_helper_is_accepted_unchanged(saved, tmp_path):
    # Guards the tests below: a re-signed copy without edits must load.
    path, _ = saved
    _rewrite(path, tmp_path / "same.safetensors")
    _assert_state_equal(load_compressed(tmp_path / "same.safetensors"), load_compressed(path))


def test_index_not_below_k_rejected_untouched(tmp_path):
    model = _model()
    clusters = _snap_exact_k(model, 3)  # 2 bits: index 3 is representable but invalid
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, clusters)

    def poke(tensors):
        packed = tensors["fc.weight:indices"].clone()
        packed[0] |= 0b11
        tensors["fc.weight:indices"] = packed

    bad = tmp_path / "idx.safetensors"
    _rewrite(path, bad, edit_tensors=poke)
    _assert_rejected_untouched(bad, _model(seed=5), "idx.safetensors.*fc.weight.*not below K=3")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m.update({"sq.quantized": m["sq.quantized"].replace('"bits": 2', '"bits": 3')}),
            "inconsistent layout",
        ),
        (
            lambda m: m.update({"sq.keys": json.dumps(json.loads(m["sq.keys"]) + ["ghost"])}),
            "lists keys it does not hold",
        ),
    ],
)
def test_inconsistent_layout_rejected(tmp_path, edit, match):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, _snap_exact_k(model, 3))
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_meta=edit)
    with pytest.raises(ValueError, match=match):
        load_compressed(bad)


def test_codebook_of_wrong_dtype_rejected(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, _snap_exact_k(model, 4))
    bad = tmp_path / "bad.safetensors"

    def widen(tensors):
        tensors["fc.weight:codebook"] = tensors["fc.weight:codebook"].double()

    _rewrite(path, bad, edit_tensors=widen)
    with pytest.raises(ValueError, match="fc.weight.*not of dtype torch.float32"):
        load_compressed(bad)


def test_missing_indices_rejected(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, _snap_exact_k(model, 4))
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_tensors=lambda t: t.pop("conv1.weight:indices"))
    with pytest.raises(ValueError, match="conv1.weight.*packed indices missing"):
        load_compressed(bad)


# --------------------------------------------------------------------------- writing


def test_overwrite_refused_then_allowed(saved):
    path, model = saved
    original = path.read_bytes()
    other = _model(seed=7)
    clusters = _snap(other, 2)
    with pytest.raises(FileExistsError, match="pass `overwrite=True`"):
        save_compressed(other, path, clusters)
    assert path.read_bytes() == original
    save_compressed(other, path, clusters, overwrite=True)
    assert path.read_bytes() != original
    _assert_state_equal(load_compressed(path), _clone_state(other))
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary left behind


def test_file_created_during_write_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "race.safetensors"
    real_mkstemp = export.tempfile.mkstemp

    def mkstemp_then_rival_writes(*args, **kwargs):
        # Runs after save_compressed's existence check: another writer wins the race.
        result = real_mkstemp(*args, **kwargs)
        target.write_bytes(b"rival")
        return result

    monkeypatch.setattr(export.tempfile, "mkstemp", mkstemp_then_rival_writes)
    model = _model()
    with pytest.raises(FileExistsError, match="pass `overwrite=True`"):
        save_compressed(model, target, _snap(model, 2))
    assert target.read_bytes() == b"rival"
    assert sorted(os.listdir(tmp_path)) == [target.name]


@pytest.mark.parametrize("overwrite", [False, True])
def test_crash_before_rename_leaves_no_partial_file(saved, monkeypatch, overwrite):
    path, _ = saved
    original = path.read_bytes()
    target = path if overwrite else path.with_name("new.safetensors")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "link", crash)
    model = _model(seed=8)
    with pytest.raises(OSError, match="simulated crash"):
        save_compressed(model, target, _snap(model, 3), overwrite=overwrite)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_no_pickle_involved(saved, monkeypatch, tmp_path):
    path, model = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    banned = [(pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps")]
    for mod, attr in [*banned, (torch, "load"), (torch, "save")]:
        monkeypatch.setattr(mod, attr, forbidden)
    save_compressed(model, tmp_path / "again.safetensors", _snap(model, 4))
    load_compressed(tmp_path / "again.safetensors", _model(seed=9))
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["sq.format"] == "sq_lightning.compressed"
    assert b"\x80\x04" not in raw[:2]  # not a pickle stream


def test_save_argument_errors(tmp_path):
    model = _model()
    good = _snap(model, 4)
    path = tmp_path / "m.safetensors"
    w = model.fc.weight
    cases = [
        ({"fc.wieght": good["fc.weight"]}, None, r"`clusters` names 'fc.wieght', which is not a parameter"),
        ({"fc.weight": (torch.tensor([0.0, 1.0]), torch.zeros(3, dtype=torch.long))}, None, "assignments have shape"),
        ({"fc.weight": (torch.tensor([0.0, 1.0]), torch.full(w.shape, 2))}, None, r"must lie in \[0, 2\)"),
        ({"fc.weight": (torch.tensor([0.0, 1.0]), torch.full(w.shape, -1))}, None, r"must lie in \[0, 2\)"),
        ({"fc.weight": (torch.tensor([0, 1]), torch.zeros(w.shape, dtype=torch.long))}, None, "finite floating-point"),
        ({"fc.weight": (torch.tensor([0.0, float("nan")]), torch.zeros(w.shape, dtype=torch.long))}, None, "finite"),
        ({"fc.weight": (torch.empty(0), torch.zeros(w.shape, dtype=torch.long))}, None, "non-empty 1-D"),
        ({"fc.weight": (torch.tensor([0.0, 1.0]), torch.zeros(w.shape))}, None, "integer tensor"),
        ({"fc.weight": torch.tensor([0.0])}, None, r"centroids must be a non-empty 1-D tensor|pair"),
        (good, {"sq.format": "x"}, "`metadata` key 'sq.format' is reserved"),
        (good, {"n": 3}, "`metadata` must map str to str"),
    ]
    for clusters, meta, match in cases:
        with pytest.raises(ValueError, match=match):
            save_compressed(model, path, clusters, metadata=meta)
        assert not path.exists()
    with pytest.raises(ValueError, match="`clusters` must be a dict"):
        save_compressed(model, path, list(good.items()))
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        save_compressed(model.state_dict(), path, good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_round_trip(tmp_path):
    model = _model().cuda()
    clusters = _snap(model, 5)
    snapped = {k: v.cpu() for k, v in _clone_state(model).items()}
    save_compressed(model, tmp_path / "m.safetensors", clusters)
    fresh = _model(seed=1).cuda()
    load_compressed(tmp_path / "m.safetensors", fresh)
    _assert_state_equal({k: v.cpu() for k, v in _clone_state(fresh).items()}, snapped)


# --------------------------------------------------------------------------- entropy coding


def _skewed_model(n: int = 256, probs=(0.85, 0.1, 0.04, 0.01)):
    """A 2-layer model whose first weight has 4 values with skewed populations (as after coupling)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n), nn.BatchNorm1d(n), nn.Linear(n, 10))
    gen = torch.Generator().manual_seed(1)
    centroids = torch.tensor([0.0, -0.2, 0.2, 0.5])
    assignments = torch.multinomial(torch.tensor(probs), n * n, replacement=True, generator=gen).reshape(n, n)
    q2 = quantize(model[2].weight.detach(), 4, "heq")  # equal populations: entropy 2 bits
    with torch.no_grad():
        model[0].weight.copy_(centroids[assignments])
        model[2].weight.copy_(q2.values)
    return model, {"0.weight": (centroids, assignments), "2.weight": (q2.centroids, q2.assignments)}


def test_ans_reaches_the_entropy_of_the_populations(tmp_path):
    model, clusters = _skewed_model()
    ans = save_compressed(model, tmp_path / "a.safetensors", clusters, coding="ans")
    packed = save_compressed(model, tmp_path / "p.safetensors", clusters)
    for name, (_, assignments) in clusters.items():
        n = assignments.numel()
        counts = np.bincount(assignments.reshape(-1).numpy(), minlength=4)
        entropy_bytes = n * scipy.stats.entropy(counts, base=2) / 8  # independent reference
        layer = ans.layers[name]
        assert layer.coding == "ans" and layer.index_bits == 2
        # rANS stays within a few words of the entropy, never below it.
        assert entropy_bytes <= layer.index_bytes <= entropy_bytes * 1.005 + 16, (name, layer.index_bytes)
        assert packed.layers[name].index_bytes == n * 2 // 8
    assert ans.layers["0.weight"].index_bytes < 0.45 * packed.layers["0.weight"].index_bytes  # H = 0.80 bits
    assert ans.file_bytes < packed.file_bytes
    assert ans.stored_bits_weighted < packed.stored_bits_weighted == pytest.approx(packed.bits_weighted)
    assert ans.bits_weighted == packed.bits_weighted  # the packed width is reported either way
    assert "ans" in str(ans) and "as stored" in str(ans)
    _assert_state_equal(load_compressed(tmp_path / "a.safetensors"), load_compressed(tmp_path / "p.safetensors"))


def test_ans_stream_follows_the_documented_format(tmp_path):
    # Decodes the file with constriction directly, as the module docstring describes it.
    constriction = pytest.importorskip("constriction")
    model, clusters = _skewed_model(n=64)
    path = tmp_path / "a.safetensors"
    save_compressed(model, path, clusters, coding="ans")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        layout = json.loads(meta["sq.quantized"])
        assert meta["sq.format_version"] == "3" and meta["sq.entropy_coder"].startswith("constriction ")
        for name, (centroids, assignments) in clusters.items():
            entry = layout[name]
            expected = np.bincount(assignments.reshape(-1).numpy(), minlength=4)
            assert entry["coding"] == "ans" and entry["counts"] == expected.tolist()
            assert not any(key == name + ":indices" for key in f.keys())
            words = f.get_tensor(name + ":ans").numpy()
            assert words.dtype == np.uint32
            model_ = constriction.stream.model.Categorical(np.asarray(entry["counts"], np.float64), perfect=False)
            decoder = constriction.stream.stack.AnsCoder(words.copy())
            decoded = decoder.decode(model_, assignments.numel())
            assert decoder.is_empty()
            assert np.array_equal(decoded, assignments.reshape(-1).numpy())
            digest = hashlib.sha256(assignments.reshape(-1).numpy().astype("<i4").tobytes()).hexdigest()[:16]
            assert entry["index_digest"] == digest


@pytest.mark.parametrize("coding", ["packed", "ans"])
def test_files_are_version_3_with_one_documented_checksum(tmp_path, coding):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, _snap(model, 4), coding=coding)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        sums = {k: _sha(f.get_tensor(k)) for k in f.keys()}
    assert meta["sq.format_version"] == "3" and "sq.checksums" not in meta
    assert ("sq.entropy_coder" in meta) == (coding == "ans")
    stored = meta.pop("sq.checksum")
    sums["__metadata__"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    assert stored == hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("coding, version", [("packed", "1"), ("packed", "2"), ("ans", "2")])
def test_files_of_earlier_versions_still_read(tmp_path, coding, version):
    # Versions 1 (packed only) and 2 carry a checksum per tensor instead of one for the file.
    model = _model()
    path, legacy = tmp_path / "m.safetensors", tmp_path / f"v{version}.safetensors"
    save_compressed(model, path, _snap(model, 4), coding=coding)
    _rewrite(path, legacy, edit_meta=lambda m: m.update({"sq.format_version": version}))
    with safe_open(str(legacy), "pt") as f:
        assert "sq.checksums" in f.metadata() and "sq.checksum" not in f.metadata()
    target = _model(seed=5)
    load_compressed(legacy, target)
    _assert_state_equal(_clone_state(target), _clone_state(model))


def test_bad_coding_argument_named(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="`coding` must be one of .*'packed', 'ans'.*got 'zstd'"):
        save_compressed(model, tmp_path / "m.safetensors", _snap(model, 4), coding="zstd")
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_constriction_is_a_clear_error(tmp_path, monkeypatch):
    model = _model()
    clusters = _snap(model, 4)
    save_compressed(model, tmp_path / "a.safetensors", clusters, coding="ans")
    monkeypatch.setitem(sys.modules, "constriction", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'constriction>=0.4'"):
        save_compressed(model, tmp_path / "b.safetensors", clusters, coding="ans")
    assert not (tmp_path / "b.safetensors").exists()
    target = _model(seed=3)
    before = _clone_state(target)
    with pytest.raises(ImportError, match="constriction"):
        load_compressed(tmp_path / "a.safetensors", target)
    _assert_state_equal(_clone_state(target), before)
    # Packed files need no entropy coder.
    save_compressed(model, tmp_path / "p.safetensors", clusters)
    load_compressed(tmp_path / "p.safetensors", target)


def _ans_file(tmp_path):
    model, clusters = _skewed_model(n=64)
    path = tmp_path / "a.safetensors"
    save_compressed(model, path, clusters, coding="ans")
    return path


def _edit_layout(name, **changes):
    def edit(meta):
        layout = json.loads(meta["sq.quantized"])
        layout[name].update(changes)
        meta["sq.quantized"] = json.dumps(layout)

    return edit


def test_ans_counts_that_decode_other_indices_rejected_untouched(tmp_path):
    # Re-signed files whose coding distribution changed: the checksums pass, the decoded
    # indices differ (or the stream does not end where it should); never loaded.
    path = _ans_file(tmp_path)
    counts = json.loads(safe_open(str(path), "pt").metadata()["sq.quantized"])["0.weight"]["counts"]
    swapped = [counts[1], counts[0], *counts[2:]]  # same sum, another distribution
    bad = tmp_path / "counts.safetensors"
    _rewrite(path, bad, edit_meta=_edit_layout("0.weight", counts=swapped))
    target = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 10))
    _assert_rejected_untouched(bad, target, "counts.safetensors.*0.weight.*(decoded indices differ|rANS stream)")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"counts": [1, 2, 3, 4]}, "not summing to 4096"),
        ({"counts": [4096, 0, 0]}, "not 4 non-negative integers"),
        ({"counts": None}, "index counts missing"),
        ({"counts": [True, 4095, 0, 0]}, "not 4 non-negative integers"),
        ({"index_digest": "0" * 16}, "decoded indices differ.*coding='packed'"),
        ({"index_digest": None}, "without its `index_digest`"),
        ({"coding": "huffman"}, "unknown index coding 'huffman'"),
    ],
)
def test_ans_layout_errors(tmp_path, changes, match):
    path = _ans_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_meta=_edit_layout("0.weight", **changes))
    with pytest.raises(ValueError, match=match):
        load_compressed(bad)


def test_ans_stream_missing_or_truncated_rejected(tmp_path):
    path = _ans_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_tensors=lambda t: t.pop("0.weight:ans"))
    with pytest.raises(ValueError, match="0.weight.*rANS stream missing"):
        load_compressed(bad)

    def truncate(tensors):
        tensors["0.weight:ans"] = tensors["0.weight:ans"][:-4].clone()

    _rewrite(path, bad, edit_tensors=truncate)
    with pytest.raises(ValueError, match="0.weight.*(rANS stream|decoded indices differ)"):
        load_compressed(bad)


def test_version_1_file_cannot_claim_ans(tmp_path):
    # A version-1 reader would treat such a file as packed: the layout must agree with the version.
    path = _ans_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, edit_meta=lambda m: m.update({"sq.format_version": "1"}))
    with pytest.raises(ValueError, match="unknown index coding 'ans' for format version 1"):
        load_compressed(bad)
