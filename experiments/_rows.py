"""The one row writer of the experiment scripts: a JSON line stamped with what produced it."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
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
