"""What the experiment scripts share: the row writer (a JSON line stamped with what produced it) and the
95% t-interval of their reports."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch


def append_row(path: Path, row: dict, script: str, argv: list[str]) -> dict:
    """Adds the command, date, machine, threads and torch version to ``row`` and appends it to
    ``path`` (one JSON object per line); returns the stamped row."""
    row.update(command=f"python experiments/{script} " + " ".join(argv),
               date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs", threads=torch.get_num_threads(),
               torch=torch.__version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its 95% Student-t interval (nan for one value)."""
    from scipy import stats  # scikit-learn's dependency

    m = statistics.mean(values)
    if len(values) < 2:
        return m, math.nan
    return m, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
