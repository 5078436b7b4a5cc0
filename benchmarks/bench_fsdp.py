"""What each callback adds to a training step under FSDP2 and DDP (2 CPU processes).

ResNet-20 (``ImageClassifier``) on random CIFAR-shaped batches, trained by Lightning
with ``--strategy fsdp2`` (``ModelParallelStrategy``, every conv/linear layer and the
root sharded by ``fully_shard``) or ``--strategy ddp``, 2 processes of 1 thread each
(gloo). One launch runs, in turn: no callback; ``SoftQuantCallback``; ``ClusterRefine``
snapped at fit start (2 bits) with its fixed tie, then with ``reassign=True``;
``LearnedCodebook`` (2 bits). A step is timed from ``on_train_batch_start`` to the end
of every ``on_train_batch_end`` (the tie runs there), on rank 0; the first
``--warmup`` steps are dropped. Figures are ratios to the plain step of the same launch.

Usage (Lightning starts rank 1 by re-running this script)::

    python benchmarks/bench_fsdp.py [--strategy fsdp2|ddp] [--steps 30] [--warmup 5] [--batch 64] [--no-save]
"""

from __future__ import annotations

import argparse
import datetime
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import _common as C
from sq_lightning.config import RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine, SoftQuantCallback
from sq_lightning.callbacks.learned_codebook import LearnedCodebook
from sq_lightning.models import ImageClassifier

RESULTS = C.RESULTS_DIR / "fsdp.md"
CONFIGS = ("plain", "soft quant", "refine (fixed tie)", "refine (reassign=True)", "method B codebook")


class ShardedClassifier(ImageClassifier):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class StepTimer(Callback):
    """Last in the callback list: its batch-end hook runs after every other one."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def _callbacks(config: str) -> list:
    if config == "soft quant":
        return [SoftQuantCallback(h=1e-3, w=0.9)]
    if config.startswith("refine"):
        return [ClusterRefine(snap_epoch=0, histogram_every_n_epochs=0, snap=SnapConfig(max_bits=2, on_unclustered="snap", recalibrate_bn_batches=0), refine=RefineConfig(reassign="reassign" in config))]
    if config == "method B codebook":
        return [LearnedCodebook(lam=30.0, bits=2)]
    return []


def _run(config: str, args) -> tuple[list[float], int]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup) * 2
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    model_cls = ShardedClassifier if args.strategy == "fsdp2" else ImageClassifier
    model = model_cls(arch="resnet20", lr=0.05, schedule="constant")
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps + args.warmup,
        callbacks=[*_callbacks(config), timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    return timer.times[args.warmup :], trainer.global_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = C.uptime()
    rows, rank = [], 0
    for config in CONFIGS:
        times, rank = _run(config, args)
        rows.append((config, times))
    if rank != 0:
        return
    plain = C.median(rows[0][1])
    lines = [
        f"\n## {datetime.date.today()}  {args.strategy}, 2 CPU processes x 1 thread (gloo), torch {torch.__version__}, "
        f"ResNet-20, batch {args.batch} per rank",
        f"command: `python benchmarks/bench_fsdp.py --strategy {args.strategy} --steps {args.steps} "
        f"--warmup {args.warmup} --batch {args.batch}`  load: `{load}`",
        "",
        "| callbacks | step ms, median (rank 0) | spread | ratio to plain |",
        "| --- | --- | --- | --- |",
    ]
    for config, times in rows:
        ms = [1e3 * t for t in times]
        lines.append(f"| {config} | {C.median(ms):.1f} | {C.spread(ms, '{:.1f}')} | {C.median(times) / plain:.3f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        if not RESULTS.exists():
            RESULTS.write_text(
                "# Callbacks under FSDP2 and DDP: step time against the plain step\n\n"
                "Written by `benchmarks/bench_fsdp.py` (see its docstring for what is timed).\n"
            )
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
