"""Fused CPU kernels (numba) of the histogram backend: bounds, deposit, field, gather.

The pure-torch histogram path spends its time in several full passes over the
weights (offset, scale, cast, clamp, two ``bincount``, two ``index_select``, an
``addcmul``), in page faults of the N-sized temporaries they allocate, and, for many
layers, in about twenty small torch operations on the ``L x n_bins`` grid
(benchmarks/results/coupling_scaling.md). The kernels here are the CPU
implementation of the orchestrator's four steps (:mod:`sq_lightning.ops.coupling`):

* :func:`bounds`: per-layer min and max and a non-finite flag, one read of the weights;
* :func:`deposit`: linear ("cloud in cell") deposit, one read of the weights, float64
  accumulation in a per-thread scratch row, rounded once into a float32 row;
* :func:`field`: the force ``F[k] = 2 C(k) - C(k - r) - C(k + r)`` of every row (the
  formula of :func:`sq_lightning.ops.coupling._force_prefix`), prefix sums in float64;
* :func:`gather`: linear interpolation of the force table at every weight, *added* into
  the gradient (``p.grad``, read and written in place) in the same pass;
  :func:`gather_sum` sums the interpolated values per layer instead (the loss value).

Every step is one call per thread: the weights of all layers, concatenated in thought,
are cut into ``torch.get_num_threads()`` contiguous shares (a share may span several
layers; a layer may be split between two threads) and each thread walks its share
through the layers' memory directly (addresses, no copy, no concatenation). The
threads are Python threads running ``nogil`` compiled code (no numba threading layer
involved, so nothing competes with torch's OpenMP pool), the calling thread takes
the first share. Extra memory per call: one float32 row of ``n_bins`` per layer plus
one per split layer, and a few ``n_bins`` float64 scratch rows per thread; nothing
of the weights' size.

numba is optional (the ``fast`` extra); without it, :mod:`sq_lightning.ops.coupling`
uses its torch path (CUDA tensors take the Triton kernels of
:mod:`sq_lightning.ops._triton_kernels`). ``SQ_LIGHTNING_KERNELS=torch`` forces the
torch path on every device, ``=numba`` makes a missing numba an error instead of a
silent fallback.

Arithmetic matches the torch path: positions in float32 (``t = (θ - lo)·inv``,
lower grid point clamped to ``[0, M - 2]``), histogram sums and prefix sums in float64.
A layer split between threads gets its two float32 partial rows summed: results
differ from one thread's by float32 rounding only (tests/ops/test_cpu_kernels.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch import Tensor

try:  # numba is an optional dependency (extra `fast`)
    import numba
    from numba import types as _nt
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

_MODE = os.environ.get("SQ_LIGHTNING_KERNELS", "auto").strip().lower()
if _MODE not in ("auto", "numba", "torch"):
    raise ValueError(f"SQ_LIGHTNING_KERNELS must be 'auto', 'numba' or 'torch', got {_MODE!r}.")
if _MODE == "numba" and numba is None:
    raise ImportError("SQ_LIGHTNING_KERNELS=numba but numba is not installed: pip install 'sq_lightning[fast]'.")

# Below this many weights per share, a second thread costs more than it saves.
MIN_CHUNK = 1 << 18
# Compiled code is cached next to this file (or in NUMBA_CACHE_DIR); where neither is
# writable (a read-only install) the kernels are compiled once per process instead.
_CACHE = bool(os.environ.get("NUMBA_CACHE_DIR")) or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)

if numba is not None:

    @_intrinsic
    def _f32_ptr(typingctx, addr):  # pragma: no cover - compiled
        """The address ``addr`` (an integer) as a float32 pointer."""
        if not isinstance(addr, _nt.Integer):
            return None
        ptr = _nt.CPointer(_nt.float32)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(addr), codegen

    @_intrinsic
    def _i32_ptr(typingctx, addr):  # pragma: no cover - compiled
        """The address ``addr`` (an integer) as an int32 pointer (the bits of float32 values)."""
        if not isinstance(addr, _nt.Integer):
            return None
        ptr = _nt.CPointer(_nt.int32)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(addr), codegen

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True, inline="always")
    def _position(x, lo, inv, top):  # pragma: no cover - compiled
        """Lower grid point (clamped to [0, top]) and the fraction above it, float32."""
        t = (np.float32(x) - lo) * inv
        j = np.int64(t)
        if j > top:
            j = top
        if j < 0:
            j = 0
        return j, t - np.float32(j)

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _deposit_kernel(theta, lo, inv, top, hist):  # pragma: no cover - compiled
        for i in range(theta.size):
            j, f = _position(theta[i], lo, inv, top)
            f64 = np.float64(f)
            hist[j] += 1.0 - f64
            hist[j + 1] += f64

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _gather_kernel(theta, lo, inv, top, table, out):  # pragma: no cover - compiled
        for i in range(theta.size):
            j, f = _position(theta[i], lo, inv, top)
            a = table[j]
            out[i] += a + f * (table[j + 1] - a)

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _bounds_share(addrs, entries, out):  # pragma: no cover - compiled
        """``out[e] = (min, max, any non-finite)`` of every (layer, start, stop) entry.

        Non-finite values are found from the bits (exponent all ones), not by float
        comparisons, so ``fastmath`` cannot remove the test.
        """
        for e in range(entries.shape[0]):
            layer, a, b = entries[e, 0], entries[e, 1], entries[e, 2]
            n = b - a
            x = numba.carray(_f32_ptr(addrs[layer] + 4 * a), (n,))
            bits = numba.carray(_i32_ptr(addrs[layer] + 4 * a), (n,))
            mn = np.float32(np.inf)
            mx = np.float32(-np.inf)
            bad = 0
            for i in range(n):
                v = x[i]
                mn = min(mn, v)
                mx = max(mx, v)
                bad |= (bits[i] & 0x7F800000) == 0x7F800000
            out[e, 0] = mn
            out[e, 1] = mx
            out[e, 2] = bad

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _deposit_share(addrs, entries, rows, lo, inv, hist, scratch):  # pragma: no cover - compiled
        """Deposits every entry into its float32 row ``hist[rows[e]]`` (float64 scratch)."""
        m = scratch.size
        top = m - 2
        for e in range(entries.shape[0]):
            layer, a, b = entries[e, 0], entries[e, 1], entries[e, 2]
            x = numba.carray(_f32_ptr(addrs[layer] + 4 * a), (b - a,))
            scratch[:] = 0.0
            lo_l = lo[layer]
            inv_l = inv[layer]
            for i in range(b - a):
                j, f = _position(x[i], lo_l, inv_l, top)
                f64 = np.float64(f)
                scratch[j] += 1.0 - f64
                scratch[j + 1] += f64
            row = hist[rows[e]]
            for k in range(m):
                row[k] = np.float32(scratch[k])

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False)
    def _field_rows(hist, out, layers, q, phi, scale, prefix, hx):  # pragma: no cover - compiled
        """``out[l] = scale[l] · (2 C(k) - C(k - r) - C(k + r))`` for each ``l`` in ``layers``.

        ``C(i + φ) = P[i] + a(φ) H[i] + b(φ) H[i+1]`` (``P`` exclusive prefix sum,
        ``a(φ) = 1/2 + φ - φ²/2``, ``b(φ) = φ²/2``), as ``coupling._force_prefix``; ``H``
        is zero and ``P`` constant outside the row. ``out`` may be ``hist`` itself.
        """
        m = hist.shape[1]
        for idx in range(layers.size):
            layer = layers[idx]
            hx[0] = 0.0
            acc = 0.0
            prefix[0] = 0.0
            for k in range(m):
                v = np.float64(hist[layer, k])
                hx[k + 1] = v
                acc += v
                prefix[k + 1] = acc
            hx[m + 1] = 0.0
            ql = q[layer]
            p = phi[layer]
            s = 1.0 - p
            a_p = 0.5 + p - 0.5 * p * p
            b_p = 0.5 * p * p
            a_s = 0.5 + s - 0.5 * s * s
            b_s = 0.5 * s * s
            sc = scale[layer]
            row = out[layer]
            for k in range(m):
                lo_i = k - ql - 1  # C(k - r) = C(lo_i + s)
                hi_i = k + ql  # C(k + r) = C(hi_i + p)
                c_lo = (prefix[min(max(lo_i, 0), m)] + a_s * hx[min(max(lo_i, -1), m) + 1]
                        + b_s * hx[min(max(lo_i + 1, -1), m) + 1])
                c_hi = (prefix[min(max(hi_i, 0), m)] + a_p * hx[min(max(hi_i, -1), m) + 1]
                        + b_p * hx[min(max(hi_i + 1, -1), m) + 1])
                c_mid = prefix[k] + 0.5 * hx[k + 1]
                row[k] = np.float32(sc * (2.0 * c_mid - c_lo - c_hi))

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _gather_share(addrs, out_addrs, entries, lo, inv, table, add):  # pragma: no cover - compiled
        """``out (+)= interpolation of table[layer]`` for every entry, in place."""
        top = table.shape[1] - 2
        for e in range(entries.shape[0]):
            layer, a, b = entries[e, 0], entries[e, 1], entries[e, 2]
            n = b - a
            x = numba.carray(_f32_ptr(addrs[layer] + 4 * a), (n,))
            o = numba.carray(_f32_ptr(out_addrs[layer] + 4 * a), (n,))
            tab = table[layer]
            lo_l = lo[layer]
            inv_l = inv[layer]
            if add:
                for i in range(n):
                    j, f = _position(x[i], lo_l, inv_l, top)
                    t0 = tab[j]
                    o[i] += t0 + f * (tab[j + 1] - t0)
            else:
                for i in range(n):
                    j, f = _position(x[i], lo_l, inv_l, top)
                    t0 = tab[j]
                    o[i] = t0 + f * (tab[j + 1] - t0)

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _gather_sum_share(addrs, entries, lo, inv, table, sums):  # pragma: no cover - compiled
        """``sums[e]`` = sum over the entry's weights of the interpolated ``table[layer]`` (float64)."""
        top = table.shape[1] - 2
        for e in range(entries.shape[0]):
            layer, a, b = entries[e, 0], entries[e, 1], entries[e, 2]
            x = numba.carray(_f32_ptr(addrs[layer] + 4 * a), (b - a,))
            tab = table[layer]
            acc = 0.0
            for i in range(b - a):
                j, f = _position(x[i], lo[layer], inv[layer], top)
                t0 = tab[j]
                acc += np.float64(t0 + f * (tab[j + 1] - t0))
            sums[e] = acc

    @numba.njit(nogil=True, cache=_CACHE, boundscheck=False, fastmath=True)
    def _sumsq_share(addrs, entries, sums):  # pragma: no cover - compiled
        """``sums[e]`` = sum of squares of the entry's values (float64)."""
        for e in range(entries.shape[0]):
            layer, a, b = entries[e, 0], entries[e, 1], entries[e, 2]
            x = numba.carray(_f32_ptr(addrs[layer] + 4 * a), (b - a,))
            acc = 0.0
            for i in range(b - a):
                v = np.float64(x[i])
                acc += v * v
            sums[e] = acc


