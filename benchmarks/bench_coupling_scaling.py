"""Cost of one coupling gradient versus layer size, backend and batching (CPU).

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219) needs, at every
optimizer step, the gradient of the weight-coupling loss of each quantized layer.
This script times one such gradient (``compute_loss=False``) from
:mod:`sq_lightning.ops.coupling`:

1. Scaling: ONE layer of N Gaussian weights, N = 1e3 .. 1e8, for ``histogram``
   (``coupling_histogram``, 2^14 bins), ``exact`` (``coupling_exact``; skipped where
   one call is predicted to exceed ``--exact-limit`` seconds) and ``pairwise`` (N <=
   1e4), each also as a ratio to one memory-bound elementwise pass over the same N
   (``grad.add_(param)`` on preallocated tensors) timed right beside it.
   Target: histogram at N >= 1e7 at most 4x that pass.
2. Where the histogram path's time goes at ``--profile-n`` (default 1e7): its phases
   (deposit, convolution, gather) timed alternately, and the op-level profile.
3. Crossover: exact / histogram on a fine grid of N between 1e3 and 1e5 (single
   layer), and the ``auto`` threshold swept on ResNet-20 (``WeightCoupler`` with
   ``AUTO_EXACT_BELOW`` patched) -- what the package's default should be.
4. Batched forms on ResNet-20's 20 weight tensors: ``coupling_grad_batched`` over all
   layers, a per-layer loop of ``coupling_histogram``, a per-layer loop of
   ``coupling_exact`` and ``WeightCoupler(backend="auto")``.

Candidates are timed alternately (order rotated every round) in one process; cells
are medians over rounds with the 25-75 % spread. Results are printed and appended to
``benchmarks/results/coupling_scaling.md``.

Usage::

    python benchmarks/bench_coupling_scaling.py [--threads 1] [--sizes 1e3 ... 1e8]
        [--skip-batched] [--skip-crossover] [--skip-profile] [--device cuda]

``--device cuda`` runs the scaling table (section 1) and the ResNet-20 batch (section
4) on the GPU, every call followed by ``torch.cuda.synchronize()`` so that a sample
times the finished work; sections 2 and 3 measure CPU-only code paths and are
skipped there.
"""

from __future__ import annotations

import argparse
import importlib
import math

import torch

import _common as C
from sq_lightning import coupler as coupler_mod
from sq_lightning.coupler import WeightCoupler
from sq_lightning.models import resnet20
from sq_lightning.ops.coupling import (
    AUTO_EXACT_BELOW,
    DEFAULT_N_BINS,
    coupling_exact,
    coupling_grad_batched,
    coupling_histogram,
    coupling_pairwise,
    layer_strength,
)

# The module (the package re-exports a function of the same name).
CP = importlib.import_module("sq_lightning.ops.coupling")
K = importlib.import_module("sq_lightning.ops._cpu_kernels")
T = importlib.import_module("sq_lightning.ops._triton_kernels")
RESULTS = C.RESULTS_DIR / "coupling_scaling.md"
W, H = 0.3, 1e-3
TARGET = 4.0


def _rounds_for(n: int) -> int:
    return 15 if n <= 10**5 else 9 if n <= 10**6 else 5 if n <= 10**7 else 3


def _fmt_ms(seconds: list[float]) -> str:
    ms = [1e3 * s for s in seconds]
    return f"{C.median(ms):.4g} {C.spread(ms, '{:.4g}')}"


def _torch_mode(fn):
    mode, K._MODE = K._MODE, "torch"
    try:
        return fn()
    finally:
        K._MODE = mode


