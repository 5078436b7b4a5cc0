"""Wall-clock time of the post-training quantizers (HEQ, optimal k-means, uniform) on CPU.

Baselines of docs/design.md section 4, for comparison with soft quantization (Bernstein, Di Carlo,
Schwab, arXiv:2601.21219). Weights are float32 N(0, 1) samples (all distinct, the worst
case for the k-means dynamic program, which runs on distinct values). Each cell is the
best of ``--repeats`` runs, in seconds. The table is printed and appended, with the
command, date and machine, to ``benchmarks/results/baselines.md``.

Usage::

    python benchmarks/bench_baselines.py [--n 10000 36864 100000 1000000] [--k 4 16] [--repeats 3] [--threads 1]

36864 is the largest ResNet-20 layer (64 x 64 x 3 x 3).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sq_lightning.ops.baselines import quantize

RESULTS = Path(__file__).resolve().parent / "results" / "baselines.md"
METHODS = ("heq", "kmeans", "uniform")


def _best_time(theta: torch.Tensor, k: int, method: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        quantize(theta, k, method)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, nargs="+", default=[10_000, 36_864, 100_000, 1_000_000], help="weights per tensor"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16], help="number of levels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the best is reported")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--no-save", action="store_true", help=f"print only, do not append to {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    rows = ["| N | K | heq (s) | kmeans (s) | uniform (s) |", "| ---: | ---: | ---: | ---: | ---: |"]
    print(rows[0])
    for n in args.n:
        theta = torch.randn(n, generator=gen)
        for k in args.k:
            cells = [f"{_best_time(theta, k, m, args.repeats):.4f}" for m in METHODS]
            rows.append(f"| {n} | {k} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    header = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{shlex.join([python, *sys.argv])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, 1-min load average {load:.2f} "
        f"at the end (other jobs share these CPUs). Best of {args.repeats} runs, float32 N(0,1) weights.",
        "",
    ]
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write("\n".join(header + rows) + "\n\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
