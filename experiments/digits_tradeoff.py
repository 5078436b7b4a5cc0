"""Accuracy vs average bits on the 8x8 digits: soft quantization, method B, and HEQ.

    python experiments/digits_tradeoff.py [--seeds 0 1]

One full-precision MLP 64-128-64-10 per seed (22 epochs), then with the quickstart's
epoch windows (epochs 10-17 regularized, snap at 18, refine to 22):

* soft quantization (SoftQuantCallback + ClusterRefine) for several (h, w);
* method B (LearnedCodebook + ClusterRefine(clusters_from="codebook")) at 2, 3, 4 bits;
* for every point, post-training HEQ and optimal k-means of the full-precision model
  at the same per-layer K_l.

Appends a markdown table with the command to experiments/results/digits_tradeoff.md.
"""

import argparse
import datetime
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from sq_lightning.callbacks import ClusterRefine, LearnedCodebook, SoftQuantCallback
from sq_lightning.data import DigitsDataModule
from sq_lightning.evaluate import accuracy, quantize_model
from sq_lightning.models import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "digits_tradeoff.md"


def _fit(callbacks, seed):
    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    module = ImageClassifier(arch="mlp", in_features=64, mlp_hidden=[128, 64], lr=0.05, weight_decay=0.0)
    trainer = pl.Trainer(
        max_epochs=22, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=dm)
    dm.setup("fit")
    return module, dm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("sq_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    points = [("soft quant", dict(h=h, w=w)) for h, w in ((2e-3, 0.3), (2e-3, 0.45), (5e-3, 0.45), (5e-3, 0.6))]
    points += [("method B", dict(bits=b)) for b in (2, 3, 4)]
    rows = []
    for seed in args.seeds:
        fp, dm = _fit([], seed)
        fp_acc = accuracy(fp.model, dm.val_dataloader())
        for method, kw in points:
            if method == "soft quant":
                cbs = [SoftQuantCallback(start_epoch=10, stop_epoch=18, **kw), ClusterRefine(snap_epoch=18, w=kw["w"])]
            else:
                cbs = [LearnedCodebook(lam=30.0, start_epoch=10, stop_epoch=18, **kw), ClusterRefine(snap_epoch=18, clusters_from="codebook")]
            module, _ = _fit(cbs, seed)
            refine = cbs[1]
            ks = {n.removeprefix("model."): r.k for n, r in refine.snapper.reports.items() if r.snapped}
            summary = refine.snapper.summary()
            row = {
                "seed": seed, "method": method, "setting": ", ".join(f"{k}={v}" for k, v in kw.items()),
                "bits_w": summary["bits_weighted"], "bits_m": summary["bits_mean"],
                "fp": fp_acc, "acc": accuracy(module.model, dm.val_dataloader()),
                "heq": accuracy(quantize_model(fp.model, ks, "heq"), dm.val_dataloader()),
                "kmeans": accuracy(quantize_model(fp.model, ks, "kmeans"), dm.val_dataloader()),
                "k": "/".join(str(k) for k in ks.values()),
            }
            rows.append(row)
            print(f"seed {seed} {method:<10} {row['setting']:<16} K_l {row['k']:<10} bits {row['bits_w']:.2f}  "
                  f"acc {row['acc']:.4f} (fp {fp_acc:.4f})  HEQ {row['heq']:.4f}  k-means {row['kmeans']:.4f}", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"\n## {datetime.date.today()}, torch {torch.__version__}, 1 thread, CPU",
        f"command: `python {' '.join(sys.argv)}`  load: `{load}`",
        "",
        "Validation accuracy (360 held-out digits). HEQ / k-means: post-training quantization of the",
        "full-precision model of the same seed at the same per-layer K_l (no refinement).",
        "",
        "| seed | method | setting | K_l per layer | bits (weighted) | bits (mean) | accuracy | full precision | HEQ same K_l | k-means same K_l |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['seed']} | {r['method']} | {r['setting']} | {r['k']} | {r['bits_w']:.2f} | {r['bits_m']:.2f} | "
        f"{r['acc']:.4f} | {r['fp']:.4f} | {r['heq']:.4f} | {r['kmeans']:.4f} |"
        for r in rows
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