def _synced(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


def scaling(args) -> tuple[list[str], dict]:
    rows = [
        f"### 1. One layer of N ~ N(0, 1) weights, w = {W}, {DEFAULT_N_BINS} bins, gradient only",
        "",
        "`pass` = `grad.add_(param)` on preallocated float32 tensors of N entries (one memory-bound "
        "elementwise pass). Ratios are taken round by round against the pass timed in the same round.",
        "",
        "`histogram` = `coupling_histogram` as shipped (fused numba kernels on the CPU when numba is "
        "installed, returning a fresh gradient tensor); `hist into grad` = the same added in place into a "
        "preallocated gradient (`coupling_grad_batched(..., out=[grad])`, what `WeightCoupler` does); "
        "`hist torch` = the pure-torch path (`SQ_LIGHTNING_KERNELS=torch`); `clustered` = `histogram` on "
        "weights already in 4 tight clusters (4 values + N(0, 1e-4) noise: every weight lands on one of 8 bins, "
        "the worst case for the deposit's scatter).",
        "",
        f"numba kernels available: {K.numba is not None}; Triton kernels (CUDA): {T.triton is not None}.",
        "",
        "| N | pass (ms) | histogram (ms) | histogram / pass | hist into grad / pass | hist torch / pass | "
        f"clustered / pass | exact (ms) | exact / pass | pairwise (ms) | best hist <= {TARGET:g}x pass? |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    summary = {}
    exact_prev: tuple[int, float] | None = None
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        rows[-4] = f"Device: {torch.cuda.get_device_name(dev)}; every call synchronized. " + rows[-4]
    for n in args.sizes:
        x = torch.randn(n, generator=gen).to(dev)
        xc = (torch.randint(0, 4, (n,), generator=gen).float() + 1e-4 * torch.randn(n, generator=gen)).to(dev)
        g = torch.zeros(n, device=dev)
        g2 = torch.zeros(n, device=dev)

        def torch_path():
            _torch_mode(lambda: coupling_histogram(x, W, H, compute_loss=False))

        fns = {
            "pass": lambda: g.add_(x),
            "histogram": lambda: coupling_histogram(x, W, H, compute_loss=False),
            "into": lambda: coupling_grad_batched([x], [W], [H], out=[g2]),
            "torch": torch_path,
            "clustered": lambda: coupling_histogram(xc, W, H, compute_loss=False),
        }
        predicted = None
        if exact_prev is not None:
            n0, t0 = exact_prev
            predicted = 1.5 * t0 * (n / n0) * math.log(n) / math.log(n0)
        if predicted is None or predicted <= args.exact_limit:
            fns["exact"] = lambda: coupling_exact(x, W, H, compute_loss=False)
        if n <= 10**4:
            fns["pairwise"] = lambda: coupling_pairwise(x, W, H, compute_loss=False)
        if dev.type == "cuda":
            fns = {k: _synced(f) for k, f in fns.items()}
        # Slow candidates get fewer rounds (at most ~--cell-budget seconds each).
        inner = {k: C.calibrate(f) for k, f in fns.items()}
        first = {k: C.sample(f, inner[k]) for k, f in fns.items()}
        want = {
            k: max(1, min(_rounds_for(n), int(args.cell_budget / max(first[k], 1e-9)))) for k in fns
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        paired_pass: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(max(want.values())):
            order = names[r % len(names) :] + names[: r % len(names)]
            p = C.sample(fns["pass"], inner["pass"])
            for k in order:
                if k == "pass" or len(times[k]) >= want[k]:
                    continue
                times[k].append(C.sample(fns[k], inner[k]))
                paired_pass[k].append(p)
            times["pass"].append(p)
        if "exact" in times:
            exact_prev = (n, C.median(times["exact"]))
        cells = {}
        for k in ("histogram", "into", "torch", "clustered", "exact"):
            if k in times:
                rr = C.ratios(times[k], paired_pass[k])
                cells[k] = (_fmt_ms(times[k]), f"{C.median(rr):.3g} {C.spread(rr, '{:.3g}')}", C.median(rr))
            else:
                cells[k] = (f"skipped (predicted {predicted:.0f} s > {args.exact_limit:g} s)", "-", None)
        pair = _fmt_ms(times["pairwise"]) if "pairwise" in times else "-"
        hr = min(cells["histogram"][2], cells["into"][2])
        summary[n] = {"hist_ratio": hr, "hist_ms": 1e3 * C.median(times["histogram"]),
                      "torch_ratio": cells["torch"][2], "pass_ms": 1e3 * C.median(times["pass"])}
        ok = ("yes" if hr <= TARGET else "NO") if n >= 10**7 else "(n/a)"
        rows.append(
            f"| {n:.0e} | {_fmt_ms(times['pass'])} | {cells['histogram'][0]} | {cells['histogram'][1]} | "
            f"{cells['into'][1]} | {cells['torch'][1]} | {cells['clustered'][1]} | "
            f"{cells['exact'][0]} | {cells['exact'][1]} | {pair} | {ok} |"
        )
        print(rows[-1], flush=True)
        del x, xc, g, g2, fns
        C.free_memory()
    return rows, summary


def profile_histogram(args) -> list[str]:
    """Phases of ``coupling_grad_batched`` for one layer, via the module's own helpers."""
    n = args.profile_n
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    sizes = (n,)
    w_t = torch.tensor([W])
    h_t = torch.tensor([H])
    hist, idx, frac, r, _ = CP._deposit(x, sizes, w_t, DEFAULT_N_BINS)
    force = CP._force_prefix(hist, r)
    table = (force * (2.0 * h_t)[:, None]).reshape(-1)
    buf = torch.empty(n)
    lo, inv = (x.min() - W)[None], ((DEFAULT_N_BINS - 1) / (x.max() - x.min() + 2 * W))[None]
    layers = K.Layers([x]) if K.numba is not None else None
    lo_np, inv_np = lo.numpy(), inv.numpy()
    kernels = {
        "numba kernels: deposit (one read of the weights)": lambda: K.deposit(layers, lo_np, inv_np, DEFAULT_N_BINS),
        "numba kernels: gather added into a preallocated grad": lambda: K.gather(layers, lo_np, inv_np, table[None], [buf]),
    } if layers is not None else {}
    phases = {
        "whole call (coupling_histogram)": lambda: coupling_histogram(x, W, H, compute_loss=False),
        "bounds (aminmax)": lambda: torch.aminmax(x),
        "deposit (_deposit: bounds, t/idx/frac, 2 bincounts)": lambda: CP._deposit(x, sizes, w_t, DEFAULT_N_BINS),
        "  of which the 2 bincounts": lambda: (
            torch.bincount(idx, minlength=DEFAULT_N_BINS),
            torch.bincount(idx, weights=frac, minlength=DEFAULT_N_BINS),
        ),
        "convolution (_force_prefix, 2^14 bins)": lambda: CP._force_prefix(hist, r),
        "gather (_interpolate: 2 index_select + addcmul)": lambda: CP._interpolate(table, idx, frac),
        "  of which 1 index_select into a fresh tensor": lambda: table.index_select(0, idx),
        "  of which 1 index_select into a preallocated one": lambda: torch.index_select(table, 0, idx, out=buf),
        "reference: pass grad.add_(param), preallocated": lambda: buf.add_(x),
        "reference: fresh tensor of N float32, filled": lambda: torch.empty(n).fill_(1.0),
        **kernels,
    }
    res = C.alternate(phases, rounds=args.profile_rounds, min_seconds=1e-3)
    whole = C.median(res["whole call (coupling_histogram)"])
    rows = [
        f"### 2. Where the histogram time goes, N = {n:.0e} (one layer, gradient only)",
        "",
        f"Each phase timed alone on the same data, alternately, {args.profile_rounds} rounds. "
        "The phases are the module's own helpers (`_deposit`, `_force_prefix`, `_interpolate`: the torch path), "
        "then the two fused numba kernels that replace the deposit and the gather on the CPU.",
        "",
        "| phase | median ms [p25, p75] | share of the whole call |",
        "| --- | ---: | ---: |",
    ]
    for k, v in res.items():
        rows.append(f"| {k} | {_fmt_ms(v)} | {C.median(v) / whole:.0%} |")
    # Op-level view of one real call.
    from torch.profiler import ProfilerActivity, profile

    coupling_histogram(x, W, H, compute_loss=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        coupling_histogram(x, W, H, compute_loss=False)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows += [
        "",
        "torch.profiler, one call, top ops by self CPU time:",
        "",
        "| op | calls | self CPU (ms) | share |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} | {e.self_cpu_time_total / total:.0%} |" for e in ops],
    ]
    print("\n".join(rows), flush=True)
    del x, hist, idx, frac, table, buf
    C.free_memory()
    return rows


def crossover(args) -> tuple[list[str], dict]:
    lo, hi, k = 3.0, 5.0, args.grid_points
    grid = sorted({int(round(10 ** (lo + (hi - lo) * i / (k - 1)))) for i in range(k)} | {AUTO_EXACT_BELOW})
    gen = torch.Generator().manual_seed(2)
    rows = [
        "### 3a. Crossover, one layer: exact / histogram (gradient only)",
        "",
        "| N | histogram (ms) | exact (ms) | exact / histogram [p25, p75] | faster |",
        "| ---: | ---: | ---: | ---: | :---: |",
    ]
    meds = []
    for n in grid:
        x = torch.randn(n, generator=gen)
        res = C.alternate(
            {"histogram": lambda: coupling_histogram(x, W, H, compute_loss=False),
             "exact": lambda: coupling_exact(x, W, H, compute_loss=False)},
            rounds=args.crossover_rounds,
        )
        rr = C.ratios(res["exact"], res["histogram"])
        meds.append((n, C.median(rr)))
        rows.append(
            f"| {n} | {_fmt_ms(res['histogram'])} | {_fmt_ms(res['exact'])} | {C.median(rr):.3f} "
            f"{C.spread(rr, '{:.3f}')} | {'exact' if C.median(rr) < 1 else 'histogram'} |"
        )
        print(rows[-1], flush=True)
    # First crossing of ratio 1, interpolated in log N / log ratio.
    cross = None
    for (n0, r0), (n1, r1) in zip(meds, meds[1:]):
        if r0 < 1 <= r1:
            f = -math.log(r0) / (math.log(r1) - math.log(r0))
            cross = int(round(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))))
            break
    rows += ["", f"Single-layer crossover (first N where exact stops being faster): "
             f"{cross if cross is not None else 'not found in the grid'}."]

    # The threshold that matters for WeightCoupler: the histogram side is batched.
    torch.manual_seed(0)
    model = resnet20()
    params = {n: p.detach() for n, p in model.named_parameters() if p.dim() > 1}
    sizes = sorted({p.numel() for p in params.values()})
    thresholds = [0] + [s + 1 for s in sizes] + [AUTO_EXACT_BELOW]
    thresholds = sorted(set(thresholds))
    cpl = WeightCoupler(h=H, w=W, backend="auto")
    cpl.prepare(model)
    original = coupler_mod.AUTO_EXACT_BELOW

    def with_threshold(t: int):
        def run():
            coupler_mod.AUTO_EXACT_BELOW = t
            try:
                cpl.gradients(params)
            finally:
                coupler_mod.AUTO_EXACT_BELOW = original
        return run

    res = C.alternate({t: with_threshold(t) for t in thresholds}, rounds=args.crossover_rounds)
    base = res[original]
    rows += [
        "",
        "### 3b. `auto` threshold on ResNet-20 (WeightCoupler.gradients, 20 weight tensors)",
        "",
        f"Layers below the threshold use `exact`, the rest one batched histogram pass. Layer sizes: {sizes}. "
        f"Ratio to the current default `AUTO_EXACT_BELOW = {original}`, round by round.",
        "",
        "| threshold | layers on exact | median ms [p25, p75] | / current default [p25, p75] |",
        "| ---: | ---: | ---: | ---: |",
    ]
    best = None
    for t in thresholds:
        n_exact = sum(p.numel() < t for p in params.values())
        rr = C.ratios(res[t], base)
        if best is None or C.median(res[t]) < best[1]:
            best = (t, C.median(res[t]))
        label = f"{t}" + (" (current)" if t == original else "") + (" (all histogram)" if t == 0 else "")
        rows.append(f"| {label} | {n_exact} | {_fmt_ms(res[t])} | {C.median(rr):.3f} {C.spread(rr, '{:.3f}')} |")
    rows += ["", f"Fastest threshold on ResNet-20 in this run: {best[0]}."]
    print("\n".join(rows[-len(thresholds) - 9 :]), flush=True)
    return rows, {"single_crossover": cross, "resnet_best": best[0]}


def batched(args) -> list[str]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = resnet20().to(dev)
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.dim() > 1]
    ps = [p for _, p in named]
    ws = [W * float(p.std()) for p in ps]
    hs = [layer_strength(H, p.numel(), 0.66) for p in ps]
    cpl = WeightCoupler(h=H, w=W, backend="auto")
    cpl.prepare(model)
    params = dict(named)
    fns = {
        "coupling_grad_batched (all 20 layers, one pass)": lambda: coupling_grad_batched(ps, ws, hs),
        "per-layer loop of coupling_histogram": lambda: [
            coupling_histogram(p, w, h, compute_loss=False) for p, w, h in zip(ps, ws, hs)
        ],
        "per-layer loop of coupling_exact": lambda: [
            coupling_exact(p, w, h, compute_loss=False) for p, w, h in zip(ps, ws, hs)
        ],
        f"WeightCoupler auto (exact below {coupler_mod.AUTO_EXACT_BELOW}, rest batched)": lambda: cpl.gradients(params),
        "coupling_grad_batched, pure-torch path": lambda: _torch_mode(lambda: coupling_grad_batched(ps, ws, hs)),
    }
    if dev.type == "cuda":
        fns = {k: _synced(f) for k, f in fns.items()}
    res = C.alternate(fns, rounds=args.batched_rounds)
    base = res[next(iter(fns))]
    rows = [
        f"### 4. ResNet-20, all {len(ps)} weight tensors ({sum(p.numel() for p in ps)} weights), gradient only, "
        f"on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'the CPU'}",
        "",
        "| form | median ms [p25, p75] | / batched [p25, p75] |",
        "| --- | ---: | ---: |",
    ]
    for k, v in res.items():
        rr = C.ratios(v, base)
        rows.append(f"| {k} | {_fmt_ms(v)} | {C.median(rr):.3f} {C.spread(rr, '{:.3f}')} |")
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (bincount is serial anyway)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--exact-limit", type=float, default=60.0, help="skip exact where one call is predicted slower (s)")
    parser.add_argument("--cell-budget", type=float, default=30.0, help="seconds of timed calls per candidate and size")
    parser.add_argument("--profile-n", type=int, default=10**7)
    parser.add_argument("--profile-rounds", type=int, default=7)
    parser.add_argument("--grid-points", type=int, default=21, help="points of the crossover grid 1e3..1e5")
    parser.add_argument("--crossover-rounds", type=int, default=15)
    parser.add_argument("--batched-rounds", type=int, default=25)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-crossover", action="store_true")
    parser.add_argument("--skip-batched", action="store_true")
    parser.add_argument("--no-save", action="store_true", help=f"print only, do not append to {RESULTS.name}")
    parser.add_argument("--device", default="cpu",
                        help="device of the scaling table and the ResNet-20 batch (cuda: sections 2-3 are skipped)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
        args.skip_profile = args.skip_crossover = True
    args.sizes = [int(s) for s in args.sizes]
    torch.set_num_threads(args.threads)
    load_start = C.uptime()
    rows: list[str] = []
    summary: dict = {}
    if not args.skip_scaling:
        r, s = scaling(args)
        rows += r + [""]
        summary["scaling"] = s
    if not args.skip_profile:
        rows += profile_histogram(args) + [""]
    if not args.skip_crossover:
        r, s = crossover(args)
        rows += r + [""]
        summary["crossover"] = s
    if not args.skip_batched:
        rows += batched(args) + [""]
    notes = [
        f"Target: histogram at N >= 1e7 at most {TARGET:g}x one elementwise pass. Wall-clock on a shared "
        "machine: compare ratios measured in the same run.",
        "",
    ]
    C.save(RESULTS, C.header("Coupling gradient: scaling, crossover, batching", notes, load_start) + rows, not args.no_save)


if __name__ == "__main__":
    main()
