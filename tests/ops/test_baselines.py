"""Post-training quantizers against independent references: brute force, plain DP, Lloyd, numpy."""

import itertools

import numpy as np
import pytest
import torch

import sq_lightning.ops.baselines as baselines
from sq_lightning.ops.baselines import heq_quantize, kmeans_quantize, quantize, uniform_quantize

METHODS = ["heq", "kmeans", "uniform"]


def _sse(x: np.ndarray, values: torch.Tensor) -> float:
    return float(((x - values.double().numpy().reshape(x.shape)) ** 2).sum())


def _brute_force_sse(x: np.ndarray, k: int) -> float:
    """Minimum within-cluster SSE over every split of the sorted values into k runs."""
    x = np.sort(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, x.size), k - 1):
        bounds = (0, *cuts, x.size)
        sse = sum(((x[a:b] - x[a:b].mean()) ** 2).sum() for a, b in zip(bounds[:-1], bounds[1:]))
        best = min(best, sse)
    return best


def _quadratic_dp_sse(x: np.ndarray, k: int) -> float:
    """Textbook O(k N^2) DP on the sorted values, no pruning, no weights."""
    x = np.sort(x)
    n = x.size
    cost = np.full((n + 1, n + 1), np.inf)
    for a in range(n):
        for b in range(a + 1, n + 1):
            cost[a, b] = ((x[a:b] - x[a:b].mean()) ** 2).sum()
    d = cost[0].copy()
    for _ in range(2, k + 1):
        d = np.array([min(d[j] + cost[j, i] for j in range(i)) if i else np.inf for i in range(n + 1)])
    return float(d[n])


def _lloyd_sse(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> float:
    c = rng.choice(x, size=k, replace=False)
    for _ in range(iters):
        a = np.abs(x[:, None] - c[None, :]).argmin(1)
        c = np.array([x[a == j].mean() if (a == j).any() else c[j] for j in range(k)])
    a = np.abs(x[:, None] - c[None, :]).argmin(1)
    return float(((x - c[a]) ** 2).sum())


def _check_contract(theta: torch.Tensor, q: baselines.Quantization, k: int) -> None:
    """Invariants every quantizer promises."""
    assert q.values.shape == theta.shape and q.values.dtype == theta.dtype
    assert q.assignments.shape == theta.shape and q.assignments.dtype == torch.int64
    expected_cdtype = torch.float64 if theta.dtype == torch.float64 else torch.float32
    assert q.centroids.dtype == expected_cdtype and q.centroids.ndim == 1
    assert 1 <= q.centroids.numel() <= k
    assert torch.isfinite(q.centroids).all()
    assert (q.centroids[1:] > q.centroids[:-1]).all(), "centroids must be strictly ascending"
    used = torch.bincount(q.assignments.reshape(-1), minlength=q.centroids.numel())
    assert used.numel() == q.centroids.numel() and (used > 0).all(), "no empty cluster"
    assert torch.equal(q.values, q.centroids[q.assignments].to(theta.dtype))


# --------------------------------------------------------------------------- HEQ


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 10, 12])
def test_heq_equal_populations_and_bin_means(k):
    x = np.random.default_rng(k).standard_normal(120)
    q = heq_quantize(torch.from_numpy(x).float(), k)
    xs = np.sort(x.astype(np.float32).astype(np.float64))
    ref_means = xs.reshape(k, -1).mean(1)
    assert torch.bincount(q.assignments).tolist() == [120 // k] * k
    np.testing.assert_allclose(q.centroids.double().numpy(), ref_means, rtol=1e-6, atol=1e-7)


def test_heq_uneven_bins_follow_floor_ranks():
    x = torch.randn(103, generator=torch.Generator().manual_seed(0))
    k = 7
    q = heq_quantize(x, k)
    bounds = [(b * 103) // k for b in range(k + 1)]
    assert torch.bincount(q.assignments).tolist() == list(np.diff(bounds))
    # Bins are contiguous in sorted order.
    order = torch.argsort(x)
    assert (q.assignments[order].diff() >= 0).all()


def test_heq_ties_stay_in_one_bin_moving_to_the_nearer_run_end():
    # Boundary at rank 6 lies in the run of ten zeros [0, 10): the end (10) is nearer.
    x = torch.tensor([0.0] * 10 + [1.0, 2.0])
    q = heq_quantize(x, 2)
    assert q.centroids.tolist() == [0.0, 1.5]
    assert q.assignments.tolist() == [0] * 10 + [1, 1]
    # Rank 4 in a run [3, 6) of 7s: start at distance 1 wins.
    x = torch.tensor([1.0, 2.0, 3.0, 7.0, 7.0, 7.0, 8.0, 9.0])
    assert heq_quantize(x, 2).assignments.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    # Rank 4 in a run [2, 6): a draw goes to the start of the run.
    x = torch.tensor([1.0, 2.0, 7.0, 7.0, 7.0, 7.0, 8.0, 9.0])
    assert heq_quantize(x, 2).centroids.tolist() == [1.5, 7.5]


def test_heq_never_splits_equal_values_and_may_drop_a_bin():
    x = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(1)).float() ** 2
    x[:300] = 4.0  # one value holds 60% of the entries: it swallows several boundaries
    q = heq_quantize(x, 5)
    _check_contract(x, q, 5)
    for v in x.unique():
        assert q.assignments[x == v].unique().numel() == 1
    assert q.centroids.numel() < 5


# --------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("seed", range(40))
def test_kmeans_equals_brute_force_small(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 13))
    k = int(rng.integers(1, min(n, 4) + 1))
    # Cubed normals: skewed, with near-ties; every fourth case with exact ties.
    x = rng.standard_normal(n) ** 3
    if seed % 4 == 0:
        x = np.round(x, 1)
    if np.unique(x).size <= k:
        k = max(1, np.unique(x).size - 1)
    q = kmeans_quantize(torch.from_numpy(x), k)
    assert _sse(x, q.values) == pytest.approx(_brute_force_sse(x, k), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 9, 20])
