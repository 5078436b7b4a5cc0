"""Tiny Shakespeare, the character-level language-modelling corpus (Karpathy's char-rnn;
1,115,394 characters of public-domain plays, 65 distinct characters), held in memory.

The usual split: the first 90% of the characters for training, the last 10% for
validation. Training batches are random contiguous blocks of ``block_size + 1``
characters (input and the next-character targets), drawn from ``(seed, epoch, rank)``
alone, so a resumed run sees the batches of the uninterrupted one. Validation is a
fixed set: the validation text cut into consecutive non-overlapping blocks, so every
character after the first is predicted once, from the context its block gives it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from sq_lightning.data.cifar10 import sha256_of
from sq_lightning.data.tensor_loader import derive_seed, rank_and_world

log = logging.getLogger(__name__)

__all__ = ["CORPUS_NAME", "CORPUS_SHA256", "CharBlockLoader", "ShakespeareDataModule", "find_corpus", "load_corpus"]

CORPUS_NAME = "tinyshakespeare.txt"
# SHA-256 of the standard corpus (the file character-level GPT benchmarks use).
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_CHARS = 1_115_394
# <repo root>/sq_lightning/data/shakespeare.py -> <repo root>/../shared/datasets
_REPO_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def find_corpus(path: Optional[Union[str, Path]] = None, data_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where the corpus is, first match wins: ``path``; ``<data_dir>/tinyshakespeare.txt``;
    ``$SQ_DATASETS/tinyshakespeare.txt``; ``<repository root>/../shared/datasets/``.

    Raises:
        FileNotFoundError: ``path`` is given and missing, or nothing was found (the message
            lists every place looked and how to provide the file).
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"`path` {str(path)!r} does not exist. Give the path of {CORPUS_NAME}, or leave `path` "
                "unset to search the default places."
            )
        return path
    looked = []
    places = []
    if data_dir is not None:
        places.append((Path(data_dir).expanduser() / CORPUS_NAME, "`data_dir`"))
    env = os.environ.get("SQ_DATASETS")
    if env:
        places.append((Path(env).expanduser() / CORPUS_NAME, "$SQ_DATASETS"))
    else:
        looked.append("$SQ_DATASETS (not set)")
    places.append((_REPO_DATASETS / CORPUS_NAME, "repository default"))
    for candidate, why in places:
        looked.append(f"{candidate} ({why})")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "Tiny Shakespeare was not found. Looked in:\n  - " + "\n  - ".join(looked)
        + f"\nProvide it: `path: /path/to/{CORPUS_NAME}`; put {CORPUS_NAME} in `data_dir`; or set "
        "$SQ_DATASETS to the folder holding it. The corpus is char-rnn's tinyshakespeare/input.txt "
        f"({CORPUS_CHARS:,} characters, SHA-256 {CORPUS_SHA256})."
    )


def load_corpus(path: Path, verify: bool = True) -> str:
    """The corpus text, its SHA-256 checked against :data:`CORPUS_SHA256` when ``verify``.

    Raises:
        RuntimeError: the checksum differs (a corrupt, truncated or different file).
    """
    if verify:
        actual = sha256_of(path)
        if actual != CORPUS_SHA256:
            raise RuntimeError(
                f"SHA-256 mismatch for {path}: expected {CORPUS_SHA256} (the standard Tiny Shakespeare "
                f"corpus, {CORPUS_CHARS:,} characters), the file has {actual}. Copy the file again, or pass "
                "`verify: false` to train on a different text on purpose."
            )
    return path.read_text(encoding="utf-8")


class _EpochSampler:
    """Holds the epoch; Lightning calls ``set_epoch`` before each training epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class CharBlockLoader:
    """Iterable of ``(x, y)`` int64 ``(B, block_size)`` batches of a token tensor, ``y`` = ``x``
    shifted by one character.

    Training (``shuffle``): ``batches`` batches of random block starts, drawn from
    ``(seed, epoch, rank)``; each DDP rank draws its own. Evaluation: consecutive
    non-overlapping blocks from the start of ``tokens``, strided over the ranks.
    """

    batch_sampler = None  # Lightning inspects DataLoader attributes; there is none above `sampler`

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, shuffle: bool, batches: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"the text has {len(tokens)} characters, fewer than `block_size` + 1 = {block_size + 1}.")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.batches = batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = _EpochSampler()
        n_blocks = (len(tokens) - 1) // block_size
        self.starts = torch.arange(n_blocks)[rank::world_size] * block_size

    def __len__(self) -> int:
        if self.shuffle:
            return self.batches
        return -(-len(self.starts) // self.batch_size)

    def _batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + torch.arange(self.block_size + 1)
        chunk = self.tokens[index]
        return chunk[:, :-1], chunk[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.shuffle:
            for b in range(len(self)):
                yield self._batch(self.starts[b * self.batch_size : (b + 1) * self.batch_size])
            return
        epoch = self.sampler.epoch
        self.sampler.epoch = epoch + 1  # without set_epoch, each new pass is the next epoch
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank))
        high = len(self.tokens) - self.block_size  # a start leaves block_size + 1 characters
        for _ in range(self.batches):
            yield self._batch(torch.randint(0, high, (self.batch_size,), generator=g))


