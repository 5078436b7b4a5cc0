"""Fused GPU kernels (Triton) for the histogram backend's deposit, field and gather.

On a GPU the pure-torch histogram path is a chain of about twenty kernels (offset,
scale, cast, clamp, two ``bincount``, prefix sums, shifted windows, two
``index_select``, an ``addcmul``) and several host synchronizations, each pass
reading and writing N-sized temporaries. The kernels here do the same arithmetic
with one read of the weights for the deposit and one read (plus the gradient write)
for the gather; the field between them works on the ``L x n_bins`` grid only:

* :func:`_deposit_kernel`: linear ("cloud in cell") deposit of one layer, float64
  atomics into ``R`` replicas of its histogram row (program ``p`` writes replica
  ``p mod R``) so that a layer whose weights already sit in a few clusters, where
  every weight hits the same two bins, does not serialize on one address; the
  replicas are summed afterwards (``R x n_bins`` values, negligible next to N).
  (A faster deposit, one packed int64 atomic per weight, is measured in
  ``benchmarks/gpu_deposit_variants.py`` but not shipped: see its results file.)
* :func:`_prefix_kernel`: exclusive prefix sums of every row (float64).
* :func:`_field_kernel`: the force ``F[k] = 2 C(k) - C(k - r) - C(k + r)`` of
  :func:`sq_lightning.ops.coupling._force_prefix` (same formula, the piecewise
  quadratic cumulative mass ``C`` of the hat deposit), times ``2 h_l``.
* :func:`_gather_kernel`: linear interpolation of a grid table at every weight,
  written to a fresh gradient or *added* into a given one.

Positions are computed as in the torch and numba paths (float32 ``t = (θ - lo)·inv``,
lower grid point clamped to ``[0, M - 2]``), so the three paths agree to rounding.
Triton ships with the CUDA builds of PyTorch; where it is missing, or with
``SQ_LIGHTNING_KERNELS=torch``, CUDA tensors take the torch path. Under Triton's
interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors, which is
how the test suite checks them on machines without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sq_lightning.ops import _cpu_kernels

try:  # Triton comes with torch's CUDA wheels; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is not installed
    triton = None

# Weights per program of the deposit and the gather.
BLOCK = 2048
# One histogram replica per this many weights (at most MAX_REPLICAS): enough spread
# that clustered weights do not queue on one bin, few enough that zeroing and
# summing the replicas stays a small fraction of one pass over the weights.
WEIGHTS_PER_REPLICA = 1 << 19
MAX_REPLICAS = 32
# Grid points per program of the prefix sums and of the field.
GRID_BLOCK = 1024


def enabled(tensors) -> bool:
    """Whether the Triton kernels serve these tensors (all CUDA, Triton present, not disabled).

    On the H200 they beat the batched torch path at every size measured, single
    layers of 1e3 to 1e8 weights and ResNet-20's 20 layers in one call (1.48 vs
    1.72 ms): benchmarks/results/coupling_scaling.md.
    """
    return triton is not None and _cpu_kernels._MODE != "torch" and all(t.device.type == "cuda" for t in tensors)


if triton is not None:

    @triton.jit
    def _position(x, lo, inv, top):  # pragma: no cover - compiled
        t = (x.to(tl.float32) - lo) * inv
        j = tl.minimum(tl.maximum(t.to(tl.int32), 0), top)
        return j, t - j.to(tl.float32)

    @triton.jit
    def _deposit_kernel(x_ptr, n, hist_ptr, lo, inv, n_bins, replicas, BLOCK: tl.constexpr):  # pragma: no cover
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        j, f = _position(x, lo, inv, n_bins - 2)
        f64 = f.to(tl.float64)
        row = hist_ptr + (pid % replicas).to(tl.int64) * n_bins
        tl.atomic_add(row + j, 1.0 - f64, mask=mask, sem="relaxed")
        tl.atomic_add(row + j + 1, f64, mask=mask, sem="relaxed")

    @triton.jit
    def _prefix_kernel(hist_ptr, prefix_ptr, N_BINS: tl.constexpr, GRID_BLOCK: tl.constexpr):  # pragma: no cover
        # Row l: prefix[l, 0] = 0, prefix[l, k + 1] = hist[l, 0] + ... + hist[l, k].
        # N_BINS is a compile-time constant so that the loop bound is a plain int
        # (also under the interpreter of older Triton releases).
        row = tl.program_id(0).to(tl.int64)
        src = hist_ptr + row * N_BINS
        dst = prefix_ptr + row * (N_BINS + 1)
        tl.store(dst, 0.0)
        carry = tl.zeros((), dtype=tl.float64)
        for start in range(0, N_BINS, GRID_BLOCK):
            k = start + tl.arange(0, GRID_BLOCK)
            v = tl.load(src + k, mask=k < N_BINS, other=0.0)
            tl.store(dst + k + 1, carry + tl.cumsum(v, 0), mask=k < N_BINS)
            carry += tl.sum(v, 0)

    @triton.jit
    def _mass(prefix_ptr, hist_ptr, i, a, b, n_bins):  # pragma: no cover - compiled
        # C(i + φ) = P(i) + a(φ) H(i) + b(φ) H(i + 1); P clamps (0 below, total above),
        # H is 0 off the grid.
        p = tl.load(prefix_ptr + tl.minimum(tl.maximum(i, 0), n_bins))
        h0 = tl.load(hist_ptr + i, mask=(i >= 0) & (i < n_bins), other=0.0)
        h1 = tl.load(hist_ptr + i + 1, mask=(i + 1 >= 0) & (i + 1 < n_bins), other=0.0)
        return p + a * h0 + b * h1

    @triton.jit
    def _field_kernel(hist_ptr, prefix_ptr, param_ptr, out_ptr, n_bins, GRID_BLOCK: tl.constexpr):  # pragma: no cover
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * GRID_BLOCK + tl.arange(0, GRID_BLOCK)
        hist = hist_ptr + row * n_bins
        prefix = prefix_ptr + row * (n_bins + 1)
        # Per-row parameters: q = floor(r), φ = r - q, the strength factor 2 h_l.
        q = tl.load(param_ptr + row * 3).to(tl.int32)
        phi = tl.load(param_ptr + row * 3 + 1)
        scale = tl.load(param_ptr + row * 3 + 2)
        psi = 1.0 - phi
        mid = _mass(prefix, hist, k, 0.5, 0.0, n_bins)
        above = _mass(prefix, hist, k + q, 0.5 + phi - 0.5 * phi * phi, 0.5 * phi * phi, n_bins)
        below = _mass(prefix, hist, k - q - 1, 0.5 + psi - 0.5 * psi * psi, 0.5 * psi * psi, n_bins)
        force = (2.0 * mid - below - above) * scale
        tl.store(out_ptr + row * n_bins + k, force.to(tl.float32), mask=k < n_bins)

    @triton.jit
    def _gather_kernel(x_ptr, n, table_ptr, out_ptr, lo, inv, n_bins, ADD: tl.constexpr, BLOCK: tl.constexpr):  # pragma: no cover
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        j, f = _position(x, lo, inv, n_bins - 2)
        a = tl.load(table_ptr + j, mask=mask, other=0.0)
        b = tl.load(table_ptr + j + 1, mask=mask, other=0.0)
        g = a + f * (b - a)
        if ADD:
            g += tl.load(out_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, g, mask=mask)


def replicas_for(n: int) -> int:
    """Histogram replicas for a layer of ``n`` weights (a power of two in [1, MAX_REPLICAS])."""
    want = max(1, n // WEIGHTS_PER_REPLICA)
    return min(MAX_REPLICAS, 1 << (want.bit_length() - 1))


def flat_weights(params: Sequence[Tensor]) -> list[Tensor]:
    """Flat contiguous views of the layers (a copy only for non-contiguous ones)."""
    return [p.detach().reshape(-1).contiguous() for p in params]


def bounds(flats: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer min and max on the host (one device synchronization for all layers)."""
    mm = [torch.aminmax(f) for f in flats]
    both = torch.stack([m[0].float() for m in mm] + [m[1].float() for m in mm]).cpu().numpy()
    return both[: len(flats)], both[len(flats) :]


