"""The converged ResNet-20 / CIFAR-10 benchmark: one protocol for every method, enforced here.

Every cell of the grid is a run of ``experiments/cifar10_tradeoff.py`` built from ``PROTOCOL``,
so that all methods share:

- the same start: the converged full-precision checkpoint ``PROTOCOL["pretrained"]``;
- the same epochs: ``couple_epochs`` of the training-time method (coupling, the regularizer of
  method B, DKM's clustering, or plain fine-tuning before the snap of the HEQ / k-means
  controls) followed by ``refine_epochs`` with tied weights, at the same lr and schedule;
- the same seeds (``SEEDS``, at least 3) and data order per seed;
- the same bit accounting: every layer of ResNet-20 counted, the first convolution and the
  classifier at ``edge_bits`` for every method (``--edge-bits``), weighted by layer size;
- the same extras, which here means none: no distillation, no latent-weight start before the
  coupling, fixed assignments in refinement; BatchNorm statistics re-estimated after every snap
  (all methods, post-training ones included).

The grid (``CELLS``): at about 1, 1.6 (ternary), 2 and 3 weighted bits, soft quantization with
the package defaults (relative strength) and with the best recipe documented before this
benchmark, without its extras (``h=1e-3, w=0.9``, strength ramp over two epochs), method B, coremltools DKM (power-of-two budgets
only), HEQ and k-means each followed by the same refinement, and post-training HEQ and k-means
(read from every soft-quantization row's baselines at its own ``K_l``). The configuration was
fixed on 2026-12-07, before any seed of it was run; a cell changed after seeing results must be
labelled in ``TUNED_AFTER``.

    python experiments/converged.py plan                 # the commands and what they cost
    python experiments/converged.py run --cell 2:softquant-default --seed 0
    python experiments/converged.py report               # experiments/results/converged.md

``report`` refuses rows that break the protocol (another start, epochs, edge policy, an extra),
reports each cell's mean with its 95% t-interval over seeds and, for the paper's claim, the
paired difference to post-training HEQ at the same ``K_l``: an interval that contains zero is a
tie.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments._rows import t_interval as interval  # noqa: E402  (mean, 95% half-width)

ROWS = ROOT / "experiments" / "results" / "converged.jsonl"
PAGE = ROOT / "experiments" / "results" / "converged.md"
SCRIPT = ROOT / "experiments" / "cifar10_tradeoff.py"

PROTOCOL = {
    "pretrained": "experiments/checkpoints/resnet20_converged.ckpt",
    "couple_epochs": 4,
    "refine_epochs": 2,
    "lr": 0.01,
    "schedule": "cosine",
    "edge_bits": 4,
}
SEEDS = (0, 1, 2)
# Budgets: weighted bits -> the snap's budget flags (every method at the same K_l per layer).
BUDGETS = {"1": ["--max-bits", "1"], "1.6": ["--max-clusters", "3"], "2": ["--max-bits", "2"], "3": ["--max-bits", "3"]}
# Training-time methods: the flags of cifar10_tradeoff.py besides the protocol's and the budget's.
METHODS = {
    "softquant-default": lambda b: ["--points", "1e-3:0.3", "--grad-ratio", "3"],
    "softquant-best": lambda b: ["--points", "1e-3:0.9", "--ramp-steps", "782"],
    "codebook": lambda b: ["--codebook-k", "3"] if b == "1.6" else ["--codebook-bits", b],
    "dkm": lambda b: None if b == "1.6" else ["--dkm-bits", b],
    "heq-refine": lambda b: ["--points", "1e-3:0.3", "--grad-ratio", "3", "--controls", "heq:1e-3:0.3"],
    "kmeans-refine": lambda b: ["--points", "1e-3:0.3", "--grad-ratio", "3", "--controls", "kmeans:1e-3:0.3"],
}
CELLS = {f"{b}:{m}": (b, m) for b in BUDGETS for m in METHODS if METHODS[m](b) is not None}
TUNED_AFTER: dict[str, str] = {}  # cell -> what was changed after seeing results, and why
# Extras that no row of this benchmark may carry (row field -> the value that means "none").
NO_EXTRAS = {"distill": None, "reassign": False, "reassign_from": "snap", "couple_from": 0, "restart_at_snap": False}
MINUTES_PER_EPOCH = 6.0  # ResNet-20, one CPU thread, coupling on (experiments/results/cifar10_tradeoff.md)


def command(cell: str, seed: int) -> list[str]:
    """The cifar10_tradeoff.py argument list of one cell and seed."""
    budget, method = CELLS[cell]
    p = PROTOCOL
    return ["--pretrained", p["pretrained"], "--couple-epochs", str(p["couple_epochs"]),
            "--refine-epochs", str(p["refine_epochs"]), "--lr", str(p["lr"]), "--schedule", p["schedule"],
            "--edge-bits", str(p["edge_bits"]), *BUDGETS[budget], *METHODS[method](budget),
            "--seed", str(seed), "--out", str(ROWS.relative_to(ROOT))]


def violations(row: dict) -> list[str]:
    """How a row breaks the protocol (empty: it keeps it)."""
    out = []
    for key in ("couple_epochs", "refine_epochs", "lr", "schedule", "edge_bits"):
        if row.get(key) != PROTOCOL[key]:
            out.append(f"{key}={row.get(key)!r} (protocol: {PROTOCOL[key]!r})")
    if PROTOCOL["pretrained"] not in row.get("command", ""):
        out.append("another starting checkpoint")
    for key, none in NO_EXTRAS.items():
        if row.get(key, none) not in (none, None):
            out.append(f"extra {key}={row[key]!r}")
    if row.get("limit_train_batches", 1.0) != 1.0:
        out.append("a training subset")
    return out


def cell_of(row: dict) -> str | None:
    """The cell a row belongs to, from the method and budget it records."""
    max_bits = row.get("max_bits") or row.get("source_max_bits")  # a control records its source's budget
    max_clusters = row.get("max_clusters") or row.get("source_max_clusters")
    budget = {1: "1", 2: "2", 3: "3"}.get(max_bits) or ("1.6" if max_clusters == 3 else None)
    budget = budget or ({1: "1", 2: "2", 3: "3"}.get(row.get("n_bits")) if row.get("method") == "dkm" else None)
    budget = budget or ("1.6" if row.get("k") == 3 else {1: "1", 2: "2", 3: "3"}.get(row.get("n_bits")))
    method = row.get("method")
    if method == "softquant":
        method = "softquant-default" if row.get("grad_ratio") else "softquant-best" if row.get("w") == 0.9 else None
    elif method in ("refined-heq", "refined-kmeans"):
        method = method.split("-")[1] + "-refine"
    return f"{budget}:{method}" if budget and method and f"{budget}:{method}" in CELLS else None


def summarize(rows: list[dict]) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Accuracy per cell and seed of the rows that keep the protocol (post-training HEQ / k-means
    taken from the soft-quantization rows' baselines), and the refused rows with their reasons."""
    cells: dict[str, dict[int, float]] = {}
    refused = []
    for r in rows:
        cell = cell_of(r)
        if cell is None:
            continue
        bad = violations(r)
        if bad:
            refused.append(f"{cell} seed {r.get('seed')}: " + ", ".join(bad))
            continue
        cells.setdefault(cell, {})[int(r.get("seed", 0))] = float(r["acc"])
        if cell.endswith(":softquant-default"):
            budget = cell.split(":")[0]
            for b in r.get("baselines", []):  # post-training at this row's K_l, BatchNorm re-estimated
                name = {"heq (post-training)": "ptq-heq", "kmeans (post-training)": "ptq-kmeans"}.get(b.get("method"))
                if name and b.get("acc_bn") is not None:
                    cells.setdefault(f"{budget}:{name}", {})[int(r.get("seed", 0))] = float(b["acc_bn"])
    return cells, refused


