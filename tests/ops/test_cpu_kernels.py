"""The fused numba kernels of the histogram backend against the torch path and `exact`."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sq_lightning.coupler import WeightCoupler
from sq_lightning.ops import _cpu_kernels as K
from sq_lightning.ops.coupling import coupling_exact, coupling_grad_batched

CP = importlib.import_module("sq_lightning.ops.coupling")
pytestmark = pytest.mark.skipif(K.numba is None, reason="numba not installed (extra `fast`)")


def _layers():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, 80, generator=g) * 0.05,  # 5120 weights
        torch.randn(300_000, generator=g),
        torch.cat([c + 1e-4 * torch.randn(20_000, generator=g) for c in (-0.5, 0.0, 0.7)]),  # clustered
    ]


def _torch_path(*args, **kwargs):
    mode, K._MODE = K._MODE, "torch"
    try:
        return coupling_grad_batched(*args, **kwargs)
    finally:
        K._MODE = mode


def test_kernel_path_is_taken_on_cpu(monkeypatch):
    assert CP._kernels_for([torch.randn(5000)]) is CP._NumbaKernels
    calls = []
    real = K.deposit
    monkeypatch.setattr(K, "deposit", lambda *a: calls.append(1) or real(*a))
    coupling_grad_batched([torch.randn(5000)], [0.3], [1e-3])
    assert calls == [1]
    monkeypatch.setattr(K, "_MODE", "torch")
    assert CP._kernels_for([torch.randn(5000)]) is CP._TorchKernels
    coupling_grad_batched([torch.randn(5000)], [0.3], [1e-3])
    assert calls == [1]


@pytest.mark.parametrize("conv", ["prefix", "fft"])
def test_kernels_equal_torch_path_and_track_exact(conv):
    ps = _layers()
    w = [0.3 * float(p.std()) for p in ps]
    h = [1e-3, 2e-4, 5e-4]
    loss_k, g_k = coupling_grad_batched(ps, w, h, compute_loss=True, per_layer_loss=True, conv=conv)
    loss_t, g_t = _torch_path(ps, w, h, compute_loss=True, per_layer_loss=True, conv=conv)
    for a, b in zip(g_k, g_t):
        assert a.shape == b.shape and a.dtype == torch.float32
        # Same arithmetic: equal up to float summation order in the histogram.
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert torch.allclose(loss_k, loss_t, rtol=1e-5)
    # And both are the histogram approximation of the exact gradient.
    for i in range(2):
        ref = coupling_exact(ps[i], w[i], h[i])
        assert float((g_k[i] - ref.grad).norm() / ref.grad.norm()) < 0.03
        assert float(loss_k[i]) == pytest.approx(float(ref.loss), rel=2e-3)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threaded_shares_equal_one_thread(monkeypatch, threads):
    """Several threads (layers split between them, partial rows summed) against one
    thread, the torch path and, for the loss, the same sums."""
    ps = _layers()
    w = [0.3 * float(p.std()) for p in ps]
    h = [1e-3, 2e-4, 5e-4]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    loss1, one = coupling_grad_batched(ps, w, h, compute_loss=True, per_layer_loss=True)
    monkeypatch.setattr(K, "MIN_CHUNK", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    plan = K.plan_for(tuple(p.numel() for p in ps))
    assert plan.n_threads == threads and len(plan.extra) >= 1  # at least one layer is split
    lossn, many = coupling_grad_batched(ps, w, h, compute_loss=True, per_layer_loss=True)
    for a, b in zip(one, many):
        assert float((a - b).norm() / b.norm()) < 1e-6
    torch.testing.assert_close(lossn, loss1, rtol=1e-6, atol=0)
    _, ref = _torch_path(ps, w, h)
    for a, b in zip(many, ref):
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_threaded_kernels_track_pairwise_reference(monkeypatch):
    """The multithreaded path against the O(N^2) reference on small layers."""
    from sq_lightning.ops.coupling import coupling_pairwise

    monkeypatch.setattr(K, "MIN_CHUNK", 500)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(3000, generator=g) * 0.1, torch.randn(40, 50, generator=g)]
    w = [0.3 * float(p.std()) for p in ps]
    h = [1e-3, 3e-3]
    _, grads = coupling_grad_batched(ps, w, h)
    for p, wl, hl, gr in zip(ps, w, h, grads):
        ref = coupling_pairwise(p, wl, hl, compute_loss=False).grad
        assert float((gr - ref).norm() / ref.norm()) < 0.02


def test_bounds_kernel_flags_non_finite_and_matches_torch(monkeypatch):
    monkeypatch.setattr(K, "MIN_CHUNK", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ps = [torch.randn(5000), torch.randn(3000) * 3, torch.randn(20, 30)]
    mins, maxs = K.bounds(K.Layers(ps))
    for p, a, b in zip(ps, mins, maxs):
        assert a == float(p.min()) and b == float(p.max())
    for bad in (float("nan"), float("inf"), float("-inf")):
        q = [p.clone() for p in ps]
        q[1][2999] = bad
        mins, maxs = K.bounds(K.Layers(q))
        assert np.isnan(mins[1]) and np.isnan(maxs[1]) and np.isfinite(mins[[0, 2]]).all()


def test_field_kernel_equals_torch_prefix():
    g = torch.Generator().manual_seed(1)
    hist = torch.rand(3, 512, generator=g, dtype=torch.float64) * 100
    hist[1, :200] = 0  # empty stretch at the edge
    r = torch.tensor([3.25, 0.4, 40.9], dtype=torch.float32)
    ref = CP._force_prefix(hist, r)
    q = np.floor(r.double().numpy())
    got = K.field(hist.float().clone(), q, r.double().numpy() - q, np.ones(3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_gather_writes_into_native_grad_without_copy():
    p = torch.randn(300_000)
    grad = torch.zeros_like(p)
    ptr = grad.data_ptr()
    _, (ret,) = coupling_grad_batched([p], [0.03], [1e-3], out=[grad])
    assert ret is grad and grad.data_ptr() == ptr and bool(grad.abs().sum() > 0)


def test_chunks_cover_every_weight_once():
    arrays = K.as_arrays([torch.zeros(n) for n in (10, 700_000, 3, 250_000)])
    for threads in (1, 2, 3, 8):
        plans = K._chunks(arrays, threads)
        assert plans == K._chunks([a.size for a in arrays], threads)
        seen = [torch.zeros(a.size, dtype=torch.int32) for a in arrays]
        for plan in plans:
            for layer, a, b in plan:
                seen[layer][a:b] += 1
        assert all(bool((s == 1).all()) for s in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_adds_in_place(dtype):
    ps = [p.to(dtype) for p in _layers()[:2]]
    w, h = [0.01, 0.3], [1e-3, 1e-3]
    _, fresh = coupling_grad_batched(ps, w, h)
    out = [torch.full(p.shape, 0.5, dtype=dtype) for p in ps]
    _, ret = coupling_grad_batched(ps, w, h, out=out)
    assert all(r is o for r, o in zip(ret, out))
    for o, f in zip(out, fresh):
        ref = (f + 0.5).to(dtype)
        assert torch.allclose(o.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="`out` needs one tensor per layer"):
        coupling_grad_batched(ps, w, h, out=out[:1])


def test_non_finite_histogram_layer_leaves_every_grad_untouched():
    net = torch.nn.Sequential(torch.nn.Linear(100, 80), torch.nn.ReLU(), torch.nn.Linear(80, 10))
    coupler = WeightCoupler(h=1e-3, w=0.3)  # auto: 8000 weights on histogram, 800 on exact
    coupler.prepare(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        net[0].weight[3, 3] = float("inf")
    with pytest.raises(RuntimeError, match=r"non-finite weights in \['0.weight'\]"):
        coupler.add_gradients(net)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())


def test_bad_environment_value_is_named():
    env = dict(os.environ, SQ_LIGHTNING_KERNELS="gpu")
    res = subprocess.run([sys.executable, "-c", "import sq_lightning.ops"], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "SQ_LIGHTNING_KERNELS must be 'auto', 'numba' or 'torch', got 'gpu'" in res.stderr


def test_norms_on_the_kernel_threads_equal_torch_norms():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * s for n, s in ((3, 1.0), (700_001, 1e-3), (1 << 19, 5.0))]
    tensors.append(torch.randn(64, 32, generator=g).t())  # non-contiguous: read through a copy
    got = K.norms(tensors)
    want = [float(t.double().norm()) for t in tensors]
    assert got == pytest.approx(want, rel=1e-9)
