"""CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
2009) held in memory as uint8 tensors.

Two sources: the project's offline copy ``cifar10-jpeg.tar.gz`` (60,000 JPEGs,
decoded once and cached as ``.npz``), or torchvision's ``CIFAR10`` files
(downloaded with ``download=True``). Training batches get the augmentation of He et
al. 2016 (arXiv:1512.03385, section 4.2), 4-pixel zero padding + random 32x32 crop
+ random horizontal flip, vectorised per batch, then per-channel normalisation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from typing_extensions import override

from sq_lightning.data.tensor_loader import ShardedBatchSampler, TensorBatchLoader, derive_seed, rank_and_world

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "decode_archive",
    "load_archive",
    "normalize",
    "random_crop_flip",
    "sha256_of",
    "verify_archive",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the 50,000 original training images, pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
_ARCHIVE_ROOT = "cifar10-jpeg"
_TORCHVISION_DIR = "cifar-10-batches-py"
_SPLITS = ("train", "test")
_CACHE_FORMAT = 1  # bump when the cached arrays' layout changes
# <repo root>/sq_lightning/data/cifar10.py -> <repo root>/../shared/datasets
_REPO_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` in [0, 255] -> float32 standardised with the CIFAR-10 mean/std."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean).div_(std)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per image of a batch.

    Args:
        x: ``(B, C, H, W)`` images (any dtype).
        generator: CPU generator drawing the crop offsets and flips.
        padding: zero pixels added on each side before cropping back to ``H x W``.

    Returns:
        A new ``(B, C, H, W)`` tensor, same dtype and device.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=x.device)
    # A flipped crop reads its columns right to left.
    cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _train_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return normalize(random_crop_flip(x, generator))


def _eval_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return normalize(x)


def sha256_of(path: Path) -> str:
    """Hex SHA256 digest of the file ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(path: Path) -> str:
    """SHA256 of ``path``, checked against a ``SHA256SUMS`` file beside it when it lists it.

    Raises:
        RuntimeError: the checksum differs from the listed one.
    """
    actual = sha256_of(path)
    sums = path.parent / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].lstrip("*") == path.name:
                if fields[0].lower() != actual:
                    raise RuntimeError(
                        f"SHA256 mismatch for {path}: {sums} lists {fields[0]}, the file has {actual}. "
                        "The archive is corrupt or incomplete: copy it again (or fix SHA256SUMS if the "
                        "archive was replaced on purpose)."
                    )
                break
        else:
            log.warning("%s does not list %s; its checksum was not verified.", sums, path.name)
    return actual


