"""How strong must the coupling be for a layer of N_l weights? Fitting h_l ∝ N_l^-α.

    python experiments/strength_scaling.py [--seeds 0 1] [--epochs 8] [--w 0.45]

Soft quantization (arXiv:2601.21219) scales the strength per layer as
``h_l = h · N_l^-0.66``. This script measures the exponent on this project's own
implementation instead of assuming it:

1. per seed, an MLP 64-256-128-64-10 (layers of 16384, 32768, 8192 and 640 weights)
   is trained in full precision on the 8x8 digits (15 epochs, SGD lr 0.05, momentum 0.9);
2. from it, soft quantization runs for ``--epochs`` epochs with the SAME strength in
   every layer (``alpha=0``, so ``h_l = h``), for ``h`` on a log grid;
3. after each run every layer's clusters are found as ``ClusterRefine`` would (gaps
   wider than ``0.5 w_l``) and its relative snap error measured; a layer counts as
   clustered below the package's default ``max_snap_error = 0.3``;
4. per layer and seed, the threshold strength ``h*_l`` where the snap error crosses
   0.3 is interpolated on the log grid, and ``log h*_l = c - α log N_l`` is fitted by
   least squares: ``α`` is the exponent that would make every layer cluster at the
   same ``h``.

Reference points: the coupling force on a weight is ``2 h_l (n_< - n_>)``, and the
counts within ``w_l`` grow like ``N_l``, so against a size-independent opposing force
``α = 1``; the paper's 0.66 says the opposing task gradient is weaker per weight in
bigger layers. Appends a markdown report with the command to
``experiments/results/strength_scaling.md``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from sq_lightning.callbacks import SoftQuantCallback
from sq_lightning.coupler import WeightCoupler
from sq_lightning.data import DigitsDataModule
from sq_lightning.models import ImageClassifier
from sq_lightning.snapper import ClusterSnapper

RESULTS = Path(__file__).resolve().parent / "results" / "strength_scaling.md"
HIDDEN = [256, 128, 64]
THRESHOLD = 0.3


def _trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def _module() -> ImageClassifier:
    return ImageClassifier(
        arch="mlp", in_features=64, mlp_hidden=HIDDEN, lr=LR, momentum=MOMENTUM, weight_decay=0.0, schedule="constant"
    )


LR, MOMENTUM = 0.05, 0.9


def measure(seed: int, hs: list[float], epochs: int, w: float) -> tuple[dict, dict[str, float]]:
    """({h: {layer: (N_l, K_l, snap error)}} after coupling from one pretrained model,
    {layer: h_l that makes the dimensionless step S_l = 1 on the pretrained weights})."""
    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    base = _module()
    _trainer(15, []).fit(base, datamodule=dm)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    # S_l = lr/(1-mu) · RMS(h_l · unit-strength coupling gradient) / w_l is linear in h_l.
    unit_step = WeightCoupler(w=w, target_step=1.0).calibrate(base, LR / (1 - MOMENTUM))
    out = {}
    for h in hs:
        pl.seed_everything(seed, workers=True)
        module = _module()
        module.load_state_dict(state)
        soft = SoftQuantCallback(h=h, w=w, alpha=0.0)
        _trainer(epochs, [soft]).fit(module, datamodule=dm)
        w_l = {n: soft.coupler.w_l(n) for n in soft.coupler.sigma}
        snapper = ClusterSnapper(w=w)
        found = snapper.find(module, w_l=w_l)
        params = dict(module.named_parameters())
        out[h] = {n: (params[n].numel(), c.k, c.snap_error(params[n].detach())) for n, c in found.items()}
        print(f"seed {seed} h={h:.3g}: " + ", ".join(f"{n.split('.')[-2]}:K={k},err={e:.2f}" for n, (_, k, e) in out[h].items()), flush=True)
    return out, unit_step


def window(hs: list[float], errs: list[float]) -> tuple[float | None, float | None]:
    """(lower, upper) edge of the clustered window, log-interpolated on the grid.

    ``lower``: first h (from below) where the error falls under THRESHOLD; ``upper``:
    the next h above it where the error rises over it again (too strong: the layer's
    weights are thrown around and merge into few wide clusters). ``None`` where the
    grid does not reach the edge.
    """

    def cross(i: int) -> float:
        a, b = math.log(hs[i - 1]), math.log(hs[i])
        ea, eb = errs[i - 1], errs[i]
        f = (ea - THRESHOLD) / (ea - eb) if ea != eb else 0.5
        return math.exp(a + f * (b - a))

    first = next((i for i, e in enumerate(errs) if e < THRESHOLD), None)
    if first is None or first == 0:
        return None, None
    lower = cross(first)
    last = next((i for i in range(first + 1, len(errs)) if errs[i] >= THRESHOLD), None)
    return lower, (cross(last) if last is not None else None)


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares of log h* on log N: returns (alpha, its standard error, c)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(h) for _, h in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    c = my - slope * mx
    resid = [y - (c + slope * x) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(r * r for r in resid) / max(n - 2, 1) / sxx) if n > 2 else float("nan")
    return -slope, se, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--w", type=float, default=0.45)
    ap.add_argument("--h-min", type=float, default=1e-8)
    ap.add_argument("--h-max", type=float, default=1e-4)
    ap.add_argument("--per-decade", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("sq_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    decades = math.log10(args.h_max / args.h_min)
    n_h = int(round(decades * args.per_decade)) + 1
    hs = [args.h_min * 10 ** (decades * i / (n_h - 1)) for i in range(n_h)]
    runs = {seed: measure(seed, hs, args.epochs, args.w) for seed in args.seeds}

    lines = [
        f"## Strength needed per layer size — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"MLP 64-{'-'.join(map(str, HIDDEN))}-10 on the 8x8 digits, 15 full-precision epochs, then {args.epochs} epochs of "
        f"soft quantization with the same h in every layer (alpha = 0), w = {args.w}, SGD lr 0.05, momentum 0.9, "
        f"batch 64. Snap error: relative L2 error of snapping to the gap-split clusters (gap 0.5 w_l); "
        f"'clustered' = error < {THRESHOLD}.",
        "",
        "Snap error (K_l) per layer after coupling:",
        "",
    ]
    lows: list[tuple[int, float]] = []
    highs: list[tuple[int, float]] = []
    s_lows: list[tuple[int, float]] = []
    s_highs: list[tuple[int, float]] = []
    for seed, (res, unit_step) in runs.items():
        names = list(next(iter(res.values())))
        sizes = {n: res[hs[0]][n][0] for n in names}
        lines += [
            f"Seed {seed}:",
            "",
            "| h_l | " + " | ".join(f"{n.removeprefix('model.')} (N={sizes[n]})" for n in names) + " |",
            "| ---: | " + " | ".join("---:" for _ in names) + " |",
        ]
        for h in hs:
            lines.append(f"| {h:.3g} | " + " | ".join(f"{res[h][n][2]:.3f} ({res[h][n][1]})" for n in names) + " |")
        lines.append("")
        for n in names:
            lo, hi = window(hs, [res[h][n][2] for h in hs])
            show = lambda v: f"{v:.3g}" if v else "beyond the grid"  # noqa: E731
            s1 = unit_step[n]
            show_s = lambda v: f"{v / s1:.3g}" if v else "-"  # noqa: E731
            lines.append(f"- seed {seed}, {n.removeprefix('model.')} (N={sizes[n]}): clusters from h_l = {show(lo)} "
                         f"up to {show(hi)}; in dimensionless step S_l: {show_s(lo)} to {show_s(hi)}")
            if lo is not None:
                lows.append((sizes[n], lo))
                s_lows.append((sizes[n], lo / s1))
            if hi is not None:
                highs.append((sizes[n], hi))
                s_highs.append((sizes[n], hi / s1))
        lines.append("")
    for label, pts in (("lower edge h*_l (weakest strength that clusters)", lows),
                       ("upper edge (strongest before the layer is thrown apart)", highs),
                       ("lower edge in S_l units (target_step)", s_lows),
                       ("upper edge in S_l units (target_step)", s_highs)):
        if len({n for n, _ in pts}) >= 2:
            alpha, se, c = fit(pts)
            lines += [
                f"Fit of the {label} over {len(pts)} (layer, seed) points: log h = {c:.2f} - alpha log N_l, "
                f"**alpha = {alpha:.2f} ± {se:.2f}** (standard error).",
                "",
            ]
            print(lines[-2], flush=True)
    lines += [
        "The paper's exponent is 0.66 (arXiv:2601.21219); alpha = 1 would mean the coupling force alone, "
        "h_l N_l, decides. A single h works for every layer when h N_l^-alpha falls in every layer's window. "
        "In S_l units (`SoftQuantCallback(target_step=...)`) an exponent near 0 means one target_step fits every "
        "layer size.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