def deposit(
    flats: list[Tensor], lo: np.ndarray, inv: np.ndarray, n_bins: int, replicas: Optional[int] = None
) -> Tensor:
    """(L, n_bins) float64 histogram of the layers on their grids ``lo + k/inv``.

    ``replicas`` overrides :func:`replicas_for` (benchmarks).
    """
    device = flats[0].device
    hist = torch.zeros(len(flats), n_bins, dtype=torch.float64, device=device)
    for layer, x in enumerate(flats):
        n = x.numel()
        reps = replicas or replicas_for(n)
        dst = hist[layer] if reps == 1 else torch.zeros(reps, n_bins, dtype=torch.float64, device=device)
        _deposit_kernel[(triton.cdiv(n, BLOCK),)](x, n, dst, float(lo[layer]), float(inv[layer]), n_bins, reps, BLOCK=BLOCK)
        if reps > 1:
            torch.sum(dst, 0, out=hist[layer])
    return hist


def field(hist: Tensor, q: np.ndarray, phi: np.ndarray, scale: np.ndarray) -> Tensor:
    """(L, n_bins) float32 force of every row at strength ``scale`` (= 2 h_l), as ``_force_prefix``."""
    n_layers, n_bins = hist.shape
    prefix = torch.empty(n_layers, n_bins + 1, dtype=torch.float64, device=hist.device)
    _prefix_kernel[(n_layers,)](hist, prefix, N_BINS=n_bins, GRID_BLOCK=GRID_BLOCK)
    params = torch.from_numpy(np.stack([q, phi, scale], axis=1).astype(np.float64)).to(hist.device)
    out = torch.empty(n_layers, n_bins, dtype=torch.float32, device=hist.device)
    _field_kernel[(n_layers, triton.cdiv(n_bins, GRID_BLOCK))](hist, prefix, params, out, n_bins, GRID_BLOCK=GRID_BLOCK)
    return out


