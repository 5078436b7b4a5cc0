import math

import pytest
import scipy.stats
import torch

from sq_lightning.ops.clustering import Clusters, entropy_bits, find_clusters


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([5], 0.0),
        ([3, 3], 1.0),
        ([1, 1, 2], 1.5),
        ([4, 0, 4], 1.0),  # an empty cluster carries no information
        ([1, 1, 1, 1, 1, 1, 1, 1], 3.0),
    ],
)
def test_entropy_bits_closed_forms(counts, expected):
    assert entropy_bits(torch.tensor(counts)) == pytest.approx(expected, abs=1e-12)


def test_entropy_of_discovered_clusters_matches_scipy_and_is_at_most_log2_k():
    g = torch.Generator().manual_seed(0)
    # Three tight groups of very different sizes: far fewer bits than log2 3 with an entropy coder.
    theta = torch.cat([
        torch.randn(9000, generator=g) * 1e-3,
        1.0 + torch.randn(800, generator=g) * 1e-3,
        -1.0 + torch.randn(200, generator=g) * 1e-3,
    ])
    cl = find_clusters(theta, 0.3, merge="none")
    assert cl.k == 3
    ref = scipy.stats.entropy([9000, 800, 200], base=2)
    assert cl.entropy == pytest.approx(ref, rel=1e-12)
    assert cl.entropy < 0.6 * math.log2(3)


def test_clusters_from_a_quantizer_count_its_members():
    from sq_lightning.ops.baselines import quantize

    theta = torch.tensor([[-1.0, -0.9, 0.1], [0.2, 0.15, 2.0]], dtype=torch.float64)
    cl = Clusters.from_quantization(quantize(theta, 3, "kmeans"))
    assert cl.centroids.dtype == torch.float32 and cl.centroids.tolist() == pytest.approx([-0.95, 0.15, 2.0])
    assert cl.assignments.tolist() == [[0, 0, 1], [1, 1, 2]] and cl.counts.tolist() == [2, 3, 1]
    assert torch.allclose(cl.values(torch.float64), torch.tensor([[-0.95, -0.95, 0.15], [0.15, 0.15, 2.0]], dtype=torch.float64))


def test_clusters_move_to_a_device_whole():
    cl = Clusters(torch.tensor([-1.0, 1.0]), torch.tensor([[0, 1], [1, 1]]), torch.tensor([1, 3]))
    same, copied = cl.to("cpu"), cl.to("cpu", copy=True)
    assert same is not cl and same.centroids is cl.centroids  # already there: a new Clusters, the same tensors
    assert all(torch.equal(x, y) and x.data_ptr() != y.data_ptr() for x, y in
               ((copied.centroids, cl.centroids), (copied.assignments, cl.assignments), (copied.counts, cl.counts)))
    moved = cl.to("meta")  # a device without data: every tensor moves, the original stays
    assert {t.device.type for t in (moved.centroids, moved.assignments, moved.counts)} == {"meta"}
    assert moved.assignments.shape == (2, 2) and cl.centroids.device.type == "cpu"


def test_a_few_stragglers_do_not_bridge_the_clusters_of_a_large_layer():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-1.0, 0.0, 1.0])
    tight = (centers.repeat_interleave(100_000) + torch.randn(300_000, generator=g) * 0.01)
    strays = torch.rand(2000, generator=g) * 2.4 - 1.2  # spread over the valleys: spacing << gap
    theta = torch.cat([tight, strays])[torch.randperm(302_000, generator=g)]
    # One weight per gap-wide stretch is enough to bridge with the plain gap rule: one cluster.
    assert find_clusters(theta, 0.05, min_size=1, merge="none").k == 1
    # The outermost strays form tiny end groups (the extremes are never inside a valley): merged.
    cl = find_clusters(theta, 0.05, min_size=300, merge="all")  # 0.1% of the layer
    assert cl.k == 3
    assert cl.centroids.tolist() == pytest.approx(centers.tolist(), abs=2e-3)
    # Every weight goes to its nearest cluster, stragglers included (up to ties at a valley's middle).
    nearest = (theta[:, None] - cl.centroids[None, :]).abs().argmin(1)
    assert int((cl.assignments != nearest).sum()) <= 5
    assert int(cl.counts.sum()) == theta.numel()
