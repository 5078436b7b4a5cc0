import math

import pytest
import numpy as np
import torch

from sq_lightning.ops.coupling import (
    coupling,
    coupling_exact,
    coupling_grad_batched,
    coupling_histogram,
    coupling_pairwise,
    layer_strength,
    triangular_well,
)


def _naive(theta, w, h):
    """Independent reference: the definition written out with autograd."""
    x = theta.detach().double().reshape(-1).clone().requires_grad_(True)
    d = x[:, None] - x[None, :]
    off_diag = ~torch.eye(x.numel(), dtype=torch.bool)
    a = d.abs()
    u = torch.where((a < w) & off_diag, a - w, torch.zeros_like(a))
    loss = h * u.sum()
    loss.backward()
    return loss.detach(), x.grad.reshape(theta.shape)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


ADVERSARIAL = {
    "gaussian": lambda: torch.randn(300),
    "ties": lambda: torch.randint(0, 5, (200,)).float() * 0.1,
    "duplicates": lambda: torch.cat([torch.full((50,), 0.3), torch.randn(100)]),
    "narrow_clusters": lambda: torch.cat([c + 1e-7 * torch.randn(60) for c in (-1.0, 0.0, 0.05, 2.0)]),
    "single": lambda: torch.tensor([0.7]),
    "all_equal": lambda: torch.full((40,), -0.2),
    "matrix": lambda: torch.randn(7, 3, 5),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_pairwise_matches_autograd_definition(case):
    theta = ADVERSARIAL[case]()
    loss_ref, grad_ref = _naive(theta, 0.3, 0.01)
    res = coupling_pairwise(theta, 0.3, 0.01, block=17)
    assert res.grad.shape == theta.shape
    torch.testing.assert_close(res.loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    # Autograd's |x| at 0 has gradient 0, matching sign(0) = 0 for ties.
    torch.testing.assert_close(res.grad.double(), grad_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(ADVERSARIAL))
@pytest.mark.parametrize("w", [0.05, 0.3, 1.0])
def test_exact_equals_pairwise(case, w):
    theta = ADVERSARIAL[case]()
    ref = coupling_pairwise(theta, w, 0.02)
    got = coupling_exact(theta, w, 0.02)
    # Integer counts times 2h: equal up to the rounding of 2h·count.
    torch.testing.assert_close(got.grad, ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_exact_gradient_is_closed_form_counts():
    theta = torch.tensor([0.0, 0.1, 0.25, 1.0])
    g = coupling_exact(theta, 0.2, 0.5).grad
    # θ0: one neighbour above (0.1) -> 2h(0-1) = -1; θ1: one below, none above within 0.2
    # (0.25 - 0.1 = 0.15 < 0.2 is above) -> 2h(1-1) = 0; θ2: one below -> +1; θ3: alone.
    assert g.tolist() == [-1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("w", [0.15, 0.3, 0.45])
def test_histogram_close_to_exact_on_gaussian_layers(n, w):
    theta = torch.randn(n) * 0.05
    ref = coupling_exact(theta, w * 0.05, 1.0)
    # The smoothing error of a grid scales like sqrt(bin width / N): the paper's 2^14
    # bins meet 1% from N=1e5 at w>=0.3 and N=1e6 at every w; finer grids cover the rest
    # (benchmarks/results/coupling_fidelity.md has the whole table).
    bins = 2**14 if n * w**2 >= 2e4 else 2**17
    got = coupling_histogram(theta, w * 0.05, 1.0, n_bins=bins)
    assert _rel(got.grad, ref.grad) < 0.01
    assert abs(float(got.loss) / float(ref.loss) - 1) < 1e-3


def test_histogram_error_shrinks_with_bins():
    theta = torch.randn(50_000)
    ref = coupling_exact(theta, 0.3, 1.0).grad
    errs = [_rel(coupling_histogram(theta, 0.3, 1.0, n_bins=b, compute_loss=False).grad, ref) for b in (2**10, 2**13, 2**16)]
    assert errs[0] > errs[1] > errs[2]


def test_fft_and_prefix_convolutions_agree():
    theta = torch.randn(20_000)
    a = coupling_histogram(theta, 0.37, 1.0, n_bins=4096, conv="prefix").grad
    b = coupling_histogram(theta, 0.37, 1.0, n_bins=4096, conv="fft").grad
    assert _rel(a, b) < 1e-5


def test_histogram_on_clusters_narrower_than_a_bin_keeps_direction():
    theta = torch.cat([torch.full((500,), -1.0), torch.full((500,), 1.0), torch.tensor([-0.9, 0.95])])
    ex = coupling_exact(theta, 0.3, 1.0).grad
    hi = coupling_histogram(theta, 0.3, 1.0).grad
    # The two stragglers are pulled into their clusters by both backends.
    assert ex[-2] > 0 and hi[-2] > 0 and ex[-1] < 0 and hi[-1] < 0
    torch.testing.assert_close(hi[-2:], ex[-2:], rtol=0.01, atol=0.01)


def test_batched_equals_one_by_one():
    layers = [torch.randn(3000) * s for s in (0.01, 0.1, 1.0)] + [torch.randn(16, 8, 3, 3) * 0.2]
    ws = [0.3 * float(l.std()) for l in layers]
    hs = [1e-3, 2e-3, 3e-3, 4e-3]
    loss, grads = coupling_grad_batched(layers, ws, hs, compute_loss=True)
    total = 0.0
    for layer, w, h, g in zip(layers, ws, hs, grads):
        one = coupling_histogram(layer, w, h)
        torch.testing.assert_close(g, one.grad, rtol=1e-5, atol=1e-7)
        total += float(one.loss)
    assert math.isclose(float(loss), total, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_compute_in_float32(dtype):
    theta = torch.randn(5000).to(dtype)
    for backend in ("exact", "histogram"):
        res = coupling(theta, 0.3, 1e-3, backend=backend)
        assert res.grad.dtype == torch.float32 and torch.isfinite(res.grad).all()
    ref = coupling_exact(theta.float(), 0.3, 1e-3).grad
    assert torch.equal(coupling_exact(theta, 0.3, 1e-3).grad, ref)


def test_degenerate_layers_are_defined():
    for theta in (torch.tensor([1.5]), torch.full((100,), 2.0), torch.zeros(3, 3)):
        for backend in ("exact", "histogram", "pairwise"):
            res = coupling(theta, 0.1, 1.0, backend=backend)
            assert torch.equal(res.grad, torch.zeros_like(res.grad)), backend
            assert torch.isfinite(res.loss)
    # All equal: every ordered pair sits at the bottom of the well, -w each.
    torch.testing.assert_close(coupling_exact(torch.full((10,), 2.0), 0.1, 1.0).loss, torch.tensor(-0.1 * 90))


@pytest.mark.parametrize("backend", ["exact", "histogram", "pairwise"])
def test_non_finite_weights_raise(backend):
    theta = torch.randn(100)
    theta[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        coupling(theta, 0.3, 1.0, backend=backend)
    theta[3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        coupling(theta, 0.3, 1.0, backend=backend)


def test_bad_arguments_raise():
    theta = torch.randn(10)
    with pytest.raises(ValueError, match="`w` must be"):
        coupling(theta, 0.0, 1.0)
    with pytest.raises(ValueError, match="`h` must be"):
        coupling(theta, 0.3, -1.0)
    with pytest.raises(ValueError, match="`backend` must be"):
        coupling(theta, 0.3, 1.0, backend="magic")
    with pytest.raises(ValueError, match="`n_bins` must be"):
        coupling_grad_batched([theta], [0.3], [1.0], n_bins=4)
    with pytest.raises(ValueError, match="one value per layer"):
        coupling_grad_batched([theta, theta], [0.3], [1.0, 1.0])
    with pytest.raises(ValueError, match="`conv` must be"):
        coupling_grad_batched([theta], [0.3], [1.0], conv="dft")
    with pytest.raises(TypeError, match="`theta` must be a torch.Tensor"):
        coupling_exact([1.0, 2.0], 0.3, 1.0)


def test_well_and_strength_helpers():
    x = torch.tensor([-0.5, -0.1, 0.0, 0.1, 0.5])
    assert triangular_well(x, 0.2).tolist() == pytest.approx([0.0, -0.1, -0.2, -0.1, 0.0])
    assert layer_strength(1e-3, 1000, 0.66) == pytest.approx(1e-3 * 1000**-0.66)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    theta = torch.randn(100_000)
    a = coupling_histogram(theta, 0.3, 1.0).grad
    b = coupling_histogram(theta.cuda(), 0.3, 1.0).grad.cpu()
    assert _rel(b, a) < 1e-4


def test_a_strength_function_scales_each_layer_from_its_unit_norm():
    """h given as a function of the unit-strength norms: each layer's gradient is the fixed-h
    gradient at the h it returned, and the norms it saw are the grid estimate of the gradient's norm."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(50_000, generator=g) * 0.1, torch.randn(6_000, generator=g)]
    w = [0.03, 0.3]
    seen = []

    def strength(units):
        seen.append(np.asarray(units))
        return [2.0 / units[0], 0.5 / units[1]]

    _, rel = coupling_grad_batched(params, w, strength)
    (u0, u1), = seen
    _, unit = coupling_grad_batched(params, w, [1.0, 1.0])
    for grad, ref, u, h in zip(rel, unit, (u0, u1), (2.0 / u0, 0.5 / u1)):
        torch.testing.assert_close(grad, ref * h, rtol=1e-5, atol=1e-6)
        assert u == pytest.approx(float(ref.double().norm()), rel=5e-3)  # the interpolation's Jensen gap
