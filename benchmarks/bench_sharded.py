"""Sharded coupling gradient: 2 gloo processes, each with half a layer, vs 1 process.

    python benchmarks/bench_sharded.py [--sizes 1e5 1e6 1e7] [--repeats 15]

Prints the median time per call and the bytes each rank sends per call through
all-reduce (per-layer bounds + the L x n_bins histogram), and appends the table with
the command to benchmarks/results/sharded.md.
"""

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sq_lightning.ops.coupling import DEFAULT_N_BINS, coupling_grad_batched

RESULTS = Path(__file__).resolve().parent / "results" / "sharded.md"


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _worker(rank, port, n, repeats, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = torch.randn(n)
    shard = full[rank * (n // 2) : (rank + 1) * (n // 2) if rank == 0 else n].clone()
    w = 0.3

    def call():
        coupling_grad_batched([shard], [w], [1e-3], sharded=True)

    dist.barrier()
    out[rank] = _time(call, repeats)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in map(int, args.sizes):
        torch.manual_seed(0)
        full = torch.randn(n)
        single = _time(lambda: coupling_grad_batched([full], [0.3], [1e-3]), args.repeats)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(port, n, args.repeats, out), nprocs=2, join=True)
        two = max(out.values())
        sent = (2 * 1 + 1) * 4 + DEFAULT_N_BINS * 4  # bounds+flag, then the histogram (float32)
        rows.append((n, single * 1e3, two * 1e3, two / single, sent))
        print(f"N={n:>10}  1 process {single*1e3:8.2f} ms   2 processes (half each) {two*1e3:8.2f} ms   ratio {two/single:5.2f}   all-reduce payload {sent} B/rank/call", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"\n## {datetime.date.today()}  torch {torch.__version__}, 1 thread per process, gloo on loopback",
        f"command: `python {' '.join(sys.argv)}`  load: `{load}`",
        "",
        "| N (one layer) | 1 process, ms | 2 processes, ms (slowest rank) | ratio | all-reduce payload per rank per call |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {n:.0e} | {a:.2f} | {b:.2f} | {r:.2f} | {s} B |" for n, a, b, r, s in rows]
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
