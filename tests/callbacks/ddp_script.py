"""Trains ``tests.helpers.TinyNet`` on the digits with the callbacks under test and saves
what every rank ends with; run by ``tests/callbacks/test_distributed.py``.

Lightning's ``strategy="ddp"`` starts ranks 1.. by re-running ``sys.argv``: that works for
a script, not from inside pytest, hence this file. One launch runs every mode in turn
(the process group is set up once), which saves the start-up of a launch per mode::

    PYTHONPATH=. python tests/callbacks/ddp_script.py OUT --devices 2 --batch-size 50 --modes soft,refine,codebook

writes ``OUT/rank{r}.pt`` = ``{mode: {"state_dict": ..., ...}}`` on each rank. The test
imports :func:`run_mode` for the one-process reference, so both take the same path.
``--strategy fsdp2`` runs the same modes under ``ModelParallelStrategy`` with every
``Linear`` sharded by ``fully_shard`` (FSDP2; the data split is the same as DDP's); the
saved weights, assignments and latent weights are then the gathered whole layers.

How the two runs see the same samples. Under DDP Lightning replaces the sampler of a
plain training ``DataLoader`` by ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``
and calls its ``set_epoch`` every epoch; it shuffles the *training* loader even when
the ``DataLoader`` was built with ``shuffle=False`` (``_process_dataloader`` passes
``shuffle=True`` for the training stage). That sampler draws one permutation ``π_e`` of
all samples per epoch from ``seed + e`` (1400 samples, even: no padding) and deals it
out interleaved: rank ``r`` gets ``π_e[r], π_e[r + 2], ...``. Batch ``k`` of the two
ranks together is therefore the block ``π_e[2kB : 2kB + 2B]``, and the one-process
reference gets exactly these blocks from a ``DistributedSampler(num_replicas=1,
shuffle=True, seed=0)`` with batch ``2B``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from sq_lightning.config import ExportConfig, RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine, SoftQuantCallback
from sq_lightning.callbacks.learned_codebook import LearnedCodebook
from sq_lightning.models import ImageClassifier
from sq_lightning.models.classifier import build_model
from sq_lightning.ops.baselines import quantize
from sq_lightning.ops.clustering import Clusters
from sq_lightning.sharding import is_sharded
from tests.helpers import TinyNet, digits_loaders

MODES = ("soft", "refine", "reassign", "spread", "given", "resume", "codebook", "distill", "plain")
DDP_MODES = ("soft", "refine", "reassign", "spread", "given", "codebook", "distill")
GIVEN_K = 4
RANK_1_SHIFT = 0.01  # "given": what rank 1 adds to its given centroids (rank 0's must win)
REFINE_SNAP_EPOCH = 2
SEED = 0


class BatchRecorder(Callback):
    """Keeps the inputs of every training batch (to check the data split)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].detach().clone())


class LocalClusters(Callback):
    """Finds the clusters on this rank alone, just before ClusterRefine snaps.

    ClusterRefine broadcasts rank 0's clusters; these are found without any
    communication, to show that every rank would have found the same ones anyway.
    """

    def __init__(self, refine: ClusterRefine, soft: SoftQuantCallback) -> None:
        self.refine, self.soft, self.assignments = refine, soft, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == REFINE_SNAP_EPOCH:
            w_l = {n: self.soft.coupler.w_l(n) for n in self.soft.coupler.sigma}
            found = self.refine.snapper.find(pl_module, w_l=w_l)
            self.assignments = {n: c.assignments.clone() for n, c in found.items()}


