"""Codebook regularizer against a dense N x K autograd reference (float64)."""

import math

import pytest
import torch

from sq_lightning.ops import codebook
from sq_lightning.ops.codebook import codebook_regularizer, init_centroids, nearest_centroid


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors gain nothing from a second thread, and on busy shared cores the
    # threads' barrier waits make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_reference(theta, centroids, temperature):
    """Value and gradients by autograd on the explicit N x K formula, float64."""
    t = theta.detach().double().reshape(-1).requires_grad_(True)
    c = centroids.detach().double().reshape(-1).requires_grad_(True)
    d = (t[:, None] - c[None, :]) ** 2
    if temperature == 0:
        r = d.min(dim=1).values.mean()
    else:
        r = (-temperature * torch.logsumexp(-d / temperature, dim=1)).mean()
    r.backward()
    return r.detach(), t.grad.reshape(theta.shape), c.grad.reshape(centroids.shape)


def assert_matches(theta, centroids, temperature, rtol=1e-10, atol=1e-12):
    value, g_t, g_c = codebook_regularizer(theta, centroids, temperature)
    ref_v, ref_t, ref_c = dense_reference(theta, centroids, temperature)
    assert g_t.shape == theta.shape and g_t.dtype == theta.dtype
    assert g_c.shape == centroids.shape and g_c.dtype == centroids.dtype
    torch.testing.assert_close(value.double(), ref_v, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_t.double(), ref_t, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_c.double(), ref_c, rtol=rtol, atol=atol)


TEMPERATURES = [0.0, 1e-3, 0.1, 10.0]


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_random_matches_dense_reference(temperature, k):
    gen = torch.Generator().manual_seed(k)
    theta = torch.randn(7, 13, generator=gen, dtype=torch.float64)
    centroids = torch.randn(k, generator=gen, dtype=torch.float64)  # unsorted on purpose
    assert_matches(theta, centroids, temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_float32_input_float32_output(temperature):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(300, generator=gen)
    centroids = torch.randn(6, generator=gen)
    value, g_t, g_c = codebook_regularizer(theta, centroids, temperature)
    assert value.dtype == g_t.dtype == g_c.dtype == torch.float32
    ref_v, ref_t, ref_c = dense_reference(theta, centroids, temperature)
    torch.testing.assert_close(value.double(), ref_v, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_t.double(), ref_t, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g_c.double(), ref_c, rtol=1e-4, atol=1e-8)


def test_half_precision_input_keeps_dtype():
    theta = torch.randn(64).half()
    value, g_t, g_c = codebook_regularizer(theta, torch.tensor([-1.0, 0.0, 1.0]))
    assert g_t.dtype == torch.float16 and g_c.dtype == torch.float32 and value.dtype == torch.float32


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_weights_at_midpoints_and_on_centroids(temperature):
    # Dyadic values: the ties are exact in every precision; the hard form gives a tie
    # to the smaller centroid, as torch.min does on a sorted codebook.
    centroids = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    theta = torch.tensor([-0.5, 0.5, -1.0, 0.0, 1.0, -2.0, 2.0, 0.25], dtype=torch.float64)
    assert_matches(theta, centroids, temperature)
    assert nearest_centroid(theta, centroids).tolist() == [0, 1, 0, 1, 2, 0, 2, 1]


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_duplicate_centroids(temperature):
    centroids = torch.tensor([0.0, -1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    theta = torch.tensor([-0.7, -0.1, 0.0, 0.2, 0.5, 0.9, 1.0, 3.0], dtype=torch.float64)
    assert_matches(theta, centroids, temperature)
    # The first copy (lowest index) of a duplicated value takes its weights.
    assert nearest_centroid(theta, centroids).tolist() == [1, 0, 0, 0, 0, 3, 3, 3]


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_single_centroid(temperature):
    theta = torch.randn(50, dtype=torch.float64)
    centroids = torch.tensor([0.3], dtype=torch.float64)
    assert_matches(theta, centroids, temperature)
    if temperature == 0:
        value, _, g_c = codebook_regularizer(theta, centroids)
        torch.testing.assert_close(value, ((theta - 0.3) ** 2).mean())
        torch.testing.assert_close(g_c, -2 * (theta - 0.3).mean().reshape(1))


def test_soft_tends_to_hard_and_is_bounded():
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(1000, generator=gen, dtype=torch.float64)
    centroids = torch.linspace(-2, 2, 8, dtype=torch.float64)
    hard = codebook_regularizer(theta, centroids).value
    for tau in (1.0, 0.1, 0.01):
        soft = codebook_regularizer(theta, centroids, tau).value
        assert hard - tau * math.log(8) - 1e-12 <= soft <= hard + 1e-12
    torch.testing.assert_close(codebook_regularizer(theta, centroids, 1e-9).value, hard, rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.05])
def test_chunked_soft_path_equals_dense(monkeypatch, temperature):
    # Many small chunks, the last one partial.
    monkeypatch.setattr(codebook, "_CHUNK_ELEMENTS", 7 * 11)
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(1001, generator=gen, dtype=torch.float64)
    centroids = torch.randn(11, generator=gen, dtype=torch.float64)
    assert_matches(theta, centroids, temperature)


def test_big_layer_default_chunking_equals_dense():
    # 150_000 x 32 pairs = 2 chunks of the default 2^22.
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(150_000, generator=gen, dtype=torch.float64)
    centroids = torch.randn(32, generator=gen, dtype=torch.float64)
    assert_matches(theta, centroids, 0.01)
    assert_matches(theta, centroids, 0.0)


@pytest.mark.parametrize("temperature", [0.0, 1e-3])
def test_descent_on_centroids_finds_cluster_means(temperature):
    gen = torch.Generator().manual_seed(4)
    means, sizes = torch.tensor([-1.0, 0.5, 2.0]), [1500, 1000, 500]
    parts = [m + 0.1 * torch.randn(s, generator=gen) for m, s in zip(means, sizes)]
    theta = torch.cat(parts)[torch.randperm(3000, generator=gen)]
    centroids = torch.tensor([1.0, -0.4, 1.5])  # unsorted, off by up to 0.6
    for _ in range(100):
        _, _, g_c = codebook_regularizer(theta, centroids, temperature)
        centroids = centroids - 1.0 * g_c
    expected = torch.stack([p.mean() for p in parts])
    torch.testing.assert_close(centroids.sort().values, expected, rtol=0, atol=1e-4)


def test_nearest_centroid_matches_argmin_and_snaps():
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(4, 25, generator=gen)
    centroids = torch.randn(7, generator=gen)
    idx = nearest_centroid(theta, centroids)
    assert idx.shape == theta.shape and idx.dtype == torch.long
    dense = (theta[..., None] - centroids).abs().argmin(dim=-1)
    assert torch.equal(idx, dense)


@pytest.mark.parametrize("method", ["linear", "quantile", "kmeans"])
def test_init_centroids_shapes_and_order(method):
    gen = torch.Generator().manual_seed(6)
    theta = torch.randn(3, 400, generator=gen)
    for k in (1, 2, 4, 16):
        c = init_centroids(theta, k, method)
        assert c.shape == (k,) and c.dtype == torch.float32
        assert torch.all(c[1:] >= c[:-1])
        assert theta.min() <= c.min() and c.max() <= theta.max()


def test_init_centroids_values():
    theta = torch.arange(8.0)
    torch.testing.assert_close(init_centroids(theta, 3, "linear"), torch.tensor([0.0, 3.5, 7.0]))
    torch.testing.assert_close(init_centroids(theta, 1, "linear"), torch.tensor([3.5]))
    torch.testing.assert_close(init_centroids(theta, 4, "quantile"), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    two_blobs = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.2, 9.0, 9.4])
    torch.testing.assert_close(init_centroids(two_blobs, 3, "kmeans"), torch.tensor([0.1, 5.1, 9.2]))


@pytest.mark.parametrize("exact", [True, False])
def test_kmeans_init_is_a_lloyd_fixed_point(monkeypatch, exact):
    if not exact:  # the Lloyd path taken by big layers
        monkeypatch.setattr(codebook, "_EXACT_KMEANS_BUDGET", 0)
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(5000, generator=gen)
    c = init_centroids(theta, 4, "kmeans")
    idx = nearest_centroid(theta, c)
    means = torch.stack([theta[idx == j].mean() for j in range(4)])
    torch.testing.assert_close(c, means, rtol=0, atol=1e-5)
    # ... and at least as good as the quantile seeds it started from.
    q = init_centroids(theta, 4, "quantile")
    assert codebook_regularizer(theta, c).value <= codebook_regularizer(theta, q).value


def test_lloyd_path_close_to_exact_kmeans(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    theta = torch.cat([torch.randn(3000, generator=gen), 3 + 0.5 * torch.randn(1000, generator=gen)])
    exact = codebook_regularizer(theta, init_centroids(theta, 8, "kmeans")).value
    monkeypatch.setattr(codebook, "_EXACT_KMEANS_BUDGET", 0)
    lloyd = codebook_regularizer(theta, init_centroids(theta, 8, "kmeans")).value
    assert exact <= lloyd <= 1.05 * exact
    two_blobs = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.2, 9.0, 9.4])
    torch.testing.assert_close(init_centroids(two_blobs, 3, "kmeans"), torch.tensor([0.1, 5.1, 9.2]))


