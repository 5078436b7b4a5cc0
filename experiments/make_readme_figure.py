"""README figure: weight histograms collapsing into spikes under soft quantization.

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219) on the digits MLP of
``configs/quickstart_digits.yaml``, built from that file through LightningCLI so the
figure shows exactly the quickstart's run (logging and checkpoints switched off). Each
chosen layer gets one row of three histograms on shared bins: after full-precision
training (start of coupling), at the end of coupling (just before the snap), and after
the snap and refinement with tied weights, whose title gives ``K_l`` and the bits.

Usage::

    python experiments/make_readme_figure.py [--layers model.net.3.weight] [--out docs/weights_collapse.png]

About 20 s on one CPU thread (5 s of it training); the PNG is about 40 KB at the default dpi.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: no display needed
import matplotlib.pyplot as plt
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from sq_lightning import ClusterRefine, LayerSelector, SoftQuantCallback

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart_digits.yaml"
STAGES = ("full precision", "end of coupling", "after snap + refine")


class WeightSnapshots(Callback):
    """Copies the selected weights after epoch ``epochs[stage] - 1`` and at the end of training."""

    def __init__(self, epochs: dict[str, int], selector: LayerSelector) -> None:
        super().__init__()
        self.epochs, self.selector = epochs, selector
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.after_epochs: dict[str, int] = {}  # stage -> epochs completed when copied
        self._completed = 0

    def _grab(self, module: LightningModule, stage: str) -> None:
        self.weights[stage] = {name: p.detach().cpu().clone() for name, p in self.selector.select(module)}
        self.after_epochs[stage] = self._completed

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Epoch ends, not starts: the snap runs in ClusterRefine's epoch start, which
        # could otherwise come before ours.
        self._completed = trainer.current_epoch + 1
        for stage, epoch in self.epochs.items():
            if self._completed == epoch:
                self._grab(pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        self._grab(pl_module, STAGES[2])


def run_quickstart(config: Path, root: str, layers: list[str]) -> tuple[WeightSnapshots, ClusterRefine, float]:
    """Fits the quickstart config; returns the snapshots, the refine callback and val/acc."""
    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        run=False,
        args=[
            "--config", str(config),
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ],
    )
    trainer = cli.trainer
    soft = next(cb for cb in trainer.callbacks if isinstance(cb, SoftQuantCallback))
    refine = next(cb for cb in trainer.callbacks if isinstance(cb, ClusterRefine))
    quantized = [name for name, _ in refine.selector.select(cli.model)]
    unknown = [name for name in layers if name not in quantized]
    if unknown:
        raise SystemExit(f"`--layers` {unknown} are not quantized layers of this model; choose from {quantized}.")
    snapshots = WeightSnapshots({STAGES[0]: soft.start_epoch, STAGES[1]: refine.snap_epoch}, refine.selector)
    trainer.callbacks.append(snapshots)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    acc = float(trainer.callback_metrics["val/acc"])
    return snapshots, refine, acc


def plot(snapshots: WeightSnapshots, refine: ClusterRefine, layers: list[str], bins: int):
    fig = plt.figure(figsize=(9, 3 * len(layers)), layout="constrained")
    fig.suptitle("Soft quantization (arXiv:2601.21219): the weights of a layer collapse into clusters", fontsize=11)
    for sub, name in zip(fig.subfigures(len(layers), 1, squeeze=False)[:, 0], layers):
        report = refine.snapper.reports[name]
        sub.suptitle(f"{name}  (N_l = {report.numel} weights)", fontsize=10, weight="bold")
        axes = sub.subplots(1, 3, sharex=True, sharey=True)
        first = snapshots.weights[STAGES[0]][name].flatten()
        lo, hi = float(first.min()), float(first.max())
        edges = torch.linspace(lo, hi, bins + 1).numpy()
        for ax, stage in zip(axes, STAGES):
            values = snapshots.weights[stage][name].flatten().clamp(lo, hi).numpy()
            ax.hist(values, bins=edges, color="C3" if stage == STAGES[2] else "C0")
            # Log counts: the small outer clusters are as real as the big central ones.
            ax.set_yscale("log")
            detail = f"after {snapshots.after_epochs[stage]} epochs"
            if stage == STAGES[2]:
                detail += f": K_l = {report.k}, {report.bits:.2f} bits"
            ax.set_title(f"{stage}\n{detail}", fontsize=10)
            ax.set_xlabel("weight value")
        axes[0].set_ylabel("count (log scale)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the digits quickstart config")
    parser.add_argument("--layers", nargs="+", default=["model.net.3.weight"], help="one row per layer")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "weights_collapse.png")
    parser.add_argument("--bins", type=int, default=120, help="histogram bins over the full-precision range")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more only slows a model this small)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        snapshots, refine, acc = run_quickstart(args.config, root, args.layers)
    fig = plot(snapshots, refine, args.layers, args.bins)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(refine.snapper.table())
    print(f"val/acc={acc:.4f}; wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
