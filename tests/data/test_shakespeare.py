import hashlib
from pathlib import Path

import pytest
import torch

from sq_lightning.data import ShakespeareDataModule
from sq_lightning.data.shakespeare import CORPUS_NAME, CORPUS_SHA256, CharBlockLoader, find_corpus

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "datasets" / CORPUS_NAME
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture
def small(tmp_path):
    path = tmp_path / CORPUS_NAME
    path.write_text(TEXT)
    return path


def _dm(path, **kw):
    dm = ShakespeareDataModule(path=str(path), verify=False, **kw)
    dm.setup("fit")
    return dm


def test_vocabulary_split_and_round_trip(small):
    dm = _dm(small, block_size=16, batch_size=4)
    assert dm.chars == sorted(set(TEXT)) and dm.vocab_size == len(set(TEXT))
    split = int(len(TEXT) * 0.9)
    assert dm.decode(dm.train_tokens) == TEXT[:split] and dm.decode(dm.val_tokens) == TEXT[split:]
    assert torch.equal(dm.encode("Speak"), torch.tensor([dm.chars.index(c) for c in "Speak"]))
    with pytest.raises(ValueError, match="not in the corpus"):
        dm.encode("Zebra#")


def test_training_blocks_are_contiguous_text_and_depend_on_seed_and_epoch_only(small):
    dm = _dm(small, block_size=16, batch_size=4, batches_per_epoch=3)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batches = list(loader)
    train = dm.decode(dm.train_tokens)
    for x, y in batches:
        assert x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            block = dm.decode(row_x) + dm.decode(row_y[-1:])
            assert block in train  # a contiguous piece of the training text
    # A fresh loader set to epoch 0 repeats epoch 0 (a resumed run); epoch 1 differs.
    again = dm.train_dataloader()
    again.sampler.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    again.sampler.set_epoch(1)
    assert not torch.equal(next(iter(again))[0], batches[0][0])
    other = _dm(small, block_size=16, batch_size=4, batches_per_epoch=3, seed=1).train_dataloader()
    assert not torch.equal(next(iter(other))[0], batches[0][0])


def test_validation_covers_every_character_once_in_order(small):
    dm = _dm(small, block_size=16, batch_size=5)
    ys = torch.cat([y.reshape(-1) for _, y in dm.val_dataloader()])
    n_blocks = (len(dm.val_tokens) - 1) // 16
    assert torch.equal(ys, dm.val_tokens[1 : n_blocks * 16 + 1])


def test_ranks_get_disjoint_validation_blocks_and_different_training_blocks():
    tokens = torch.arange(1000)
    a = CharBlockLoader(tokens, 10, 4, shuffle=False, rank=0, world_size=2)
    b = CharBlockLoader(tokens, 10, 4, shuffle=False, rank=1, world_size=2)
    xa = torch.cat([x[:, 0] for x, _ in a])
    xb = torch.cat([x[:, 0] for x, _ in b])
    assert not set(xa.tolist()) & set(xb.tolist()) and len(xa) + len(xb) == 99
    ta = next(iter(CharBlockLoader(tokens, 10, 4, shuffle=True, batches=1, rank=0, world_size=2)))[0]
    tb = next(iter(CharBlockLoader(tokens, 10, 4, shuffle=True, batches=1, rank=1, world_size=2)))[0]
    assert not torch.equal(ta, tb)


def test_checksum_mismatch_is_named(small):
    dm = ShakespeareDataModule(path=str(small))
    with pytest.raises(RuntimeError, match=r"SHA-256 mismatch .*verify: false"):
        dm.setup()


def test_missing_corpus_lists_the_places_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("SQ_DATASETS", str(tmp_path / "nowhere"))
    monkeypatch.setattr("sq_lightning.data.shakespeare._REPO_DATASETS", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"(?s)Looked in:.*nowhere.*\$SQ_DATASETS.*none"):
        find_corpus(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="`path`"):
        find_corpus(path=tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "`block_size` must be an int >= 1"),
        ({"batch_size": 2.5}, "`batch_size` must be an int >= 1"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be in \(0, 1\)"),
        ({"val_blocks": 0}, "`val_blocks` must be None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShakespeareDataModule(**kwargs)


@pytest.mark.skipif(not CORPUS.exists(), reason=f"corpus not found at {CORPUS}")
def test_real_corpus_is_the_standard_one():
    assert hashlib.sha256(CORPUS.read_bytes()).hexdigest() == CORPUS_SHA256
    dm = ShakespeareDataModule(path=str(CORPUS))
    dm.setup()
    assert dm.vocab_size == 65
    assert len(dm.train_tokens) == 1_003_854 and len(dm.val_tokens) == 111_540  # 90% / 10% of 1,115,394
    assert dm.decode(dm.train_tokens[:14]) == "First Citizen:"
    assert len(list(dm.val_dataloader())) == -(-871 // 32)  # 871 blocks of 128 characters