def enabled(tensors) -> bool:
    """Whether the numba kernels serve these tensors (all on CPU, numba present, not disabled)."""
    return numba is not None and _MODE != "torch" and all(t.device.type == "cpu" for t in tensors)


_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="sq_kernels")
    return _POOL


def _chunks(arrays, n_threads: int) -> list[list[tuple[int, int, int]]]:
    """Splits (layer, start, stop) work into ``n_threads`` lists of about equal size.

    ``arrays``: the layers (anything with ``.size``) or their sizes.
    """
    sizes = [a if isinstance(a, int) else a.size for a in arrays]
    total = sum(sizes)
    n_threads = max(1, min(n_threads, total // MIN_CHUNK))
    share = max(1, -(-total // n_threads))
    plans: list[list[tuple[int, int, int]]] = [[] for _ in range(n_threads)]
    k, filled = 0, 0
    for layer, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(size - start, share - filled)
            plans[k].append((layer, start, start + take))
            start += take
            filled += take
            if filled >= share and k < n_threads - 1:
                k, filled = k + 1, 0
    return [p for p in plans if p]


class Plan:
    """The threads' shares of a model's layers and the histogram row of every entry (cached per model)."""

    def __init__(self, sizes: tuple[int, ...], n_threads: int) -> None:
        self.sizes = sizes
        shares = _chunks(list(sizes), n_threads)
        self.entries = [np.array(s, dtype=np.int64).reshape(-1, 3) for s in shares]
        # The first entry of a layer deposits into row `layer`; the other parts of a
        # split layer into extra rows L, L+1, ... that are added to it afterwards.
        seen: set[int] = set()
        extra: list[tuple[int, int]] = []  # (extra row, layer)
        self.rows = []
        for s in shares:
            rows = []
            for layer, _, _ in s:
                if layer in seen:
                    extra.append((len(sizes) + len(extra), layer))
                    rows.append(extra[-1][0])
                else:
                    seen.add(layer)
                    rows.append(layer)
            self.rows.append(np.array(rows, dtype=np.int64))
        self.extra = extra
        self.n_rows = len(sizes) + len(extra)
        # The field: each thread takes every n-th layer.
        n = len(shares)
        self.field_layers = [np.arange(k, len(sizes), n, dtype=np.int64) for k in range(n)]

    @property
    def n_threads(self) -> int:
        return len(self.entries)


_PLANS: dict[tuple[tuple[int, ...], int], Plan] = {}


def plan_for(sizes: tuple[int, ...], n_threads: Optional[int] = None) -> Plan:
    key = (sizes, torch.get_num_threads() if n_threads is None else n_threads)
    hit = _PLANS.get(key)
    if hit is None:
        if len(_PLANS) > 32:
            _PLANS.clear()
        hit = _PLANS[key] = Plan(*key)
    return hit


def _run(fn, n: int) -> None:
    """``fn(k)`` for ``k`` in ``range(n)``: the calling thread takes ``k = 0``, the pool the rest."""
    if n == 1:
        fn(0)
        return
    futures = [_pool().submit(fn, k) for k in range(1, n)]
    fn(0)
    for f in futures:
        f.result()


class Layers:
    """Flat float32 views of the layers (a copy only for other dtypes or strides) and their addresses."""

    def __init__(self, params: list[Tensor]) -> None:
        self.flats = [t.detach().reshape(-1).float().contiguous() for t in params]
        self.sizes = tuple(f.numel() for f in self.flats)
        self.addrs = np.array([f.data_ptr() for f in self.flats], dtype=np.int64)
        self.plan = plan_for(self.sizes)


def as_arrays(params: list[Tensor]) -> list[np.ndarray]:
    """Flat float32 views of the layers as numpy arrays (a copy only for other dtypes or strides)."""
    return [t.detach().reshape(-1).float().contiguous().numpy() for t in params]


def bounds(layers: Layers) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer float32 min and max; NaN for a layer holding a non-finite value (inf/-inf for an empty one)."""
    plan = layers.plan
    outs = [np.empty((len(e), 3), dtype=np.float32) for e in plan.entries]
    _run(lambda k: _bounds_share(layers.addrs, plan.entries[k], outs[k]), plan.n_threads)
    n = len(layers.sizes)
    mins = np.full(n, np.inf, dtype=np.float32)
    maxs = np.full(n, -np.inf, dtype=np.float32)
    for e, o in zip(plan.entries, outs):
        lid = e[:, 0]
        np.minimum.at(mins, lid, o[:, 0])
        np.maximum.at(maxs, lid, o[:, 1])
        bad = lid[o[:, 2] != 0]
        mins[bad] = np.nan
        maxs[bad] = np.nan
    return mins, maxs


def deposit(layers: Layers, lo: np.ndarray, inv: np.ndarray, n_bins: int) -> Tensor:
    """(L, n_bins) float32 histogram of the layers on their grids ``lo + k/inv`` (a view of a fresh buffer)."""
    plan = layers.plan
    n = len(layers.sizes)
    hist = np.zeros((plan.n_rows, n_bins), dtype=np.float32) if plan.n_rows > n else np.empty((n, n_bins), np.float32)
    lo = np.ascontiguousarray(lo, dtype=np.float32)
    inv = np.ascontiguousarray(inv, dtype=np.float32)

    def run(k: int) -> None:
        scratch = np.empty(n_bins, dtype=np.float64)
        _deposit_share(layers.addrs, plan.entries[k], plan.rows[k], lo, inv, hist, scratch)

    _run(run, plan.n_threads)
    if n > 0 and plan.n_rows == n and any(s == 0 for s in layers.sizes):
        for i, s in enumerate(layers.sizes):
            if s == 0:
                hist[i] = 0.0
    for row, layer in plan.extra:
        hist[layer] += hist[row]
    return torch.from_numpy(hist[:n])


def field(hist: Tensor, q: np.ndarray, phi: np.ndarray, scale: np.ndarray, plan: Optional[Plan] = None) -> Tensor:
    """(L, n_bins) float32 force of every row of ``hist`` at strength ``scale`` (``2 h_l``), computed in place."""
    h = hist.detach()
    if h.dtype != torch.float32 or not h.is_contiguous():
        h = h.float().contiguous()
    arr = h.numpy()
    n_layers, m = arr.shape
    q = np.ascontiguousarray(q, dtype=np.int64)
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    layer_lists = plan.field_layers if plan is not None else [np.arange(n_layers, dtype=np.int64)]

    def run(k: int) -> None:
        _field_rows(arr, arr, layer_lists[k], q, phi, scale, np.empty(m + 1), np.empty(m + 2))

    _run(run, len(layer_lists))
    return h


def gather(layers: Layers, lo: np.ndarray, inv: np.ndarray, table: Tensor, out: list[Tensor], add: bool = True) -> None:
    """``out[l] (+)= interpolation of table[l]`` at each weight of layer ``l`` (in place).

    ``out`` tensors must be float32, contiguous, on the CPU, of the layers' sizes.
    """
    plan = layers.plan
    tab = table.detach().float().contiguous().numpy()
    out_addrs = np.array([o.data_ptr() for o in out], dtype=np.int64)
    lo = np.ascontiguousarray(lo, dtype=np.float32)
    inv = np.ascontiguousarray(inv, dtype=np.float32)
    _run(lambda k: _gather_share(layers.addrs, out_addrs, plan.entries[k], lo, inv, tab, add), plan.n_threads)


def gather_sum(layers: Layers, lo: np.ndarray, inv: np.ndarray, table: Tensor) -> Tensor:
    """(L,) float64: per layer, the sum of ``table[l]`` interpolated at its weights."""
    plan = layers.plan
    tab = table.detach().float().contiguous().numpy()
    lo = np.ascontiguousarray(lo, dtype=np.float32)
    inv = np.ascontiguousarray(inv, dtype=np.float32)
    sums = [np.zeros(len(e), dtype=np.float64) for e in plan.entries]
    _run(lambda k: _gather_sum_share(layers.addrs, plan.entries[k], lo, inv, tab, sums[k]), plan.n_threads)
    total = np.zeros(len(layers.sizes), dtype=np.float64)
    for e, s in zip(plan.entries, sums):
        np.add.at(total, e[:, 0], s)
    return torch.from_numpy(total)


def norms(tensors: list[Tensor]) -> list[float]:
    """Euclidean norm of each tensor (float64 sums), on the kernels' threads: no torch
    parallel region, whose OpenMP workers would keep spinning into the next kernel."""
    layers = Layers(tensors)
    plan = layers.plan
    sums = [np.zeros(len(e), dtype=np.float64) for e in plan.entries]
    _run(lambda k: _sumsq_share(layers.addrs, plan.entries[k], sums[k]), plan.n_threads)
    total = np.zeros(len(layers.sizes), dtype=np.float64)
    for e, v in zip(plan.entries, sums):
        np.add.at(total, e[:, 0], v)
    return np.sqrt(total).tolist()
