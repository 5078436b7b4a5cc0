"""How fast can the histogram backend's two kernels get on this CPU?

The scaling target of the coupling gradient (``bench_coupling_scaling.py``) is: one
histogram gradient of a layer of N >= 1e7 weights in at most 4x one memory-bound
elementwise pass (``grad.add_(param)``). The gradient is two passes over the
weights, a deposit (each weight adds ``1 - f`` and ``f`` to two neighbouring bins of
a 2^14-bin float64 histogram) and a gather (each weight reads two neighbouring
entries of a 2^14-entry float32 force table and adds the interpolation into its
gradient); the FFT convolution between them costs ~0.2 ms.

This script puts the package's numba kernels (``sq_lightning.ops._cpu_kernels``)
beside hand-written C versions compiled here with ``g++ -O3 -march=native``:

* ``C scalar``: the same loop as numba's, to separate compiler from algorithm;
* ``C AVX-512``: positions computed 16 at a time in vector registers (the
  deposit's scatter itself stays scalar: AVX-512 scatters with conflicting
  indices would need ``vpconflictd`` loops), and for the gather two
  ``vgatherdps`` of 16 table entries each;
* the memory floor: one read of the weights (``param.sum()``) for the deposit
  and the pass itself for the gather (it reads the weights and the gradient and
  writes the gradient, as the gather must).

All variants are checked against the numba kernels (bit-identical results), then
timed alternately in one process; ratios are taken round by round against the pass
of the same round. One thread: the kernels split over threads the same way in every
variant. Results are printed and appended to ``benchmarks/results/kernel_ceiling.md``.
Needs numba and a C++ compiler with AVX-512 support (``g++``); the package itself
needs neither.

Usage::

    python benchmarks/kernel_ceiling.py [--sizes 1e7 1e8] [--rounds 9]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C

K = importlib.import_module("sq_lightning.ops._cpu_kernels")
RESULTS = C.RESULTS_DIR / "kernel_ceiling.md"
N_BINS = 1 << 14

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline int64_t position(float x, float lo, float inv, int64_t top, float *f) {
    float t = (x - lo) * inv;
    int64_t j = (int64_t)t;
    if (j > top) j = top;
    if (j < 0) j = 0;
    *f = t - (float)j;
    return j;
}

extern "C" void deposit_scalar(const float *x, int64_t n, float lo, float inv, int64_t top, double *h) {
    for (int64_t i = 0; i < n; i++) {
        float f;
        int64_t j = position(x[i], lo, inv, top, &f);
        h[j] += 1.0 - (double)f;
        h[j + 1] += (double)f;
    }
}

extern "C" void gather_scalar(const float *x, int64_t n, float lo, float inv, int64_t top, const float *tab, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float f;
        int64_t j = position(x[i], lo, inv, top, &f);
        float a = tab[j];
        out[i] += a + f * (tab[j + 1] - a);
    }
}

// 16 positions per step in vector registers. The float->int conversion truncates like
// the scalar cast; clamping the index (not t) keeps f identical to the scalar code.
static inline __m512i positions16(const float *x, __m512 vlo, __m512 vinv, __m512i vtop, __m512 *f) {
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x), vlo), vinv);
    __m512i j = _mm512_cvttps_epi32(t);
    j = _mm512_max_epi32(_mm512_min_epi32(j, vtop), _mm512_setzero_si512());
    *f = _mm512_sub_ps(t, _mm512_cvtepi32_ps(j));
    return j;
}

extern "C" void deposit_avx512(const float *x, int64_t n, float lo, float inv, int64_t top, double *h) {
    __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv);
    __m512i vtop = _mm512_set1_epi32((int)top);
    alignas(64) int32_t js[16];
    alignas(64) float fs[16];
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 f;
        _mm512_store_si512(js, positions16(x + i, vlo, vinv, vtop, &f));
        _mm512_store_ps(fs, f);
        for (int k = 0; k < 16; k++) {
            h[js[k]] += 1.0 - (double)fs[k];
            h[js[k] + 1] += (double)fs[k];
        }
    }
    deposit_scalar(x + i, n - i, lo, inv, top, h);
}

extern "C" void gather_avx512(const float *x, int64_t n, float lo, float inv, int64_t top, const float *tab, float *out) {
    __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv);
    __m512i vtop = _mm512_set1_epi32((int)top), one = _mm512_set1_epi32(1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 f;
        __m512i j = positions16(x + i, vlo, vinv, vtop, &f);
        __m512 a = _mm512_i32gather_ps(j, tab, 4);
        __m512 b = _mm512_i32gather_ps(_mm512_add_epi32(j, one), tab, 4);
        __m512 g = _mm512_fmadd_ps(f, _mm512_sub_ps(b, a), a);
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), g));
    }
    gather_scalar(x + i, n - i, lo, inv, top, tab, out + i);
}
"""

NAMES = ("deposit_scalar", "deposit_avx512", "gather_scalar", "gather_avx512")