def test_kmeans_equals_quadratic_dp_medium(k):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.normal(c, 0.3, 30) for c in range(-3, 3)])
    x[::7] = np.round(x[::7])  # some exact ties
    q = kmeans_quantize(torch.from_numpy(x), k)
    assert q.centroids.numel() == k
    assert _sse(x, q.values) == pytest.approx(_quadratic_dp_sse(x, k), rel=1e-11)


def test_kmeans_checkpointed_backtracking_matches_full_table(monkeypatch):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(3)) ** 3
    full = kmeans_quantize(x, 23)
    monkeypatch.setattr(baselines, "_MAX_SPLIT_TABLE", 100)
    checkpointed = kmeans_quantize(x, 23)
    assert torch.equal(full.assignments, checkpointed.assignments)
    assert torch.equal(full.centroids, checkpointed.centroids)


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_never_worse_than_lloyd(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(300), rng.standard_t(2, 100)])
    for k in (3, 8):
        opt = _sse(x, kmeans_quantize(torch.from_numpy(x), k).values)
        lloyd = min(_lloyd_sse(x, k, rng) for _ in range(3))
        assert opt <= lloyd * (1 + 1e-12)


def test_kmeans_centroids_are_cluster_means():
    x = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = kmeans_quantize(x, 6)
    for c in range(6):
        assert q.centroids[c].item() == pytest.approx(x[q.assignments == c].mean().item(), rel=1e-12)
    # Each point is at its nearest centroid (a property every optimum has).
    nearest = (x[:, None] - q.centroids[None, :]).abs().argmin(1)
    dist = (x - q.values).abs()
    assert torch.allclose(dist, (x - q.centroids[nearest]).abs())


# --------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_uniform_nearest_grid_level(k):
    x = torch.randn(400, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    q = uniform_quantize(x, k)
    grid = np.linspace(x.min().item(), x.max().item(), k)
    ref = grid[np.abs(x.numpy()[:, None] - grid[None, :]).argmin(1)]
    np.testing.assert_allclose(q.values.numpy(), ref, rtol=0, atol=1e-12)
    assert set(np.round(q.centroids.numpy(), 9)) <= set(np.round(grid, 9))
    assert q.centroids[0] == x.min() and q.centroids[-1] == x.max()


def test_uniform_drops_empty_levels_and_keeps_assignments_dense():
    x = torch.tensor([0.0, 0.1, 2.9, 3.0])
    q = uniform_quantize(x, 4)  # grid 0, 1, 2, 3: levels 1 and 2 unused
    assert q.centroids.tolist() == [0.0, 3.0]
    assert q.assignments.tolist() == [0, 0, 1, 1]


def test_uniform_single_level_and_constant_input():
    assert uniform_quantize(torch.tensor([0.0, 1.0, 3.0]), 1).centroids.tolist() == [1.5]
    q = uniform_quantize(torch.full((3, 2), 2.5), 8)
    assert q.centroids.tolist() == [2.5] and torch.equal(q.values, torch.full((3, 2), 2.5))


def test_uniform_exact_on_grid_data():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 1.5, 0.0])
    assert torch.equal(uniform_quantize(x, 4).values, x)
    assert torch.equal(uniform_quantize(x, 7).values, x)  # finer grid 0, .25, ...: 0.5 etc. on it


