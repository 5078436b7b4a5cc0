"""Shared helpers of the benchmark scripts: timing statistics and the results header.

The benchmark machines are shared (other jobs run beside them), so every script
compares candidates as ratios measured alternately in one process and reports
medians with their spread; the machine load (``uptime``) goes into every result.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def uptime() -> str:
    """The ``uptime`` line (load averages), or ``os.getloadavg`` where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        if hasattr(os, "getloadavg"):
            return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
        return "load average: unknown"


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (``q`` in [0, 1]) of a non-empty sequence."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``[p25, p75]`` of ``values`` as text: the spread reported beside each median."""
    return "[" + fmt.format(quantile(values, 0.25)) + ", " + fmt.format(quantile(values, 0.75)) + "]"


def calibrate(fn: Callable[[], object], min_seconds: float = 2e-3, max_inner: int = 10_000) -> int:
    """How many calls of ``fn`` make one sample last at least ``min_seconds`` (1 for slow calls)."""
    fn()
    inner = 1
    while inner < max_inner:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if time.perf_counter() - start >= min_seconds:
            break
        inner *= 4
    return min(inner, max_inner)


def sample(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def alternate(
    fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 2e-3, warmup: int = 1
) -> dict[str, list[float]]:
    """Times every candidate once per round, rotating the order each round (ABC, BCA, CAB...).

    Returns the per-call seconds of every round for each candidate, so that ratios
    can be taken round by round (neighbours in time see the same machine load).
    """
    names = list(fns)
    inner = {n: calibrate(fns[n], min_seconds) for n in names}
    for _ in range(warmup):
        for n in names:
            sample(fns[n], inner[n])
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            out[n].append(sample(fns[n], inner[n]))
    return out


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def free_memory() -> None:
    gc.collect()


ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")


def env_line() -> str:
    """Threading and allocator variables that change CPU timings (unset ones are named too)."""
    return ", ".join(f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset" for k in ENV_VARS)


def header(title: str, notes: Sequence[str], load_start: str) -> list[str]:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return [
        f"## {title} — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{shlex.join([python, *sys.argv])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s). Environment: {env_line()}.",
        "",
        f"Load at start: `{load_start}`",
        "",
        f"Load at end: `{uptime()}`",
        "",
        *notes,
    ]


def save(path: Path, lines: Sequence[str], enabled: bool = True) -> None:
    """Appends ``lines`` (a markdown section) to ``path``."""
    if not enabled:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(lines).rstrip() + "\n\n")
    print(f"appended to {path}")
