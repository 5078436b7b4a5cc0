"""How hard does the coupling pull, next to the task, in every layer of ResNet-20?

Soft quantization adds the coupling gradient ``∂L_C/∂θ_l`` (strength ``h_l = h·N_l^-α``,
well range ``w_l = w·σ_l``) to the task gradient. Where the coupling gradient is many
times the task's, training follows the coupling and the model loses accuracy while it
clusters (the "coupled" column of ``cifar10_tradeoff.md``); where it is far smaller,
the layer may not cluster within the schedule. This script measures, on the
full-precision checkpoint, the ratio

    RMS(coupling gradient of layer l) / RMS(task gradient of layer l, averaged over B batches)

for every weight tensor and every ``(h, w, α)`` asked for, and the exponent of the
ratio against ``N_l`` (least squares in log-log over the conv layers), which tells
which ``α`` would make the ratio size-independent (``α + exponent``).

Usage::

    python experiments/coupling_vs_task.py --pretrained experiments/checkpoints/resnet20_cifar10_fp.ckpt \\
        --settings 1e-3:0.3:0.66 1e-3:0.6:0.66 1e-3:0.9:0.66 1e-2:0.9:1.1 2e-2:0.6:1.1

Results are printed and appended to ``experiments/results/coupling_vs_task.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmarks._common as C  # noqa: E402
from sq_lightning.coupler import WeightCoupler
from sq_lightning.data import CIFAR10DataModule
from sq_lightning.models import ImageClassifier

RESULTS = ROOT / "experiments" / "results" / "coupling_vs_task.md"


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--settings", nargs="+", default=["1e-3:0.3:0.66", "1e-3:0.6:0.66", "1e-3:0.9:0.66"],
                    metavar="H:W:ALPHA")
    ap.add_argument("--batches", type=int, default=8, help="training batches averaged for the task gradient")
    ap.add_argument("--archive", default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    load = C.uptime()
    module = ImageClassifier(arch="resnet20", init_from=args.pretrained)
    dm = CIFAR10DataModule(archive=args.archive, batch_size=128)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    weights = {n: p for n, p in module.named_parameters() if p.dim() > 1}
    task = {n: torch.zeros_like(p) for n, p in weights.items()}
    for _ in range(args.batches):  # the mean task gradient over B batches (train mode, as in training)
        x, y = next(batches)
        module.zero_grad()
        F.cross_entropy(module.model(x), y).backward()
        for n, p in weights.items():
            task[n] += p.grad / args.batches
    task_rms = {n: float(g.pow(2).mean().sqrt()) for n, g in task.items()}
    ratios: dict[str, list[float]] = {n: [] for n in weights}
    for spec in args.settings:
        h, w, alpha = (float(v) for v in spec.split(":"))
        coupler = WeightCoupler(h=h, w=w, alpha=alpha)
        coupler.prepare(module)
        _, grads = coupler.gradients({n: p.detach() for n, p in weights.items()})
        for n in weights:
            ratios[n].append(float(grads[n].pow(2).mean().sqrt()) / task_rms[n])
    head = " | ".join(f"h={s.split(':')[0]} w={s.split(':')[1]} α={s.split(':')[2]}" for s in args.settings)
    lines = ["", f"Task gradient: mean over {args.batches} training batches of 128 (train mode) at the checkpoint "
             f"`{args.pretrained}`. Cells: RMS(coupling gradient) / RMS(task gradient), per layer.", "",
             f"| layer | N_l | task RMS | {head} |", "| --- | ---: | ---: |" + " ---: |" * len(args.settings)]
    for n in weights:
        lines.append(f"| {n} | {weights[n].numel()} | {task_rms[n]:.2e} | " + " | ".join(f"{r:.2f}" for r in ratios[n]) + " |")
    convs = [n for n in weights if weights[n].dim() == 4 and n != "model.conv1.weight"]
    sizes = [float(weights[n].numel()) for n in convs]
    exps = [slope(sizes, [ratios[n][k] for n in convs]) for k in range(len(args.settings))]
    lines += ["", "Exponent of the ratio against N_l (conv layers after the stem, log-log least squares): "
              + ", ".join(f"{s}: {e:+.2f}" for s, e in zip(args.settings, exps))
              + ". A size-independent ratio needs α + exponent.", ""]
    print("\n".join(lines), flush=True)
    C.save(RESULTS, C.header("Coupling gradient next to the task gradient, ResNet-20 / CIFAR-10", lines, load),
           enabled=not args.no_save)


if __name__ == "__main__":
    main()