def build(directory: Path) -> ctypes.CDLL:
    """Compiles :data:`SOURCE` with the local compiler for this CPU and loads it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("kernel_ceiling.py needs a C++ compiler (g++): apt install g++")
    src, lib = directory / "kernels.cpp", directory / "kernels.so"
    src.write_text(SOURCE)
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    subprocess.run([cxx, *flags, "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    for name in NAMES:
        fn = getattr(dll, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int64,
                       ctypes.c_void_p] + ([ctypes.c_void_p] if name.startswith("gather") else [])
    return dll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if not K.enabled([torch.zeros(1)]):
        raise SystemExit("kernel_ceiling.py compares against the numba kernels: pip install numba")
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    if not avx512:
        raise SystemExit("this CPU has no AVX-512: the hand-written variants cannot run here")
    torch.set_num_threads(1)
    load = C.uptime()
    tmp = tempfile.TemporaryDirectory()
    dll = build(Path(tmp.name))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    lines = ["", f"CPU: {cpu}. Compiler: `g++ -O3 -march=native`. One thread. `pass` = `grad.add_(param)`; ratios are "
             "per round against the pass of the same round, medians with the 25-75 % spread. The histogram gradient "
             "is one deposit + one gather (+ ~0.2 ms of FFT): its ratio to the pass is the sum of the two rows.", ""]
    for size in args.sizes:
        n = int(size)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(n, dtype=np.float32)
        lo = np.float32(x.min() - 0.3)
        inv = np.float32((N_BINS - 1) / (float(x.max()) + 0.3 - float(lo)))
        top = N_BINS - 2
        table = rng.standard_normal(N_BINS).astype(np.float32)
        out = np.zeros(n, np.float32)
        param, grad = torch.from_numpy(x), torch.zeros(n)
        ptr = lambda a: a.ctypes.data  # noqa: E731
        hist = np.zeros(N_BINS)

        def dep(fn):
            def run():
                hist[:] = 0
                fn()
            return run

        fns = {
            "pass": lambda: grad.add_(param),
            "floor: read weights": lambda: param.sum(),
            "deposit numba (package)": dep(lambda: K._deposit_kernel(x, lo, inv, top, hist)),
            "deposit C scalar": dep(lambda: dll.deposit_scalar(ptr(x), n, lo, inv, top, ptr(hist))),
            "deposit C AVX-512": dep(lambda: dll.deposit_avx512(ptr(x), n, lo, inv, top, ptr(hist))),
            "gather numba (package)": lambda: K._gather_kernel(x, lo, inv, top, table, out),
            "gather C scalar": lambda: dll.gather_scalar(ptr(x), n, lo, inv, top, ptr(table), ptr(out)),
            "gather C AVX-512": lambda: dll.gather_avx512(ptr(x), n, lo, inv, top, ptr(table), ptr(out)),
        }
        # Same results as the package's kernels, bit for bit.
        ref_h = np.zeros(N_BINS)
        K._deposit_kernel(x, lo, inv, top, ref_h)
        ref_g = np.zeros(n, np.float32)
        K._gather_kernel(x, lo, inv, top, table, ref_g)
        for name in ("deposit_scalar", "deposit_avx512"):
            h = np.zeros(N_BINS)
            getattr(dll, name)(ptr(x), n, lo, inv, top, ptr(h))
            assert np.allclose(h, ref_h, rtol=1e-12, atol=1e-9), name
        for name in ("gather_scalar", "gather_avx512"):
            g = np.zeros(n, np.float32)
            getattr(dll, name)(ptr(x), n, lo, inv, top, ptr(table), ptr(g))
            assert np.array_equal(g, ref_g), name
        times = C.alternate(fns, args.rounds, min_seconds=0)
        lines += [f"### N = {n:.0e}", "", "| kernel | ms | / pass |", "| --- | ---: | ---: |"]
        for name, ts in times.items():
            ms, rel = [1e3 * t for t in ts], C.ratios(ts, times["pass"])
            lines.append(f"| {name} | {C.median(ms):.2f} {C.spread(ms, '{:.2f}')} | "
                         f"{C.median(rel):.2f} {C.spread(rel, '{:.2f}')} |")
        med = {name: C.median(C.ratios(ts, times["pass"])) for name, ts in times.items()}
        lines += ["", f"Histogram gradient / pass at N = {n:.0e}: package (numba) "
                  f"{med['deposit numba (package)'] + med['gather numba (package)']:.1f}x, best hand-written "
                  f"{min(med['deposit C scalar'], med['deposit C AVX-512']) + min(med['gather C scalar'], med['gather C AVX-512']):.1f}x, "
                  f"memory floor {med['floor: read weights'] + 1:.1f}x (target 4x).", ""]
        print("\n".join(lines[-(len(times) + 5):]), flush=True)
        del x, out, param, grad
        C.free_memory()
    C.save(RESULTS, C.header("Histogram kernels: package vs hand-written AVX-512 vs memory floor", lines, load),
           enabled=not args.no_save)


if __name__ == "__main__":
    main()