def gather(flats: list[Tensor], lo: np.ndarray, inv: np.ndarray, table: Tensor, out: list[Tensor], add: bool) -> None:
    """``out[l] (+)= interpolation of table[l]`` at each weight of layer ``l``.

    ``out`` tensors must be float32, contiguous, on the layers' device and of their sizes.
    """
    table = table.float().contiguous()
    n_bins = table.shape[1]
    for layer, x in enumerate(flats):
        n = x.numel()
        _gather_kernel[(triton.cdiv(n, BLOCK),)](
            x, n, table[layer], out[layer], float(lo[layer]), float(inv[layer]), n_bins, ADD=add, BLOCK=BLOCK
        )


def grid_parameters(
    mins: np.ndarray, maxs: np.ndarray, w: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``lo``, ``inv`` and the well's half-width ``r`` in bins, float32 as in the torch path."""
    w = w.astype(np.float32)
    lo = (mins.astype(np.float32) - w).astype(np.float32)
    inv = (np.float32(n_bins - 1) / (maxs.astype(np.float32) + w - lo)).astype(np.float32)
    return lo, inv, (w * inv).astype(np.float32)


def edge_split(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``q = floor(r)`` and ``φ = r - q`` per layer."""
    q = np.floor(r.astype(np.float64))
    return q, r.astype(np.float64) - q


def non_finite(mins: np.ndarray, maxs: np.ndarray) -> list[int]:
    """Layers whose extremes are NaN or inf."""
    return [i for i in range(len(mins)) if not (math.isfinite(float(mins[i])) and math.isfinite(float(maxs[i])))]
