"""Where the GPU histogram path's time goes, and which deposit is fastest (CUDA).

The shipped Triton path of the coupling gradient (``sq_lightning.ops._triton_kernels``)
reads the weights three times (bounds, deposit, gather) and writes the gradient once,
so a memory-bound version would cost about 4/3 of one elementwise pass
(``grad.add_(param)``: two reads, one write). This script times, for one layer of N
weights (Gaussian, and already clustered into 4 values), with CUDA events
(``triton.testing.do_bench``, median, L2 flushed between calls):

* the floors: one elementwise pass, one read of the weights (``aminmax``);
* the phases of the shipped call: bounds + host sync, deposit, field, gather;
* deposit variants:

  - shipped: two float64 atomics per weight (``1 - f`` and ``f``) into
    ``replicas_for(N)`` replicas, and the same with R = 16 ... 1024 replicas (what
    replication buys);
  - ``packed int64``: ONE int64 atomic per weight, the count in the high bits and
    the fixed-point fraction in the low bits (exact integer sums);
  - ``packed fp64``: ONE float64 atomic per weight of ``C + f`` with ``C`` a power of
    two above the weights per replica (``A = floor(S / C)``; rounding grows with C).

Usage::

    python benchmarks/gpu_deposit_variants.py [--sizes 1e7 1e8]
    TRITON_INTERPRET=1 python benchmarks/gpu_deposit_variants.py --check   # CPU: variants vs the shipped deposit
    python benchmarks/gpu_deposit_variants.py --check --device cuda

Results are printed and appended to ``benchmarks/results/gpu_deposit_variants.md``.
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch
import triton
import triton.language as tl

import _common as C

T = importlib.import_module("sq_lightning.ops._triton_kernels")
CP = importlib.import_module("sq_lightning.ops.coupling")
RESULTS = C.RESULTS_DIR / "gpu_deposit_variants.md"
W, H, M = 0.3, 1e-3, 2**14


@triton.jit
def _deposit_int64(x_ptr, n, hist_ptr, lo, inv, n_bins, replicas, unit, scale, BLOCK: tl.constexpr):
    # One int64 atomic per weight: `unit` (= 2^shift) counts the weight in the high
    # bits, its fraction f (fixed point, `scale` = 2^frac_bits) adds in the low bits.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    j, f = T._position(x, lo, inv, n_bins - 2)
    packed = unit + (f * scale + 0.5).to(tl.int64)
    row = hist_ptr + (pid % replicas).to(tl.int64) * n_bins
    tl.atomic_add(row + j, packed, mask=mask, sem="relaxed")


@triton.jit
def _deposit_packed(x_ptr, n, hist_ptr, lo, inv, n_bins, replicas, big, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    j, f = T._position(x, lo, inv, n_bins - 2)
    row = hist_ptr + (pid % replicas).to(tl.int64) * n_bins
    tl.atomic_add(row + j, big + f.to(tl.float64), mask=mask, sem="relaxed")


def _grid(x: torch.Tensor):
    mn, mx = torch.aminmax(x)
    lo, inv, _ = T.grid_parameters(np.array([mn.item()]), np.array([mx.item()]), np.array([W], np.float32), M)
    return float(lo[0]), float(inv[0])


def deposit_shipped(x, lo, inv, reps=None):
    return T.deposit([x], np.array([lo], np.float32), np.array([inv], np.float32), M, replicas=reps)[0]


def int64_replicas(n: int) -> int:
    """Replicas of the int64 variant: one per 2^17 weights, a power of two, at most 256."""
    want = max(1, n >> 17)
    return min(256, 1 << (want.bit_length() - 1))


def deposit_int64(x, lo, inv, reps):
    """Packed int64 deposit: a replica row's count needs b bits, its fraction sum b + frac_bits."""
    per = -(-triton.cdiv(x.numel(), T.BLOCK) // reps) * T.BLOCK
    b = per.bit_length()
    frac_bits = min(20, 63 - 2 * b)
    shift = b + frac_bits
    buf = torch.zeros(reps, M, dtype=torch.int64, device=x.device)
    _deposit_int64[(triton.cdiv(x.numel(), T.BLOCK),)](
        x, x.numel(), buf, lo, inv, M, reps, 1 << shift, float(2**frac_bits), BLOCK=T.BLOCK)
    count = (buf >> shift).sum(0).double()
    frac = (buf & ((1 << shift) - 1)).sum(0).double() * 2.0**-frac_bits
    hist = count - frac
    hist[1:] += frac[:-1]
    return hist


def deposit_packed(x, lo, inv, reps):
    per_rep = -(-x.numel() // reps)
    big = float(2 ** max(1, int(per_rep).bit_length()))
    buf = torch.zeros(reps, M, dtype=torch.float64, device=x.device)
    _deposit_packed[(triton.cdiv(x.numel(), T.BLOCK),)](x, x.numel(), buf, lo, inv, M, reps, big, BLOCK=T.BLOCK)
    count = torch.floor(buf / big)
    frac = buf - count * big
    hist = (count - frac).sum(0)
    hist[1:] += frac.sum(0)[:-1]
    return hist


def check(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    n = 50_000 if device == "cpu" else 300_000
    for x in (torch.randn(n, generator=g), torch.randn(n, generator=g).bfloat16(),
              torch.randint(0, 4, (n,), generator=g).float() + 1e-4 * torch.randn(n, generator=g)):
        x = x.to(device)
        lo, inv = _grid(x)
        ref = deposit_shipped(x, lo, inv, 1)
        for name, fn in (("packed int64", deposit_int64), ("packed fp64", deposit_packed)):
            got = fn(x, lo, inv, 4)
            err = float((got - ref).abs().max() / ref.abs().max())
            print(f"{x.device} {x.dtype}: {name}: max rel deviation from the shipped deposit {err:.2e}")
            assert err < 1e-5, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8])
    parser.add_argument("--check", action="store_true", help="compare the variants with the shipped deposit")
    parser.add_argument("--device", default="cpu", help="device of --check (cpu: under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.check:
        check(args.device)
        return
    if not torch.cuda.is_available():
        parser.error("needs CUDA (use --check with TRITON_INTERPRET=1 on a CPU)")
    from triton.testing import do_bench

    def ms(fn):
        return do_bench(fn, warmup=5, rep=100, return_mode="median")

    load_start = C.uptime()
    sweep = [16, 64, 256, 1024]
    rows = [
        f"Device: {torch.cuda.get_device_name()}; Triton {triton.__version__}; torch {torch.__version__}. "
        "Median ms (CUDA events, L2 flushed); each cell also as a ratio to one elementwise pass of the same N.",
        "",
        "`whole call` = `coupling_histogram(x, 0.3, 1e-3, compute_loss=False)` as shipped; its phases: `bounds` "
        "(aminmax + the host sync), `deposit` (two float64 atomics per weight, `replicas_for(N)` replicas), "
        "`field` (prefix-sum kernel + field kernel), `gather`. Deposit variants: `packed int64` (one int64 atomic "
        "per weight, count and fixed-point fraction; one replica per 2^17 weights, at most 256), `packed fp64` "
        "(one float64 atomic of C + f, `replicas_for(N)`), and the shipped deposit with R replicas.",
        "",
        "| N | data | pass (ms) | read / pass | whole call | bounds | deposit | field | gather | packed int64 | packed fp64 | "
        + " | ".join(f"R={r}" for r in sweep) + " |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in sweep) + " |",
    ]
    gen = torch.Generator().manual_seed(0)
    for n in (int(s) for s in args.sizes):
        for data in ("gaussian", "clustered"):
            x = torch.randn(n, generator=gen) if data == "gaussian" else (
                torch.randint(0, 4, (n,), generator=gen).float() + 1e-4 * torch.randn(n, generator=gen))
            x = x.cuda()
            g = torch.zeros_like(x)
            lo, inv = _grid(x)
            reps = T.replicas_for(n)
            lo_a, inv_a = np.array([lo], np.float32), np.array([inv], np.float32)
            hist = T.deposit([x], lo_a, inv_a, M)
            _, _, r = T.grid_parameters(np.array([x.min().item()]), np.array([x.max().item()]), np.array([W], np.float32), M)
            q, phi = T.edge_split(r)
            force = T.field(hist, q, phi, np.array([2 * H]))
            out = torch.empty_like(x)
            t = {
                "pass": ms(lambda: g.add_(x)),
                "read": ms(lambda: torch.aminmax(x)),
                "whole": ms(lambda: CP.coupling_histogram(x, W, H, compute_loss=False)),
                "bounds": ms(lambda: T.bounds([x])),
                "deposit": ms(lambda: deposit_shipped(x, lo, inv)),
                "int64": ms(lambda: deposit_int64(x, lo, inv, int64_replicas(n))),
                "field": ms(lambda: T.field(hist, q, phi, np.array([2 * H]))),
                "gather": ms(lambda: T.gather([x], lo_a, inv_a, force, [out], add=False)),
                "packed": ms(lambda: deposit_packed(x, lo, inv, reps)),
            }
            for rr in sweep:
                t[f"R{rr}"] = ms(lambda: deposit_shipped(x, lo, inv, rr))
            p = t["pass"]
            keys = ["whole", "bounds", "deposit", "field", "gather", "int64", "packed"] + [f"R{rr}" for rr in sweep]
            cells = " | ".join(f"{t[k]:.4g} ({t[k] / p:.2g}x)" for k in keys)
            rows.append(f"| {n:.0e} | {data} | {p:.4g} | {t['read'] / p:.2f} | {cells} |")
            print(rows[-1], flush=True)
            del x, g, out
            torch.cuda.empty_cache()
    notes = [f"Replicas per layer: `replicas_for(N)` ({', '.join(f'{int(s):.0e}: {T.replicas_for(int(s))}' for s in args.sizes)}).", ""]
    C.save(RESULTS, C.header("GPU histogram path: phases and deposit variants", notes, load_start) + rows, True)


if __name__ == "__main__":
    main()