class ShakespeareDataModule(LightningDataModule):
    """Tiny Shakespeare as character tokens: random contiguous training blocks, a fixed
    validation set.

    The vocabulary is the sorted set of the corpus's characters (65 for the standard
    corpus); ``encode``/``decode`` map text to token ids and back. ``test_dataloader``
    serves the validation set (the corpus has no separate test split).

    Args:
        path: the corpus file; ``None`` searches ``data_dir``, ``$SQ_DATASETS`` and the
            repository's ``../shared/datasets`` (:func:`find_corpus`).
        data_dir: a folder holding ``tinyshakespeare.txt``.
        block_size: characters of context per sample.
        batch_size: blocks per batch.
        batches_per_epoch: training batches in an epoch (blocks are drawn at random, so an
            epoch is a number of steps, not a pass over the text).
        val_fraction: the last part of the corpus held out for validation, in (0, 1)
            (0.1: the usual split).
        val_blocks: validate on the first ``val_blocks`` blocks of the validation text
            (``None``: all of them, 871 at ``block_size`` 128).
        seed: seed of the training blocks.
        verify: check the file's SHA-256 against the standard corpus.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> dm = ShakespeareDataModule(block_size=64, batch_size=8)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))   # (8, 64) int64 each; y[:, :-1] == x[:, 1:]
        >>> dm.decode(x[0, :20])
    """

    def __init__(
        self,
        path: Optional[str] = None,
        data_dir: Optional[str] = None,
        block_size: int = 128,
        batch_size: int = 32,
        batches_per_epoch: int = 250,
        val_fraction: float = 0.1,
        val_blocks: Optional[int] = None,
        seed: int = 0,
        verify: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("batches_per_epoch", batches_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r} (0.1: the usual split).")
        if val_blocks is not None and (isinstance(val_blocks, bool) or not isinstance(val_blocks, int)
                                       or val_blocks < 1):
            raise ValueError(f"`val_blocks` must be None (all) or an int >= 1, got {val_blocks!r}.")
        self.save_hyperparameters()
        self.path, self.data_dir = path, data_dir
        self.block_size, self.batch_size, self.batches_per_epoch = block_size, batch_size, batches_per_epoch
        self.val_fraction, self.val_blocks, self.seed, self.verify = val_fraction, val_blocks, seed, verify
        self.chars: Optional[list[str]] = None
        self.train_tokens: Optional[torch.Tensor] = None
        self.val_tokens: Optional[torch.Tensor] = None

    @property
    def vocab_size(self) -> int:
        if self.chars is None:
            self.setup()
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 token ids of ``text`` (every character must be in the vocabulary)."""
        if self.chars is None:
            self.setup()
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters {missing!r} are not in the corpus's vocabulary.")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of token ids ``tokens``."""
        if self.chars is None:
            self.setup()
        return "".join(self.chars[int(t)] for t in tokens)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tokens is not None:
            return
        path = find_corpus(self.path, self.data_dir)
        text = load_corpus(path, verify=self.verify)
        self.chars = sorted(set(text))
        lookup = torch.zeros(max(map(ord, self.chars)) + 1, dtype=torch.int64)
        lookup[torch.tensor([ord(c) for c in self.chars])] = torch.arange(len(self.chars))
        tokens = lookup[torch.tensor([ord(c) for c in text])]
        split = int(len(tokens) * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        if self.val_blocks is not None:
            self.val_tokens = self.val_tokens[: self.val_blocks * self.block_size + 1]
        log.info("Tiny Shakespeare from %s: %d train / %d validation characters, vocabulary %d.",
                 path, len(self.train_tokens), len(self.val_tokens), len(self.chars))

    def _loader(self, train: bool) -> CharBlockLoader:
        if self.train_tokens is None:
            self.setup()
        rank, world = rank_and_world(self.trainer)
        tokens = self.train_tokens if train else self.val_tokens
        return CharBlockLoader(tokens, self.block_size, self.batch_size, shuffle=train,
                               batches=self.batches_per_epoch, seed=self.seed, rank=rank, world_size=world)

    @override
    def train_dataloader(self) -> CharBlockLoader:
        return self._loader(train=True)

    @override
    def val_dataloader(self) -> CharBlockLoader:
        return self._loader(train=False)

    @override
    def test_dataloader(self) -> CharBlockLoader:
        return self._loader(train=False)
