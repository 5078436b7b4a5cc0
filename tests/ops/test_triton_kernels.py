"""The Triton (GPU) kernels of the histogram backend.

Where CUDA is present they are checked on the GPU through the public functions;
everywhere else Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, hence a fresh process) runs the very same kernels on CPU tensors.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sq_lightning.ops import _triton_kernels as T
from sq_lightning.ops import coupling_exact, coupling_grad_batched, coupling_histogram

CP = importlib.import_module("sq_lightning.ops.coupling")
needs_triton = pytest.mark.skipif(T.triton is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or T.triton is None, reason="needs CUDA and triton")

# Layers of every kind the kernels must handle: a large Gaussian layer (several
# programs, histogram replicas), a small conv layer with a small w, and a layer whose
# weights already sit in 4 clusters narrower than a bin (all deposits on 8 bins).
CASES = textwrap.dedent(
    """
    import torch
    def layers(device):
        g = torch.Generator().manual_seed(0)
        clustered = torch.randint(0, 4, (3000,), generator=g).float() * 0.2 + 1e-5 * torch.randn(3000, generator=g)
        params = [
            torch.randn(200_000, generator=g),
            0.1 * torch.randn(16, 16, 3, 3, generator=g),
            clustered,
        ]
        return [p.to(device) for p in params], [0.3, 0.02, 0.1], [1e-3, 2e-3, 5e-3]
    """
)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(device: str, batched_fn, torch_mode) -> None:
    """Triton path against the pure-torch path and the exact backend on the same layers."""
    ns: dict = {}
    exec(CASES, ns)
    params, ws, hs = ns["layers"](device)
    loss, grads = batched_fn(params, ws, hs)
    ref_loss, ref = torch_mode(lambda: coupling_grad_batched(params, ws, hs, compute_loss=True, per_layer_loss=True))
    for g, r, p in zip(grads, ref, params):
        assert g.shape == p.shape and g.dtype == torch.float32 and g.device == p.device
        # Same grid and arithmetic as the torch path: equal up to float32 summation order.
        assert _rel(g, r) < 2e-3
    # And the histogram approximation of the exact gradient. Not for the clustered
    # layer: its clusters are narrower than a bin, so the grid cannot resolve the
    # within-cluster order that the exact counts see (both paths agree there).
    for g, p, w, h, tol in zip(grads[:2], params, ws, hs, (0.005, 0.05)):
        exact = coupling_exact(p.cpu(), w, h, compute_loss=False).grad
        assert _rel(g.cpu(), exact) < tol
    assert torch.allclose(loss.cpu(), ref_loss.cpu(), rtol=1e-4)


def _torch_mode(fn):
    mode, CP._cpu_kernels._MODE = CP._cpu_kernels._MODE, "torch"
    try:
        return fn()
    finally:
        CP._cpu_kernels._MODE = mode


@needs_triton
def test_kernels_under_interpreter_match_torch_path_and_exact():
    script = CASES + textwrap.dedent(
        """
        import importlib, sys
        sys.path.insert(0, {tests!r})
        from ops.test_triton_kernels import _check, _torch_mode
        CP = importlib.import_module("sq_lightning.ops.coupling")
        # Small replicas so that the 2e5-weight layer is deposited into 4 of them.
        CP._triton_kernels.WEIGHTS_PER_REPLICA = 1 << 15
        assert CP._triton_kernels.replicas_for(200_000) == 4
        from ops.test_triton_kernels import _triton_batched
        _check("cpu", _triton_batched, _torch_mode)
        # The deposit against the torch path's two bincounts, bin by bin.
        params, ws, hs = layers("cpu")
        T = CP._triton_kernels
        for p, w in zip(params, ws):
            flat = p.reshape(-1)
            ref = CP._deposit(flat, (flat.numel(),), torch.tensor([w]), 2**14)[0][0].double()
            mn, mx = T.bounds([flat])
            lo, inv, _ = T.grid_parameters(mn, mx, T.np.array([w], T.np.float32), 2**14)
            got = T.deposit([flat], lo, inv, 2**14)[0]
            assert float((got - ref).abs().max()) < 1e-4 * float(ref.max()), float((got - ref).abs().max())
            assert abs(float(got.sum()) - flat.numel()) < 1e-6 * flat.numel()
        # The FFT route of the field and `out` (added into, float32 and bfloat16).
        params, ws, hs = layers("cpu")
        sizes = tuple(p.numel() for p in params)
        base = [torch.full(p.shape, 0.5) for p in params]
        _, plain = CP._batched_triton(params, sizes, ws, hs, 2**14, False, "prefix", False, None)
        _, fft = CP._batched_triton(params, sizes, ws, hs, 2**14, False, "fft", False, None)
        _, into = CP._batched_triton(params, sizes, ws, hs, 2**14, False, "prefix", False, [b.clone() for b in base])
        bf = [b.bfloat16() for b in base]
        _, into_bf = CP._batched_triton(params, sizes, ws, hs, 2**14, False, "prefix", False, bf)
        for p, f, i, ib, b in zip(plain, fft, into, into_bf, base):
            assert float((p - f).norm() / p.norm()) < 1e-4
            assert torch.equal(i, p + b)
            assert ib.dtype == torch.bfloat16 and torch.allclose(ib.float(), p + b, rtol=1e-2, atol=1e-2)
        # The public entry point dispatches to these kernels where they are enabled
        # (CUDA tensors; forced here), with w and h given as plain floats.
        CP._triton_kernels.enabled = lambda tensors: True
        _, public = CP.coupling_grad_batched(params, ws, hs)
        assert all(torch.equal(a, b) for a, b in zip(public, plain))
        # Non-finite weights: the same error as the other paths, naming the layer.
        params[1][0, 0, 0, 0] = float("nan")
        try:
            CP._batched_triton(params, sizes, ws, hs, 2**14, False, "prefix", False, None)
        except ValueError as err:
            assert "layer(s) [1]" in str(err) and "non-finite" in str(err), err
        else:
            raise AssertionError("no error for a NaN weight")
        print("OK")
        """
    ).format(tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_replicas_grow_with_layer_size():
    assert T.replicas_for(1000) == 1
    assert T.replicas_for(T.WEIGHTS_PER_REPLICA * 3) == 2
    assert T.replicas_for(T.WEIGHTS_PER_REPLICA * 20) == 16
    assert T.replicas_for(10**10) == T.MAX_REPLICAS


def test_not_enabled_for_cpu_tensors():
    assert not T.enabled([torch.zeros(3)])


def _triton_batched(params, ws, hs):
    sizes = tuple(p.numel() for p in params)
    return CP._batched_triton(params, sizes, ws, hs, 2**14, True, "prefix", True, None)


@needs_cuda
def test_cuda_kernels_match_torch_path_and_exact():
    _check("cuda", _triton_batched, _torch_mode)


@needs_cuda
def test_cuda_public_calls_take_the_triton_path():
    theta = torch.randn(263_144, device="cuda", dtype=torch.bfloat16)
    assert T.enabled([theta])
    got = coupling_histogram(theta, 0.3, 1e-3).grad
    _, direct = CP._batched_triton([theta], (theta.numel(),), [0.3], [1e-3], 2**14, False, "prefix", False, None)
    # Float atomics: equal up to the order of the deposit's additions.
    assert _rel(got, direct[0]) < 1e-5
    assert _rel(got.cpu(), coupling_exact(theta.float().cpu(), 0.3, 1e-3, compute_loss=False).grad) < 0.01
    bad = torch.randn(1000, device="cuda")
    bad[3] = float("inf")
    with pytest.raises(ValueError, match=r"layer\(s\) \[0\] hold non-finite"):
        coupling_histogram(bad, 0.3, 1e-3)