@pytest.mark.parametrize("exact", [True, False])
def test_init_with_fewer_distinct_values_than_k(monkeypatch, exact):
    if not exact:
        monkeypatch.setattr(codebook, "_EXACT_KMEANS_BUDGET", 0)
    assert torch.equal(init_centroids(torch.zeros(10), 4, "kmeans"), torch.zeros(4))
    c = init_centroids(torch.tensor([1.0, 1.0, 2.0]), 4, "kmeans")
    assert sorted(set(c.tolist())) == [1.0, 2.0] and c.shape == (4,)


def test_errors():
    theta, c = torch.randn(10), torch.randn(3)
    with pytest.raises(ValueError, match="`centroids` must not be empty"):
        codebook_regularizer(theta, torch.empty(0))
    with pytest.raises(ValueError, match="`theta` must not be empty"):
        codebook_regularizer(torch.empty(0, 3), c)
    with pytest.raises(ValueError, match="`temperature` must be a finite number >= 0, got -0.1"):
        codebook_regularizer(theta, c, -0.1)
    with pytest.raises(ValueError, match="`temperature` must be a finite number >= 0, got nan"):
        codebook_regularizer(theta, c, float("nan"))
    with pytest.raises(ValueError, match="`theta` holds non-finite values"):
        codebook_regularizer(torch.tensor([0.0, float("nan")]), c)
    with pytest.raises(ValueError, match="`centroids` holds non-finite values"):
        codebook_regularizer(theta, torch.tensor([0.0, float("inf")]))
    with pytest.raises(TypeError, match="`theta` must be a torch.Tensor, got list"):
        codebook_regularizer([0.0, 1.0], c)
    with pytest.raises(ValueError, match="`centroids` must not be empty"):
        nearest_centroid(theta, torch.empty(0))
    with pytest.raises(ValueError, match="`k` must be an int >= 1, got 0"):
        init_centroids(theta, 0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        init_centroids(theta, 2, "median")
    with pytest.raises(ValueError, match="`theta` holds non-finite values"):
        init_centroids(torch.tensor([float("inf")]), 2)
