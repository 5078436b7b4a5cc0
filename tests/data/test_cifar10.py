import hashlib
import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

import sq_lightning.data.cifar10 as cifar10
from sq_lightning.data import CIFAR10_CLASSES, CIFAR10DataModule
from sq_lightning.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, normalize, random_crop_flip
from sq_lightning.models import ImageClassifier

N_TRAIN, N_TEST = 3, 2  # images per class in the synthetic archive
REAL_ARCHIVE = cifar10._REPO_DATASETS / "cifar10-jpeg.tar.gz"


def _color(label: int) -> tuple[int, int, int]:
    return (20 + 23 * label, 230 - 21 * label, 60 + 17 * label)


def _jpeg(label: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), _color(label)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _make_archive(folder: Path, classes=CIFAR10_CLASSES, sums: bool = True) -> Path:
    """A cifar10-jpeg.tar.gz in the real layout: one solid colour per class."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("test", N_TEST), ("train", N_TRAIN)):
            for label, name in enumerate(classes):
                for i in range(count):
                    data = _jpeg(label)
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if sums:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder / "SHA256SUMS").write_text(f"{digest}  cifar10-jpeg.tar.gz\n")
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    return _make_archive(tmp_path / "datasets")


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """No default source: $SQ_DATASETS unset, repository default pointing at an empty folder."""
    monkeypatch.delenv("SQ_DATASETS", raising=False)
    empty = tmp_path / "no_shared_datasets"
    monkeypatch.setattr(cifar10, "_REPO_DATASETS", empty)
    return empty


def _dm(tmp_path, **kwargs) -> CIFAR10DataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return CIFAR10DataModule(**kwargs)


def test_decodes_archive_with_labels_from_class_folders(tmp_path, archive):
    dm = _dm(tmp_path, archive=str(archive))
    dm.setup("fit")
    a = dm._arrays
    assert a["train_x"].shape == (10 * N_TRAIN, 3, 32, 32) and a["train_x"].dtype == torch.uint8
    assert a["test_x"].shape == (10 * N_TEST, 3, 32, 32)
    assert torch.equal(torch.bincount(a["train_y"]), torch.full((10,), N_TRAIN))
    for images, labels in ((a["train_x"], a["train_y"]), (a["test_x"], a["test_y"])):
        for image, label in zip(images, labels, strict=True):
            color = torch.tensor(_color(int(label)), dtype=torch.float32)
            assert torch.allclose(image.float().mean((1, 2)), color, atol=3), f"label {label}"
    # val_split=0: validation is the test set.
    assert torch.equal(a["val_y"], a["test_y"])


def test_cache_is_written_keyed_by_checksum_and_reused(tmp_path, archive, monkeypatch):
    dm = _dm(tmp_path, archive=str(archive))
    dm.prepare_data()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / f"cifar10-jpeg-{digest[:16]}-v1.npz"
    assert cache.is_file()

    def no_decode(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cifar10, "decode_archive", no_decode)
    again = _dm(tmp_path, archive=str(archive))
    again.setup("fit")
    dm.setup("fit")
    assert torch.equal(again._arrays["train_x"], dm._arrays["train_x"])


def test_corrupt_cache_is_rebuilt(tmp_path, archive):
    _dm(tmp_path, archive=str(archive)).prepare_data()
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(b"garbage")
    dm = _dm(tmp_path, archive=str(archive))
    dm.setup("fit")
    assert len(dm._arrays["train_x"]) == 10 * N_TRAIN
    assert np.load(cache)["train_x"].shape == (10 * N_TRAIN, 3, 32, 32)


def test_checksum_mismatch_raises(tmp_path, archive):
    (archive.parent / "SHA256SUMS").write_text("0" * 64 + "  cifar10-jpeg.tar.gz\n")
    with pytest.raises(RuntimeError, match=r"SHA256 mismatch for .*cifar10-jpeg.tar.gz: .* lists 0{64}, the file has"):
        _dm(tmp_path, archive=str(archive)).setup()


def test_missing_data_lists_every_place_looked(tmp_path, nowhere):
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        _dm(tmp_path, data_dir=str(data_dir)).setup()
    message = str(info.value)
    assert "CIFAR-10 was not found. Looked in:" in message
    for place in (
        f"{data_dir / 'cifar10-jpeg.tar.gz'} (`data_dir`)",
        f"{data_dir / 'cifar-10-batches-py'} (torchvision files)",
        "$SQ_DATASETS (not set)",
        f"{nowhere / 'cifar10-jpeg.tar.gz'} (repository default)",
    ):
        assert place in message
    assert "`archive: /path/to/cifar10-jpeg.tar.gz`" in message and "`download: true`" in message


def test_explicit_archive_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`archive` '.*missing.tar.gz' does not exist"):
        _dm(tmp_path, archive=str(tmp_path / "missing.tar.gz")).setup()


def test_corrupt_archive_raises(tmp_path):
    bad = tmp_path / "cifar10-jpeg.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(RuntimeError, match="(?s)Cannot read the CIFAR-10 archive .*Copy it again"):
        _dm(tmp_path, archive=str(bad)).setup()


def test_undecodable_jpeg_raises(tmp_path):
    path = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for name in CIFAR10_CLASSES:
                data = b"JFIF but broken" if name == "cat" else _jpeg(0)
                info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{name}/0000.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(RuntimeError, match="cifar10-jpeg/train/cat/0000.jpg in .* does not decode"):
        _dm(tmp_path, archive=str(path)).setup()


def test_wrong_classes_raise(tmp_path):
    archive = _make_archive(tmp_path / "odd", classes=[f"class{i}" for i in range(10)])
    with pytest.raises(RuntimeError, match=r"has classes \['class0', .* expected \['airplane'"):
        _dm(tmp_path, archive=str(archive)).setup()


def test_corrupt_torchvision_files_raise(tmp_path, nowhere):
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="torchvision's CIFAR10 files under .*tv are missing or corrupt"):
        _dm(tmp_path, data_dir=str(tmp_path / "tv")).setup()


def test_source_search_order(tmp_path, archive, nowhere, monkeypatch):
    other = _make_archive(tmp_path / "data_dir")
    assert _dm(tmp_path, data_dir=str(other.parent)).resolve_source() == ("archive", other)
    # An explicit `archive` wins over `data_dir`.
    assert _dm(tmp_path, data_dir=str(other.parent), archive=str(archive)).resolve_source() == ("archive", archive)
    monkeypatch.setenv("SQ_DATASETS", str(archive.parent))
    assert _dm(tmp_path).resolve_source() == ("archive", archive)
    monkeypatch.delenv("SQ_DATASETS")
    monkeypatch.setattr(cifar10, "_REPO_DATASETS", other.parent)
    assert _dm(tmp_path).resolve_source() == ("archive", other)
    # download=True hands over to torchvision, in data_dir or the cache.
    assert _dm(tmp_path, download=True).resolve_source() == ("torchvision", tmp_path / "cache" / "cifar10-torchvision")


def test_val_split_and_limit_train_are_seeded_subsets(tmp_path, archive):
    full = torch.bincount(_setup(tmp_path, archive)._arrays["train_y"], minlength=10)
    dm = _setup(tmp_path, archive, val_split=7, limit_train=11)
    a = dm._arrays
    assert len(a["val_y"]) == 7 and len(a["train_y"]) == 11
    assert torch.all(torch.bincount(torch.cat([a["train_y"], a["val_y"]]), minlength=10) <= full)
    again = _setup(tmp_path, archive, val_split=7, limit_train=11)._arrays
    other = _setup(tmp_path, archive, val_split=7, limit_train=11, seed=5)._arrays
    assert torch.equal(a["val_y"], again["val_y"]) and torch.equal(a["train_y"], again["train_y"])
    assert not torch.equal(a["train_y"], other["train_y"])
    # Held-out images come from the training split: the test set stays whole.
    assert len(a["test_y"]) == 10 * N_TEST
    with pytest.raises(ValueError, match=r"`limit_train` must be <= the 23 available training images, got 24"):
        _setup(tmp_path, archive, val_split=7, limit_train=24)
    with pytest.raises(ValueError, match=r"`val_split` must be < the 30 training images, got 30"):
        _setup(tmp_path, archive, val_split=30)


def _setup(tmp_path, archive, **kwargs) -> CIFAR10DataModule:
    dm = _dm(tmp_path, archive=str(archive), **kwargs)
    dm.setup("fit")
    return dm


def test_batches_are_normalised_and_complete(tmp_path, archive):
    dm = _setup(tmp_path, archive, batch_size=8, augment=False)
    batches = list(dm.train_dataloader())
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32
    assert torch.equal(torch.bincount(y), torch.full((10,), N_TRAIN))
    # Without augmentation every image is a solid class colour after normalisation.
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    for image, label in zip(x, y, strict=True):
        expected = (torch.tensor(_color(int(label))) / 255 - mean) / std
        assert torch.allclose(image.mean((1, 2)), expected, atol=0.05)
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == 10 * N_TEST


def test_train_order_is_reproducible_and_changes_per_epoch(tmp_path, archive):
    def labels(seed, epoch):
        loader = _setup(tmp_path, archive, batch_size=30, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        x, y = next(iter(loader))
        return x, y

    x0, y0 = labels(0, 0)
    x0b, y0b = labels(0, 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(y0, labels(0, 1)[1])
    assert not torch.equal(y0, labels(1, 0)[1])


def test_ddp_ranks_get_disjoint_shards(tmp_path, archive):
    dm = _setup(tmp_path, archive, batch_size=4, augment=False)
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        seen.append(torch.cat([idx for idx in loader.sampler.batches(3)]))
        assert len(loader) == 4  # 15 images per rank in batches of 4
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert len(seen[0]) + len(seen[1]) == 10 * N_TRAIN


def test_normalize_formula():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(normalize(x), expected)


def test_random_crop_flip_returns_padded_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(x, g, padding=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips, offsets = 0, set()
    for i in range(len(x)):
        matches = [
            (oy, ox, flip)
            for oy in range(5)
            for ox in range(5)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, oy : oy + 8, ox : ox + 8]))
        ]
        assert len(matches) == 1, f"image {i} is not a crop of its padded input"
        flips += matches[0][2]
        offsets.add(matches[0][:2])
    assert 0 < flips < len(x) and len(offsets) > 5


def test_fit_with_lightning_sets_epochs(tmp_path, archive):
    dm = _dm(tmp_path, archive=str(archive), batch_size=8)
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # An MLP on the flattened images: the loader is under test here, not the network.
    trainer.fit(ImageClassifier(arch="mlp", in_features=3 * 32 * 32, mlp_hidden=[16]), dm)
    assert trainer.train_dataloader.sampler.epoch == 2  # Lightning called set_epoch(0), set_epoch(1)
    assert trainer.num_training_batches == 4
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an int >= 1, got 0"),
        ({"val_split": -1}, r"`val_split` must be an int >= 0, got -1"),
        ({"limit_train": -5}, r"`limit_train` must be an int >= 0, got -5"),
        ({"num_workers": -1}, r"`num_workers` must be an int >= 0, got -1"),
    ],
)
def test_bad_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"{REAL_ARCHIVE} is not available")
def test_real_archive(tmp_path):
    dm = CIFAR10DataModule(archive=str(REAL_ARCHIVE), cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    a = dm._arrays
    assert a["train_x"].shape == (50_000, 3, 32, 32) and a["test_x"].shape == (10_000, 3, 32, 32)
    assert torch.equal(torch.bincount(a["train_y"]), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(a["test_y"]), torch.full((10,), 1000))
    # Per-channel statistics of the training images match the published CIFAR-10 values.
    pixels = a["train_x"].float().div(255)
    torch.testing.assert_close(pixels.mean((0, 2, 3)), torch.tensor(CIFAR10_MEAN), rtol=0, atol=0.005)
    torch.testing.assert_close(pixels.std((0, 2, 3)), torch.tensor(CIFAR10_STD), rtol=0, atol=0.005)
