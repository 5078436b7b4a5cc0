"""ResNet-20 / CIFAR-10: accuracy vs average bits, soft quantization against HEQ.

    python benchmarks/cifar10_tradeoff.py --pretrained benchmarks/checkpoints/resnet20_cifar10_fp.ckpt \\
        --points 1e-3:0.3 1e-3:0.45 --couple-epochs 1 --refine-epochs 1

For each ``h:w`` point, starting from the full-precision checkpoint:

1. soft quantization (``SoftQuantCallback``) for ``--couple-epochs`` at a constant lr;
2. snap + BatchNorm recalibration + refinement (``ClusterRefine``) for ``--refine-epochs``;
3. post-training baselines of the full-precision model at the same per-layer ``K_l``:
   HEQ, optimal 1-D k-means and uniform, each without and with BatchNorm recalibration.

Resumable: every finished point is appended as one JSON line to
``benchmarks/results/cifar10_tradeoff.jsonl`` and skipped on the next run; the
markdown table ``cifar10_tradeoff.md`` and the plot ``cifar10_tradeoff.png`` are
rebuilt from all lines after each point. Data: the offline archive (see
``CIFAR10DataModule``) or torchvision's download with ``--download``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from sq_lightning.callbacks import ClusterRefine, SoftQuantCallback
from sq_lightning.data import CIFAR10DataModule
from sq_lightning.evaluate import accuracy, evaluate_baselines
from sq_lightning.models import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results"


def _trainer(epochs: int, callbacks: list, limit: float | int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks,
        limit_train_batches=limit, limit_val_batches=0, num_sanity_val_steps=0,
    )


def run_point(args, h: float, w: float, dm: CIFAR10DataModule) -> dict:
    """Stages 2 and 3 in one fit (epoch windows), then the baselines at the same K_l."""
    t0 = time.time()
    pl.seed_everything(0)
    module = ImageClassifier(arch="resnet20", lr=args.lr, schedule="constant", init_from=args.pretrained)
    e2 = args.couple_epochs
    soft = SoftQuantCallback(h=h, w=w, stop_epoch=e2)
    refine = ClusterRefine(snap_epoch=e2, w=w, recalibrate_bn_batches=100)
    _trainer(e2 + args.refine_epochs, [soft, refine], args.limit).fit(module, datamodule=dm)
    val = dm.val_dataloader()
    acc = accuracy(module.model, val)
    ks = {n.removeprefix("model."): r.k for n, r in refine.snapper.reports.items() if r.snapped}
    fp = ImageClassifier(arch="resnet20", init_from=args.pretrained).model
    rows = evaluate_baselines(fp, ks, val, dm.train_dataloader(), recalibrate_batches=100)
    summary = refine.snapper.summary()
    return {
        "h": h, "w": w, "bits_weighted": summary["bits_weighted"], "bits_mean": summary["bits_mean"],
        "k_per_layer": {n: r.k for n, r in refine.snapper.reports.items()},
        "kept_fp32": [n for n, r in refine.snapper.reports.items() if not r.snapped],
        "acc": acc, "baselines": rows, "couple_epochs": e2, "refine_epochs": args.refine_epochs,
        "lr": args.lr, "limit_train_batches": args.limit, "seconds": time.time() - t0,
        "date": str(datetime.date.today()), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_reports(lines: list[dict], command: str) -> None:
    if not lines:
        return
    fp = next(r["acc"] for r in lines[0]["baselines"] if r["method"] == "full precision")
    out = [
        "# ResNet-20 / CIFAR-10: soft quantization vs post-training baselines at the same K_l",
        "",
        f"Command: `{command}`",
        f"Full-precision accuracy of the starting checkpoint: {fp:.4f}. Data: offline CIFAR-10 JPEG copy (slightly below the",
        "original binary release). Baselines quantize the full-precision model post-training at the per-layer K_l that soft",
        "quantization found; 'BN' columns re-estimate BatchNorm statistics on 100 training batches.",
        "",
        "| h | w | bits (weighted) | bits (mean) | layers kept fp32 | soft quant + refine | degradation | HEQ | HEQ+BN | k-means | k-means+BN | uniform | uniform+BN | epochs (couple/refine) | date, device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(lines, key=lambda r: (r["w"], r["h"])):
        b = {x["method"].split(" ")[0]: x for x in r["baselines"]}
        cell = lambda m, key: f"{b[m][key]:.4f}" if b.get(m) and b[m].get(key) is not None else "-"  # noqa: E731
        out.append(
            f"| {r['h']:g} | {r['w']:g} | {r['bits_weighted']:.2f} | {r['bits_mean']:.2f} | {len(r['kept_fp32'])} | "
            f"{r['acc']:.4f} | {fp - r['acc']:+.4f} | {cell('heq', 'acc')} | {cell('heq', 'acc_bn')} | "
            f"{cell('kmeans', 'acc')} | {cell('kmeans', 'acc_bn')} | {cell('uniform', 'acc')} | {cell('uniform', 'acc_bn')} | "
            f"{r['couple_epochs']}/{r['refine_epochs']} | {r['date']}, {r['device']} |"
        )
    (RESULTS / "cifar10_tradeoff.md").write_text("\n".join(out) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev extra
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    pts = sorted(lines, key=lambda r: r["bits_weighted"])
    x = [r["bits_weighted"] for r in pts]
    ax.plot(x, [r["acc"] for r in pts], "o-", label="soft quantization + refine")
    for method, marker in (("heq", "s"), ("kmeans", "^"), ("uniform", "v")):
        ys = [next(b["acc_bn"] for b in r["baselines"] if b["method"].startswith(method)) for r in pts]
        ax.plot(x, ys, marker + "--", label=f"{method} post-training (+BN recal.)")
    ax.axhline(fp, color="gray", lw=0.8, label="full precision")
    ax.set_xlabel("average bits per weight (parameter-weighted)")
    ax.set_ylabel("CIFAR-10 test accuracy")
    ax.set_title("ResNet-20: accuracy vs bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "cifar10_tradeoff.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", required=True, help="full-precision ImageClassifier checkpoint")
    ap.add_argument("--points", nargs="+", default=["1e-3:0.3", "1e-3:0.45"], help="h:w pairs")
    ap.add_argument("--couple-epochs", type=int, default=1)
    ap.add_argument("--refine-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01, help="SGD lr, constant over coupling and refinement")
    ap.add_argument("--limit", type=float, default=1.0, help="limit_train_batches (for a smoke run)")
    ap.add_argument("--archive", default=None)
    ap.add_argument("--download", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "cifar10_tradeoff.jsonl"))
    args = ap.parse_args()
    if args.limit >= 1:
        args.limit = 1.0 if args.limit == 1 else int(args.limit)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    dm = CIFAR10DataModule(archive=args.archive, download=args.download, batch_size=128)
    for point in args.points:
        h, w = (float(v) for v in point.split(":"))
        if any(r["h"] == h and r["w"] == w and r["couple_epochs"] == args.couple_epochs for r in done):
            print(f"skip h={h:g} w={w:g}: already in {out}")
            continue
        row = run_point(args, h, w, dm)
        done.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("h", "w", "bits_weighted", "acc")}), flush=True)
        write_reports(done, command)


if __name__ == "__main__":
    main()
