import pytest
import torch

from sq_lightning.data import ShardedBatchSampler, TensorBatchLoader


def _all(sampler, epoch):
    return torch.cat(list(sampler.batches(epoch)))


def test_shuffled_shards_are_disjoint_equal_and_cover_the_permutation():
    n, world = 103, 3
    shards = [_all(ShardedBatchSampler(n, 10, True, seed=4, rank=r, world_size=world), epoch=2) for r in range(world)]
    assert [len(s) for s in shards] == [34, 34, 34]  # 103 // 3, one sample dropped this epoch
    together = torch.cat(shards)
    assert len(set(together.tolist())) == 102
    # All ranks cut the same permutation: interleaving the shards gives it back.
    perm = torch.stack(shards, 1).flatten()
    assert torch.equal(perm, ShardedBatchSampler(n, 10, True, seed=4).indices(2)[:102])
    assert [len(ShardedBatchSampler(n, 10, True, rank=r, world_size=world)) for r in range(world)] == [4, 4, 4]


def test_order_depends_on_seed_and_epoch_only():
    s = ShardedBatchSampler(50, 8, True, seed=1)
    assert torch.equal(_all(s, 0), _all(ShardedBatchSampler(50, 8, True, seed=1), 0))
    assert not torch.equal(_all(s, 0), _all(s, 1))
    assert not torch.equal(_all(s, 0), _all(ShardedBatchSampler(50, 8, True, seed=2), 0))
    assert sorted(_all(s, 3).tolist()) == list(range(50))


def test_eval_order_is_sequential_and_complete_across_ranks():
    shards = [_all(ShardedBatchSampler(11, 4, False, rank=r, world_size=2), 0) for r in range(2)]
    assert shards[0].tolist() == [0, 2, 4, 6, 8, 10] and shards[1].tolist() == [1, 3, 5, 7, 9]


def test_epochs_advance_by_themselves_unless_set():
    s = ShardedBatchSampler(20, 5, True, seed=0)
    first, second = torch.cat(list(s)), torch.cat(list(s))
    assert torch.equal(first, s.indices(0)) and torch.equal(second, s.indices(1))
    s.set_epoch(7)
    assert torch.equal(torch.cat(list(s)), s.indices(7))
    assert s.epoch == 8


def test_drop_last_and_lengths():
    s = ShardedBatchSampler(10, 4, False, drop_last=True)
    assert len(s) == 2 and [len(b) for b in s] == [4, 4]
    s = ShardedBatchSampler(10, 4, False)
    assert len(s) == 3 and [len(b) for b in s] == [4, 4, 2]


def test_loader_applies_transform_with_reproducible_generator():
    x, y = torch.arange(12.0).view(12, 1), torch.arange(12)

    def add_noise(batch, g):
        return batch + torch.rand(batch.shape, generator=g)

    def run(epoch):
        loader = TensorBatchLoader(x, y, ShardedBatchSampler(12, 5, True, seed=3), add_noise)
        loader.sampler.set_epoch(epoch)
        return list(loader)

    a, b, c = run(0), run(0), run(1)
    assert [len(yb) for _, yb in a] == [5, 5, 2]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for xb, yb in a:
        noise = xb.squeeze(1) - yb.float()  # the input of sample i is i: labels locate it
        assert torch.all((noise >= 0) & (noise < 1))
    assert not torch.equal(a[0][0], c[0][0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        ShardedBatchSampler(10, 0, True)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, world_size=2\), got 2"):
        ShardedBatchSampler(10, 2, True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="must have the same length"):
        TensorBatchLoader(torch.zeros(3), torch.zeros(4), ShardedBatchSampler(3, 1, False))
