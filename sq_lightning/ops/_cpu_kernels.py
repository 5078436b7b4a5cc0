"""Fused CPU kernels (numba) for the histogram backend's deposit and gather.

The pure-torch histogram path spends its time in several full passes over the
weights (offset, scale, cast, clamp, two ``bincount``, two ``index_select``, an
``addcmul``) and in page faults of the N-sized temporaries they allocate. On a CPU
each of those is memory bound, so a layer of 1e7 weights costs ~45 passes'
worth of time (benchmarks/results/coupling_scaling.md). The two kernels here do the
same arithmetic in one read of the weights each:

* :func:`deposit`: linear ("cloud in cell") deposit of one layer into its row of
  the histogram; no N-sized temporary.
* :func:`gather`: linear interpolation of the force table at every weight, *added*
  into the gradient buffer in the same pass.

Both are plain loops compiled by numba (``nogil``), so a layer can be split into
chunks run on Python threads, one private histogram row per thread (summed after),
up to ``torch.get_num_threads()`` threads. numba is optional (the ``fast`` extra);
without it, :mod:`sq_lightning.ops.coupling` uses its torch path (CUDA tensors take
the Triton kernels of :mod:`sq_lightning.ops._triton_kernels`).
``SQ_LIGHTNING_KERNELS=torch`` forces the torch path on every device, ``=numba``
makes a missing numba an error instead of a silent fallback.

Arithmetic matches the torch path: positions in float32 (``t = (θ - lo)·inv``,
lower grid point clamped to ``[0, M - 2]``), histogram sums in float64.
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
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

_MODE = os.environ.get("SQ_LIGHTNING_KERNELS", "auto").strip().lower()
if _MODE not in ("auto", "numba", "torch"):
    raise ValueError(f"SQ_LIGHTNING_KERNELS must be 'auto', 'numba' or 'torch', got {_MODE!r}.")
if _MODE == "numba" and numba is None:
    raise ImportError("SQ_LIGHTNING_KERNELS=numba but numba is not installed: pip install 'sq_lightning[fast]'.")

# Below this many weights per chunk, a second thread costs more than it saves.
MIN_CHUNK = 1 << 18
# Compiled code is cached next to this file (or in NUMBA_CACHE_DIR); where neither is
# writable (a read-only install) the kernels are compiled once per process instead.
_CACHE = bool(os.environ.get("NUMBA_CACHE_DIR")) or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)

if numba is not None:

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


def enabled(tensors) -> bool:
    """Whether the numba kernels serve these tensors (all on CPU, numba present, not disabled)."""
    return numba is not None and _MODE != "torch" and all(t.device.type == "cpu" for t in tensors)


_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="sq_kernels")
    return _POOL


def _chunks(arrays: list[np.ndarray], n_threads: int) -> list[list[tuple[int, int, int]]]:
    """Splits (layer, start, stop) work into ``n_threads`` lists of about equal size."""
    total = sum(a.size for a in arrays)
    n_threads = max(1, min(n_threads, total // MIN_CHUNK))
    share = -(-total // n_threads)
    plans: list[list[tuple[int, int, int]]] = [[] for _ in range(n_threads)]
    k, filled = 0, 0
    for layer, a in enumerate(arrays):
        start = 0
        while start < a.size:
            take = min(a.size - start, share - filled)
            plans[k].append((layer, start, start + take))
            start += take
            filled += take
            if filled >= share and k < n_threads - 1:
                k, filled = k + 1, 0
    return [p for p in plans if p]


def _run_plans(run, n: int) -> None:
    """``run(k)`` for every plan ``k``: inline for one, on the thread pool for several."""
    if n == 1:
        run(0)
    else:
        list(_pool().map(run, range(n)))


def as_arrays(params: list[Tensor]) -> list[np.ndarray]:
    """Flat float32 views of the layers (a copy only for other dtypes or strides)."""
    return [t.detach().reshape(-1).float().contiguous().numpy() for t in params]


def deposit(arrays: list[np.ndarray], lo: Tensor, inv: Tensor, n_bins: int) -> Tensor:
    """(L, n_bins) float64 histogram of the layers on their grids ``lo + k/inv``."""
    lo_np = lo.detach().float().numpy()
    inv_np = inv.detach().float().numpy()
    top = n_bins - 2
    plans = _chunks(arrays, torch.get_num_threads())
    hists = np.zeros((len(plans), len(arrays), n_bins), dtype=np.float64)

    def run(k: int) -> None:
        for layer, a, b in plans[k]:
            _deposit_kernel(arrays[layer][a:b], lo_np[layer], inv_np[layer], top, hists[k, layer])

    _run_plans(run, len(plans))
    return torch.from_numpy(hists[0] if len(plans) == 1 else hists.sum(0))


def gather(arrays: list[np.ndarray], lo: Tensor, inv: Tensor, table: Tensor, out: list[Tensor]) -> None:
    """``out[l] += interpolation of table[l]`` at each weight of layer ``l`` (in place).

    ``out`` tensors must be float32, contiguous, on the CPU, of the layers' sizes.
    """
    outs = [o.view(-1).numpy() for o in out]
    lo_np = lo.detach().float().numpy()
    inv_np = inv.detach().float().numpy()
    tab = table.detach().float().contiguous().numpy()
    top = tab.shape[1] - 2
    plans = _chunks(arrays, torch.get_num_threads())

    def run(k: int) -> None:
        for layer, a, b in plans[k]:
            _gather_kernel(arrays[layer][a:b], lo_np[layer], inv_np[layer], top, tab[layer], outs[layer][a:b])

    _run_plans(run, len(plans))