def _cost() -> str:
    epochs = PROTOCOL["couple_epochs"] + PROTOCOL["refine_epochs"]
    hours = len(CELLS) * len(SEEDS) * epochs * MINUTES_PER_EPOCH / 60
    return (f"{epochs} epochs a run: about {hours:.0f} CPU-hours at {MINUTES_PER_EPOCH:g} min an epoch on one thread, "
            f"{hours / 2:.0f} hours with two runs side by side")


def report(rows: list[dict]) -> str:
    cells, refused = summarize(rows)
    lines = ["# Converged ResNet-20 / CIFAR-10: every method on the same terms", "",
             "Generated by `python experiments/converged.py report` from `experiments/results/converged.jsonl`.", "",
             "Protocol: " + ", ".join(f"{k} {v}" for k, v in PROTOCOL.items()) + f"; seeds {list(SEEDS)}; "
             "no distillation, no latent start, fixed assignments, BatchNorm re-estimated after every snap "
             "(post-training HEQ and k-means too). Bits: every layer counted, weighted by size, the first convolution "
             f"and the classifier at {PROTOCOL['edge_bits']} bits for every method. Fixed on 2026-12-07 before any seed ran; "
             "cells changed after seeing results are labelled. A paired difference whose 95% interval holds zero is "
             "a tie.", "",
             f"Grid: {len(CELLS)} cells x {len(SEEDS)} seeds, {_cost()}. Commands: `python experiments/converged.py plan`.",
             "", "| cell | seeds | accuracy (mean ± 95% CI) | vs post-training HEQ (paired) |", "| --- | --- | --- | --- |"]
    if not cells:
        lines.append("| (no run yet: the converged checkpoint comes first) | 0 | - | - |")
    for cell in sorted(cells):
        accs = cells[cell]
        m, hw = interval(list(accs.values()))
        budget = cell.split(":")[0]
        heq = cells.get(f"{budget}:ptq-heq", {})
        paired = [accs[s] - heq[s] for s in accs if s in heq]
        if len(paired) >= 2 and not cell.endswith("ptq-heq"):
            d, dhw = interval(paired)
            call = "tie" if abs(d) <= dhw else ("ahead" if d > 0 else "behind")
            vs = f"{100 * d:+.2f} ± {100 * dhw:.2f} points ({call})"
        else:
            vs = "-"
        ci = f"{100 * m:.2f} ± {100 * hw:.2f}" if not math.isnan(hw) else f"{100 * m:.2f} (one seed)"
        label = f"{cell} (tuned after results: {TUNED_AFTER[cell]})" if cell in TUNED_AFTER else cell
        lines.append(f"| {label} | {len(accs)} | {ci} | {vs} |")
    if refused:
        lines += ["", "Rows refused (they break the protocol):", ""] + [f"- {r}" for r in refused]
    return "\n".join(lines) + "\n"


def read_rows(path: Path = ROWS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", help="print every command of the grid and its CPU cost")
    run = sub.add_parser("run", help="run one cell at one seed")
    run.add_argument("--cell", required=True, choices=sorted(CELLS))
    run.add_argument("--seed", type=int, required=True, choices=SEEDS)
    sub.add_parser("report", help=f"write {PAGE.relative_to(ROOT)} from the rows")
    ns = ap.parse_args(argv)
    if ns.cmd == "plan":
        runs = [(c, s) for c in CELLS for s in SEEDS]
        for c, s in runs:
            print("python experiments/cifar10_tradeoff.py " + " ".join(command(c, s)))
        print(f"# {len(runs)} runs, {_cost()}")
    elif ns.cmd == "run":
        if not (ROOT / PROTOCOL["pretrained"]).is_file():
            raise SystemExit(f"{PROTOCOL['pretrained']} is missing: the converged checkpoint comes first "
                             "(configs/cifar10_resnet20_pretrain.yaml, experiments/checkpoints/README.md)")
        subprocess.run([sys.executable, str(SCRIPT), *command(ns.cell, ns.seed)], cwd=ROOT, check=True)
    else:
        PAGE.write_text(report(read_rows()))
        print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