def decode_archive(path: Path) -> dict[str, np.ndarray]:
    """Decodes every JPEG of a ``cifar10-jpeg`` archive, read straight from the tar.

    Returns:
        ``{"train_x", "train_y", "test_x", "test_y"}``: uint8 ``(N, 3, 32, 32)`` images
        and int64 labels (index of the class folder in :data:`CIFAR10_CLASSES`), sorted by
        class then file name, so the order does not depend on the order inside the tar.

    Raises:
        RuntimeError: the archive cannot be read, a JPEG does not decode, or the layout is
            not ``cifar10-jpeg/{train,test}/<class>/<name>.jpg`` with the 10 CIFAR classes.
    """
    found: dict[tuple[str, str, str], bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                    continue
                parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                if len(parts) != 4 or parts[0] != _ARCHIVE_ROOT or parts[1] not in _SPLITS:
                    raise RuntimeError(
                        f"unexpected member {member.name!r}; expected {_ARCHIVE_ROOT}/<train|test>/<class>/<file>.jpg"
                    )
                found[(parts[1], parts[2], parts[3])] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise RuntimeError(f"Cannot read the CIFAR-10 archive {path}: {err}. Copy it again.") from err
    except RuntimeError as err:
        raise RuntimeError(f"The CIFAR-10 archive {path} has the wrong layout: {err}.") from err

    out: dict[str, np.ndarray] = {}
    for split in _SPLITS:
        keys = sorted(k for k in found if k[0] == split)
        classes = sorted({k[1] for k in keys})
        if classes != sorted(CIFAR10_CLASSES):
            raise RuntimeError(
                f"The CIFAR-10 archive {path} has classes {classes} under {_ARCHIVE_ROOT}/{split}/, "
                f"expected {sorted(CIFAR10_CLASSES)}."
            )
        keys.sort(key=lambda k: (CIFAR10_CLASSES.index(k[1]), k[2]))
        images = np.empty((len(keys), 32, 32, 3), dtype=np.uint8)
        for i, key in enumerate(keys):
            name = "/".join((_ARCHIVE_ROOT, *key))
            try:
                with Image.open(io.BytesIO(found[key])) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as err:
                raise RuntimeError(f"{name} in {path} does not decode: {err}. Copy the archive again.") from err
            if pixels.shape != (32, 32, 3):
                raise RuntimeError(f"CIFAR-10 images must be 32x32 RGB; {name} in {path} is {pixels.shape}.")
            images[i] = pixels
        out[f"{split}_x"] = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        out[f"{split}_y"] = np.array([CIFAR10_CLASSES.index(k[1]) for k in keys], dtype=np.int64)
    return out


def _load_cache(cache: Path) -> Optional[dict[str, np.ndarray]]:
    try:
        with np.load(cache) as f:
            arrays = {k: f[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        log.warning("CIFAR-10 cache %s is unreadable (%s); decoding the archive again.", cache, err)
        return None
    if arrays["train_x"].shape[1:] != (3, 32, 32) or len(arrays["train_x"]) != len(arrays["train_y"]):
        log.warning("CIFAR-10 cache %s has unexpected shapes; decoding the archive again.", cache)
        return None
    return arrays


def load_archive(archive: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """Arrays of :func:`decode_archive`, from the cache keyed by the archive's SHA256 if present.

    The archive is verified (:func:`verify_archive`) on every call: hashing 19 MB takes
    a fraction of a second and the hash names the cache file.
    """
    digest = verify_archive(archive)
    cache = cache_dir / f"cifar10-jpeg-{digest[:16]}-v{_CACHE_FORMAT}.npz"
    if cache.is_file():
        start = time.perf_counter()
        arrays = _load_cache(cache)
        if arrays is not None:
            log.info("Loaded CIFAR-10 from cache %s in %.2f s.", cache, time.perf_counter() - start)
            return arrays
    start = time.perf_counter()
    arrays = decode_archive(archive)
    rank_zero_info(f"Decoded {archive} in {time.perf_counter() - start:.1f} s; caching to {cache}.")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: another process (a DDP rank, a parallel test) never sees half a file.
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    except OSError as err:
        rank_zero_warn(f"Could not write the CIFAR-10 cache {cache} ({err}); the archive will be decoded each run.")
    return arrays


def _load_torchvision(root: Path, download: bool) -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    out = {}
    try:
        for split in _SPLITS:
            ds = CIFAR10(str(root), train=split == "train", download=download)
            out[f"{split}_x"] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
            out[f"{split}_y"] = np.asarray(ds.targets, dtype=np.int64)
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"torchvision's CIFAR10 files under {root} are missing or corrupt, or could not be downloaded "
            f"(download={download}): {err}. Delete them and use `download: true` with network access, "
            f"or use the offline archive {ARCHIVE_NAME} (`archive: <path>`)."
        ) from err
    return out


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 in memory, with per-batch augmentation and no worker processes.

    Where the images come from, first match wins:

    1. ``archive``, the path of ``cifar10-jpeg.tar.gz`` (must exist when given);
    2. ``<data_dir>/cifar10-jpeg.tar.gz``;
    3. torchvision's files already in ``<data_dir>/cifar-10-batches-py`` (or in
       ``<cache_dir>/cifar10-torchvision`` when ``data_dir`` is not set);
    4. ``download=True``: torchvision downloads them to that folder;
    5. ``$SQ_DATASETS/cifar10-jpeg.tar.gz``;
    6. ``<repository root>/../shared/datasets/cifar10-jpeg.tar.gz``.

    An archive is verified against the ``SHA256SUMS`` file next to it, decoded once
    (8-15 s on 2 CPU cores) and cached as ``<cache_dir>/cifar10-jpeg-<sha256 prefix>-v1.npz``
    (184 MB), which later runs load in well under a second.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 3, 32, 32)`` normalised with
    :data:`CIFAR10_MEAN`/:data:`CIFAR10_STD`, ``y`` int64. The training order and
    augmentation depend only on ``seed``, the epoch and the DDP rank; each rank trains
    on its own shard of every epoch's permutation.

    Args:
        data_dir: folder holding ``cifar10-jpeg.tar.gz`` or torchvision's CIFAR-10 files
            (and where ``download`` puts them).
        archive: path of ``cifar10-jpeg.tar.gz``; overrides every other source.
        cache_dir: where decoded archives are cached; default ``~/.cache/sq_lightning``.
        batch_size: samples per batch, per process.
        num_workers: accepted so configs written for DataLoader-based modules parse;
            batches are sliced from memory in the main process, so no worker is started.
        augment: random crop + horizontal flip on training batches.
        val_split: 0 validates on the 10,000 test images, as CIFAR papers report; ``n > 0``
            holds out ``n`` training images (chosen by ``seed``) for validation.
        download: let torchvision download CIFAR-10 (needs network access).
        limit_train: 0 uses every training image; ``n > 0`` a fixed subset of ``n`` images
            chosen by ``seed`` (quick experiments, tests).
        seed: seed of the held-out split, the subset, the epoch permutations and the
            augmentation.

    Raises:
        ValueError: an argument is out of range.
        FileNotFoundError: no source was found (the message lists every place looked).
        RuntimeError: the archive's checksum does not match, or the data are corrupt.

    Example::

        >>> dm = CIFAR10DataModule(batch_size=256, limit_train=5000)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
    """

    num_classes = len(CIFAR10_CLASSES)
    classes = CIFAR10_CLASSES

    def __init__(
        self,
        data_dir: Optional[str] = None,
        archive: Optional[str] = None,
        cache_dir: Optional[str] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = True,
        val_split: int = 0,
        download: bool = False,
        limit_train: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_split", val_split, 0),
            ("limit_train", limit_train, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.archive = Path(archive).expanduser() if archive else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "sq_lightning"
        self.batch_size = batch_size
        self.augment = augment
        self.val_split = val_split
        self.download = download
        self.limit_train = limit_train
        self.seed = seed
        self._arrays: Optional[dict[str, torch.Tensor]] = None

    def _torchvision_root(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.cache_dir / "cifar10-torchvision"

    def resolve_source(self) -> tuple[str, Path]:
        """``("archive", path)`` or ``("torchvision", root)``: where the images will come from.

        Raises:
            FileNotFoundError: nothing found; the message lists each place looked.
        """
        if self.archive is not None:
            if not self.archive.is_file():
                raise FileNotFoundError(
                    f"`archive` {str(self.archive)!r} does not exist. Give the path of {ARCHIVE_NAME}, "
                    "or leave `archive` unset to search the default places."
                )
            return "archive", self.archive
        looked = []
        if self.data_dir is not None:
            candidate = self.data_dir / ARCHIVE_NAME
            looked.append(f"{candidate} (`data_dir`)")
            if candidate.is_file():
                return "archive", candidate
        tv_root = self._torchvision_root()
        looked.append(f"{tv_root / _TORCHVISION_DIR} (torchvision files)")
        if (tv_root / _TORCHVISION_DIR).is_dir() or self.download:
            return "torchvision", tv_root
        env = os.environ.get("SQ_DATASETS")
        if env:
            candidate = Path(env).expanduser() / ARCHIVE_NAME
            looked.append(f"{candidate} ($SQ_DATASETS)")
            if candidate.is_file():
                return "archive", candidate
        else:
            looked.append("$SQ_DATASETS (not set)")
        candidate = _REPO_DATASETS / ARCHIVE_NAME
        looked.append(f"{candidate} (repository default)")
        if candidate.is_file():
            return "archive", candidate
        raise FileNotFoundError(
            "CIFAR-10 was not found. Looked in:\n  - "
            + "\n  - ".join(looked)
            + f"\nProvide it in one of these ways: `archive: /path/to/{ARCHIVE_NAME}`; "
            f"put {ARCHIVE_NAME} in `data_dir`; set $SQ_DATASETS to the folder holding it; "
            "or `download: true` (needs network access)."
        )

    def _load(self) -> dict[str, np.ndarray]:
        kind, where = self.resolve_source()
        if kind == "archive":
            return load_archive(where, self.cache_dir)
        return _load_torchvision(where, self.download)

    @override
    def prepare_data(self) -> None:
        # Runs on one process per node: decode and cache (or download) before the ranks load.
        self._load()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self._arrays is not None:
            return
        arrays = {k: torch.from_numpy(v) for k, v in self._load().items()}
        train_x, train_y = arrays["train_x"], arrays["train_y"]
        n_train = len(train_x)
        if self.val_split >= n_train:
            raise ValueError(f"`val_split` must be < the {n_train} training images, got {self.val_split}.")
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(derive_seed(self.seed, 2)))
        val_idx, train_idx = order[: self.val_split], order[self.val_split :]
        if self.limit_train:
            if self.limit_train > len(train_idx):
                raise ValueError(
                    f"`limit_train` must be <= the {len(train_idx)} available training images, got {self.limit_train}."
                )
            train_idx = train_idx[: self.limit_train]
        # Sorted so that subsets keep the archive's order; the sampler shuffles anyway.
        train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
        # The archive is sorted by class. A fixed (seed-independent) shuffle of the test set
        # makes a partial evaluation (`limit_val_batches`) see every class.
        test_order = torch.randperm(len(arrays["test_x"]), generator=torch.Generator().manual_seed(0))
        self._arrays = {
            "train_x": train_x[train_idx],
            "train_y": train_y[train_idx],
            "test_x": arrays["test_x"][test_order],
            "test_y": arrays["test_y"][test_order],
        }
        if self.val_split:
            self._arrays["val_x"], self._arrays["val_y"] = train_x[val_idx], train_y[val_idx]
        else:
            self._arrays["val_x"], self._arrays["val_y"] = self._arrays["test_x"], self._arrays["test_y"]

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            self.setup()
        return self._arrays[f"{name}_x"], self._arrays[f"{name}_y"]

    def _loader(self, name: str, train: bool) -> TensorBatchLoader:
        x, y = self._split(name)
        rank, world = rank_and_world(self.trainer)
        sampler = ShardedBatchSampler(len(x), self.batch_size, shuffle=train, seed=self.seed, rank=rank,
                                      world_size=world)
        transform = _train_transform if train and self.augment else _eval_transform
        return TensorBatchLoader(x, y, sampler, transform)

    @override
    def train_dataloader(self) -> TensorBatchLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> TensorBatchLoader:
        return self._loader("val", train=False)

    @override
    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", train=False)

    @override
    def predict_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", train=False)