# --------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", ["heq", "kmeans"])
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_k_at_least_distinct_values_reconstructs_exactly(method, extra):
    x = torch.tensor([0.3, -1.2, 0.3, 5.0, 2.0, 2.0, -1.2, 0.7])
    k = 5 + extra  # 5 distinct values
    q = quantize(x, k, method)
    assert torch.equal(q.values, x)
    assert q.centroids.tolist() == sorted(set(x.tolist()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 3)])
def test_dtype_shape_and_contract(method, dtype, shape):
    theta = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for k in (1, 3, 8):
        q = quantize(theta, k, method)
        _check_contract(theta, q, k)


@pytest.mark.parametrize("method", METHODS)
def test_input_not_modified_and_grad_tensor_accepted(method):
    theta = torch.randn(50, requires_grad=True)
    before = theta.detach().clone()
    q = quantize(theta, 4, method)
    assert torch.equal(theta.detach(), before)
    assert not q.values.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    theta = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    cpu = quantize(theta, 6, method)
    gpu = quantize(theta.cuda(), 6, method)
    assert gpu.values.is_cuda and gpu.assignments.is_cuda and gpu.centroids.is_cuda
    assert torch.equal(cpu.assignments, gpu.assignments.cpu())
    torch.testing.assert_close(cpu.centroids, gpu.centroids.cpu(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", METHODS)
def test_errors(method):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="`k` must be >= 1, got 0"):
        quantize(x, 0, method)
    with pytest.raises(ValueError, match="`k` must be >= 1, got -3"):
        quantize(x, -3, method)
    with pytest.raises(TypeError, match="`k` must be an int"):
        quantize(x, 2.0, method)
    with pytest.raises(TypeError, match="`k` must be an int"):
        quantize(x, True, method)
    with pytest.raises(ValueError, match="`theta` must not be empty"):
        quantize(torch.empty(0, 3), 2, method)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3] = bad
        with pytest.raises(ValueError, match="`theta` must be finite"):
            quantize(y, 2, method)
    with pytest.raises(TypeError, match="`theta` must be a floating-point tensor"):
        quantize(torch.arange(5), 2, method)
    with pytest.raises(TypeError, match="`theta` must be a torch.Tensor"):
        quantize(np.zeros(3), 2, method)


def test_unknown_method():
    with pytest.raises(ValueError, match="`method` must be one of"):
        quantize(torch.randn(4), 2, "lloyd")


def test_numpy_integer_k_accepted():
    q = quantize(torch.randn(20), np.int64(3), "kmeans")
    assert q.centroids.numel() == 3


def test_rtn_per_channel_matches_a_row_by_row_reference():
    from sq_lightning.ops.baselines import rtn_bits_per_weight, rtn_per_channel

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3)
    w[2] = 0.5  # a constant channel stays as it is
    out = rtn_per_channel(w, 2)
    for r in range(6):
        row = w[r].reshape(-1).double()
        lo, hi = row.min(), row.max()
        if lo == hi:
            assert torch.equal(out[r], w[r])
            continue
        grid = lo + (hi - lo) / 3 * torch.arange(4, dtype=torch.float64)
        nearest = grid[(row[:, None] - grid).abs().argmin(1)]
        torch.testing.assert_close(out[r].reshape(-1).double(), nearest, rtol=0, atol=1e-6)
        assert out[r].unique().numel() <= 4
    assert rtn_bits_per_weight((6, 4, 3), 2) == pytest.approx(2 + 32 / 12)
    with pytest.raises(ValueError, match="`bits` must be >= 1"):
        rtn_per_channel(w, 0)
