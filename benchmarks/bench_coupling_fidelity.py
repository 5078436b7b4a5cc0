"""Accuracy of the histogram coupling gradient against the exact one, versus grid size.

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219) computes the
weight-coupling force of a layer by depositing its weights on a grid of ``n_bins``
points and convolving (the ``histogram`` backend of :mod:`sq_lightning.ops.coupling`).
This script measures how far that is from the exact counts (``coupling_exact``):

* relative L2 error of the gradient, ``||g_hist - g_exact|| / ||g_exact||``, and
  relative error of the loss value, for n_bins = 2^10 .. 2^18, N in {1e4, 1e5, 1e6}
  N(0, 1) weights (std 1, so ``w_l = w``) and w in {0.15, 0.3, 0.45};
* the same on "already clustered" weights: 8 clusters each narrower than a bin of the
  default 2^14 grid, plus a few stragglers (what a layer looks like late in training);
* small layers of ResNet-20 sizes at the default grid (what ``auto`` decides about).

Cells under 1 % are marked in bold. Deterministic (seeded); the time is not measured.
Results are printed and appended to ``benchmarks/results/coupling_fidelity.md``.

Usage::

    python benchmarks/bench_coupling_fidelity.py [--sizes 1e4 1e5 1e6] [--ws 0.15 0.3 0.45]
        [--log2-bins 10 11 ... 18]
"""

from __future__ import annotations

import argparse

import torch

import _common as C
from sq_lightning.ops.coupling import DEFAULT_N_BINS, coupling_exact, coupling_histogram

RESULTS = C.RESULTS_DIR / "coupling_fidelity.md"
LIMIT = 0.01


def rel_errors(theta: torch.Tensor, w: float, n_bins: int, ref) -> tuple[float, float]:
    got = coupling_histogram(theta, w, 1.0, n_bins=n_bins, compute_loss=True)
    g = float((got.grad.double() - ref.grad.double()).norm() / ref.grad.double().norm().clamp_min(1e-300))
    l = abs(float(got.loss) - float(ref.loss)) / max(abs(float(ref.loss)), 1e-300)
    return g, l


def cell(e: float) -> str:
    text = f"{100 * e:.3g}%"
    return f"**{text}**" if e < LIMIT else text


def clustered(n: int, width_bins: float, stragglers: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """8 clusters 0.6 apart (beyond w = 0.3), each of std ``width_bins`` bins of the 2^14 grid."""
    centres = torch.linspace(-2.1, 2.1, 8)
    n_strag = int(round(stragglers * n))
    n_clu = n - n_strag
    span = 4.2 + 2 * 0.3  # range + 2w: the grid of the default histogram
    bin_w = span / (DEFAULT_N_BINS - 1)
    lab = torch.randint(0, 8, (n_clu,), generator=gen)
    x = centres[lab] + width_bins * bin_w * torch.randn(n_clu, generator=gen)
    s = (torch.rand(n_strag, generator=gen) * 4.2) - 2.1
    return torch.cat([x, s])[torch.randperm(n, generator=gen)], bin_w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--ws", type=float, nargs="+", default=[0.15, 0.3, 0.45])
    parser.add_argument("--log2-bins", type=int, nargs="+", default=list(range(10, 19)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help=f"print only, do not append to {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = C.uptime()
    sizes = [int(s) for s in args.sizes]
    bins = [2**k for k in args.log2_bins]
    head = "| N | w | " + " | ".join(f"2^{k}" for k in args.log2_bins) + " |"
    sep = "| ---: | ---: | " + " | ".join("---:" for _ in bins) + " |"
    grad_rows = ["### Gradient: relative L2 error, histogram vs exact (bold: < 1 %)", "", head, sep]
    loss_rows = ["### Loss value: relative error, histogram vs exact (bold: < 1 %)", "", head, sep]
    first_ok: dict[tuple[int, float], str] = {}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        theta = torch.randn(n, generator=gen)
        for w in args.ws:
            ref = coupling_exact(theta, w, 1.0, compute_loss=True)
            errs = [rel_errors(theta, w, m, ref) for m in bins]
            grad_rows.append(f"| {n:.0e} | {w} | " + " | ".join(cell(g) for g, _ in errs) + " |")
            loss_rows.append(f"| {n:.0e} | {w} | " + " | ".join(cell(l) for _, l in errs) + " |")
            ok = [k for k, (g, _) in zip(args.log2_bins, errs) if g < LIMIT]
            first_ok[(n, w)] = f"2^{ok[0]}" if ok else "none"
            print(grad_rows[-1], flush=True)
        del theta
        C.free_memory()

    # Already clustered weights: the grid cannot resolve a cluster narrower than a bin.
    clu_rows = [
        "### Already clustered weights (N = 1e5, w = 0.3): gradient / loss relative error",
        "",
        "8 clusters with centres 0.6 apart on [-2.1, 2.1], each Gaussian with std = the given fraction "
        f"of one bin of the default 2^14 grid, plus uniform stragglers. Bold: < 1 %.",
        "",
        "| cluster std (bins of 2^14) | stragglers | " + " | ".join(f"2^{k}" for k in args.log2_bins) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in bins) + " |",
    ]
    for width, strag in ((0.1, 0.01), (4.0, 0.01)):
        theta, _ = clustered(100_000, width, strag, gen)
        ref = coupling_exact(theta, 0.3, 1.0, compute_loss=True)
        errs = [rel_errors(theta, 0.3, m, ref) for m in bins]
        clu_rows.append(
            f"| {width} | {strag:.0%} | " + " | ".join(f"{cell(g)} / {cell(l)}" for g, l in errs) + " |"
        )
        print(clu_rows[-1], flush=True)

    # Small layers (the sizes of ResNet-20) at the default grid.
    small_rows = [
        f"### Small layers at the default grid ({DEFAULT_N_BINS} bins): gradient / loss relative error",
        "",
        "| N | " + " | ".join(f"w = {w}" for w in args.ws) + " |",
        "| ---: | " + " | ".join("---:" for _ in args.ws) + " |",
    ]
    for n in (432, 640, 2304, 4608, 9216, 36864):
        theta = torch.randn(n, generator=gen)
        cells = []
        for w in args.ws:
            g, l = rel_errors(theta, w, DEFAULT_N_BINS, coupling_exact(theta, w, 1.0, compute_loss=True))
            cells.append(f"{cell(g)} / {cell(l)}")
        small_rows.append(f"| {n} | " + " | ".join(cells) + " |")
    print("\n".join(small_rows), flush=True)

    summary = ["### Smallest grid with gradient error < 1 %", "", "| N | " + " | ".join(f"w = {w}" for w in args.ws) + " |",
               "| ---: | " + " | ".join("---:" for _ in args.ws) + " |"]
    for n in sizes:
        summary.append(f"| {n:.0e} | " + " | ".join(first_ok[(n, w)] for w in args.ws) + " |")
    print("\n".join(summary))
    notes = [
        "Weights N(0, 1) (seeded), h = 1, `coupling_histogram` (prefix-sum convolution, loss by FFT) "
        "against `coupling_exact`. Relative L2 error over all weights of the layer.",
        "",
    ]
    rows = grad_rows + [""] + loss_rows + [""] + summary + [""] + clu_rows + [""] + small_rows
    C.save(RESULTS, C.header("Histogram coupling: fidelity vs n_bins", notes, load_start) + rows, not args.no_save)


if __name__ == "__main__":
    main()