class ShardedTinyNet(TinyNet):
    """``TinyNet`` whose layers FSDP2 shards across the data-parallel ranks."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def make_trainer(devices: int, max_epochs: int, callbacks: list, strategy: str = "ddp", checkpoints: bool = False) -> pl.Trainer:
    if devices == 1:
        strategy_obj = "auto"
    elif strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy_obj = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        strategy_obj = strategy
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy_obj,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )


def train_loader(devices: int, batch_size: int) -> DataLoader:
    """Per-rank batch ``batch_size``; see the module docstring for the sample order."""
    train, _ = digits_loaders(batch_size=batch_size, shuffle=False)
    if devices > 1:
        return train  # Lightning puts its DistributedSampler in
    sampler = DistributedSampler(train.dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    return DataLoader(train.dataset, batch_size=batch_size, sampler=sampler)


class LatentAtSnap(Callback):
    """Placed after the ClusterRefine: its latent weights, assignments and centroids right after the snap."""

    def __init__(self, refine: ClusterRefine) -> None:
        self.refine, self.seen = refine, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == REFINE_SNAP_EPOCH:
            sn = self.refine.snapper
            self.seen = {n: (sn.latent[n].cpu().clone(), cl.assignments.cpu().clone(), cl.centroids.cpu().clone())
                         for n, cl in sn.clusters.items()}


class GiveClustersPerRank(Callback):
    """Placed before the ClusterRefine: at setup, when the rank is known, hands it this rank's
    clusters through ``snap_to``: rank 0's ``given``, rank 1's the same with every centroid
    shifted by ``RANK_1_SHIFT``, as clusters computed on each rank from rank-local data may be."""

    def __init__(self, refine: ClusterRefine, given: dict) -> None:
        self.refine, self.given = refine, given

    def setup(self, trainer, pl_module, stage):
        shift = RANK_1_SHIFT * trainer.global_rank
        self.refine.snap_to({n: Clusters(c.centroids + shift, c.assignments, c.counts) for n, c in self.given.items()})


class ClustersAtSnap(Callback):
    """Placed after the ClusterRefine: its whole-layer clusters and latent weights right after the snap."""

    def __init__(self, refine: ClusterRefine) -> None:
        self.refine, self.seen = refine, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == REFINE_SNAP_EPOCH:
            # Copies: on the CPU the snapper's own tensors, which refinement goes on to move.
            self.seen = {what: {n: t.clone() for n, t in d.items()} for what, d in _clusters_of(self.refine).items()}


def _soft_then_refine(max_bits=None, refine=RefineConfig(), export=None) -> tuple[SoftQuantCallback, ClusterRefine]:
    """The coupling, then the snap at ``REFINE_SNAP_EPOCH`` and refinement, of the refine modes."""
    soft = SoftQuantCallback(h=1e-2, w=0.45, stop_epoch=REFINE_SNAP_EPOCH)
    refine = ClusterRefine(snap_epoch=REFINE_SNAP_EPOCH, w=0.45, histogram_every_n_epochs=0,
                           snap=SnapConfig(on_unclustered="snap", recalibrate_bn_batches=5, max_bits=max_bits),
                           refine=refine, export=export)
    return soft, refine


def _clusters_of(refine: ClusterRefine) -> dict:
    """Whole-layer assignments, centroids and latent weights (gathered under FSDP2)."""
    clusters = refine.clusters()
    return {
        "assignments": {n: a.long() for n, (_, a) in clusters.items()},
        "centroids": {n: c for n, (c, _) in clusters.items()},
        "latent": refine.snapper.state_dict().get("latent", {}),
    }


def run_mode(
    mode: str, devices: int, batch_size: int, export_dir: Path | None = None, strategy: str = "ddp"
) -> tuple[pl.Trainer, dict]:
    """Trains one mode; returns the trainer and this rank's results (CPU tensors). With
    ``export_dir``, the refine mode also exports its model there (``ClusterRefine(export=ExportConfig(...))``)."""
    pl.seed_everything(SEED)  # also the seed of Lightning's DistributedSampler
    train = train_loader(devices, batch_size)
    net = ShardedTinyNet if strategy == "fsdp2" and devices > 1 else TinyNet
    out: dict = {}
    if mode == "soft":
        model = net()
        soft = SoftQuantCallback(h=2e-3, w=0.3)
        recorder = BatchRecorder()
        trainer = make_trainer(devices, 3, [recorder, soft], strategy)
        trainer.fit(model, train)
        out["batches"] = recorder.inputs
        out["sigma"] = dict(soft.coupler.sigma)
        out["steps_applied"] = soft.steps_applied
    elif mode == "resume":
        # The "reassign" run stopped one epoch after the snap and resumed from its checkpoint
        # (under FSDP2 a sharded one, written by torch.distributed.checkpoint).
        ckpt_dir = export_dir / "resume"
        for max_epochs, ckpt_path in ((REFINE_SNAP_EPOCH + 1, None), (REFINE_SNAP_EPOCH + 2, ckpt_dir / "last.ckpt")):
            pl.seed_everything(SEED)
            model = net(bn=True)
            soft, refine = _soft_then_refine(max_bits=1, refine=RefineConfig(reassign=True))
            save = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)
            trainer = make_trainer(devices, max_epochs, [soft, refine, save], strategy, checkpoints=True)
            trainer.fit(model, train, ckpt_path=ckpt_path)
        out.update(_clusters_of(refine))
    elif mode == "spread":
        # Moving assignments whose latent weights start from the weights before coupling.
        model = net(bn=True)
        out["coupling_start"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        soft, refine = _soft_then_refine(max_bits=1, refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
        probe = LatentAtSnap(refine)
        trainer = make_trainer(devices, REFINE_SNAP_EPOCH + 2, [soft, refine, probe], strategy)
        trainer.fit(model, train)
        out.update(_clusters_of(refine))
        out["at_snap"] = probe.seen
    elif mode == "given":
        # No coupling: full-precision epochs, then a snap to HEQ clusters of the weights the fit
        # began with (whole layers, also under FSDP2), handed to each rank by `snap_to`.
        model = net(bn=True)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
        given = {n: Clusters.from_quantization(quantize(w, GIVEN_K, "heq")) for n, w in initial.items()}
        # Latent weights from before the fit where the layers are whole; FSDP2 refuses that source.
        source = "snap" if strategy == "fsdp2" and devices > 1 else "coupling_start"
        refine = ClusterRefine(snap_epoch=REFINE_SNAP_EPOCH, histogram_every_n_epochs=0, snap=SnapConfig(on_unclustered="snap", recalibrate_bn_batches=5), refine=RefineConfig(reassign=True, reassign_from=source))
        probe = ClustersAtSnap(refine)
        trainer = make_trainer(devices, REFINE_SNAP_EPOCH + 2, [GiveClustersPerRank(refine, given), refine, probe], strategy)
        trainer.fit(model, train)
        out.update(_clusters_of(refine))
        out["initial"], out["given"], out["at_snap"] = initial, refine.given_clusters, probe.seen  # this rank's
    elif mode in ("refine", "reassign"):
        # BatchNorm so that the snap's statistics re-estimation runs under DDP too. A
        # strong `h` clusters every layer in two epochs; "snap" ties every layer even
        # if one is not quite clustered, so that all three are refined. "reassign":
        # moving assignments, a 2-level budget so that weights sit near the boundaries.
        model = net(bn=True)
        export = ExportConfig(str(export_dir / "refine.sq.safetensors"), "ans") if export_dir else None
        soft, refine = (_soft_then_refine(max_bits=1, refine=RefineConfig(reassign=True)) if mode == "reassign"
                        else _soft_then_refine(export=export))
        local = LocalClusters(refine, soft)
        trainer = make_trainer(devices, REFINE_SNAP_EPOCH + 2, [soft, local, refine], strategy)
        trainer.fit(model, train)
        out.update(_clusters_of(refine))
        out["local_assignments"] = local.assignments
        out["k"] = {n: r.k for n, r in refine.snapper.reports.items()}
        out["exported"] = refine.exported
        size = trainer.callback_metrics.get("sq/export_bytes")
        out["export_bytes"] = float(size) if size is not None else None
    elif mode == "codebook":
        model = net()
        codebook = LearnedCodebook(lam=20.0, bits=2, start_epoch=1, codebook_lr=1e-3)
        trainer = make_trainer(devices, 3, [codebook], strategy)
        trainer.fit(model, train)
        out["codebooks"] = codebook.codebooks()
        out["codebook_steps"] = codebook._steps
    elif mode == "distill":
        # ImageClassifier distilled from a teacher checkpoint (each process writes and reads
        # its own copy: the group may not exist yet), soft quantization on the student.
        torch.manual_seed(SEED + 1)
        teacher = export_dir / f"teacher_{os.getpid()}.pt"
        torch.save(build_model("mlp", mlp_hidden=[32]).state_dict(), teacher)
        torch.manual_seed(SEED)
        model = ImageClassifier(arch="mlp", mlp_hidden=[32], lr=0.05, schedule="constant", weight_decay=0.0,
                                distill_from=str(teacher), distill_weight=0.5, distill_temperature=2.0)
        soft = SoftQuantCallback(h=2e-3, w=0.3)
        trainer = make_trainer(devices, 3, [soft], strategy)
        trainer.fit(model, train)
        out["teacher"] = {k: v.detach().cpu().clone() for k, v in model.teacher.state_dict().items()}
        out["distill_loss"] = float(trainer.callback_metrics["train/distill_loss"])
    elif mode == "plain":  # the "soft" run without coupling: how far coupling moves the weights
        model = net()
        trainer = make_trainer(devices, 3, [], strategy)
        trainer.fit(model, train)
    else:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    out["state_dict"] = {k: (v.full_tensor() if is_sharded(v) else v).detach().clone() for k, v in model.state_dict().items()}
    out["global_step"] = trainer.global_step
    out["world_size"] = trainer.world_size
    return trainer, out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--modes", default=",".join(DDP_MODES))
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    args = parser.parse_args(argv)
    # One thread a process: two ranks share two cores.
    torch.set_num_threads(1)
    results, rank = {}, 0
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes.split(","):
        trainer, results[mode] = run_mode(mode, args.devices, args.batch_size, export_dir=args.out, strategy=args.strategy)
        rank = trainer.global_rank
    torch.save(results, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
