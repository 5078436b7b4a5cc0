"""Refinement alone, from saved coupled weights: which start do moving assignments need?

    python experiments/refine_coupled.py --pretrained experiments/checkpoints/resnet20_cifar10_fp.ckpt \\
        --coupled experiments/checkpoints/coupled/softquant-0.005-0.9-seed2.pt --w 0.9 \\
        --max-clusters 3 --edge-bits 4 --latent fp --seed 2

``snap_margins.md`` found that after coupling no weight lies near a decision boundary of
the budgeted snap, so refinement with moving assignments (``ClusterRefine(refine=RefineConfig(reassign=True))``)
has nothing to move, while the full-precision weights under HEQ have 13-15% of theirs
there. This script tests that reading by changing only the start of the refinement's
latent weights (the full-precision copies that take the optimizer's updates and choose
their nearest centroid after each step):

* ``--latent coupled``: the coupled weights (what ``ClusterRefine`` does);
* ``--latent fp``: each weight's full-precision value from ``--pretrained``, shifted so
  that every cluster's latent mean is the coupled centroid: the snapped model is the same
  as with ``coupled`` at the first step, but the members are spread as in full precision
  around it, and the first assignments after the snap follow that spread;
* ``--latent spread``: the coupled weights' own offsets around their cluster's mean, scaled
  per cluster to the spread (standard deviation) of the full-precision members' offsets:
  the coupling's ordering and assignments kept, only the width restored. ``fp`` sends the
  weights that crossed a boundary during the coupling back at the first step (more after a
  longer coupling); ``spread`` does not. At 1 bit that return is what rebalances the
  coupling's lopsided partition (``refine_coupled.md``: 82.07% against 67.31%).

Each row also gives the share of weights whose latent start lies nearer another centroid
than their own (they change cluster at the first step); ``--moves-only`` prints that share
for the three starts without training (seconds, no data).

The snap is the run's (``w_l`` from the full-precision std, the budget, the edge layers),
BatchNorm is re-estimated on 100 batches after it, and the refinement runs ``--epochs``
epochs at the tail of the run's cosine (epochs ``--of-epochs - --epochs`` onwards of a
cosine over ``--of-epochs``: the learning rates the refinement of ``cifar10_tradeoff.py``
saw; the optimizer's momentum starts from zero). Appends a markdown report (the command and
its row) to ``experiments/results/refine_coupled.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sq_lightning.config import RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine
from sq_lightning.handoff import SnapHint
from sq_lightning.data import CIFAR10DataModule
from sq_lightning.evaluate import accuracy
from sq_lightning.models import ImageClassifier
from sq_lightning.models.classifier import lr_factor
from sq_lightning.ops import nearest_centroid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import save  # noqa: E402
from cifar10_tradeoff import EDGE_LAYERS  # noqa: E402  (the run's own edge layers)
from snap_margins import _state, add_run_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class TailCosine(ImageClassifier):
    """ImageClassifier whose per-epoch cosine is the tail, from epoch ``start`` on, of one over ``total`` epochs."""

    def __init__(self, start: int, total: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tail = (start, total)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                              nesterov=hp.nesterov)
        start, total = self.tail
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e + start, "cosine", total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class LatentFromFP(Callback):
    """Right after the snap (placed after the ClusterRefine), starts its latent weights from the
    full-precision ones (:meth:`~sq_lightning.snapper.ClusterSnapper.start_latent_from`: what
    ``ClusterRefine(reassign_from="coupling_start")`` does when coupling and refinement share one fit),
    or with ``spread=True`` from the coupled offsets widened per cluster to the full-precision spread."""

    def __init__(self, refine: ClusterRefine, fp: dict[str, torch.Tensor], spread: bool = False) -> None:
        self.refine, self.fp, self.spread = refine, fp, spread

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            snapper = self.refine.snapper
            fp = {n: self.fp[n.removeprefix("model.")] for n in snapper.clusters}
            if self.spread:
                fp = {n: spread_like(snapper.latent[n], fp[n], snapper.clusters[n].assignments, snapper.clusters[n].k)
                      for n in fp}
            snapper.start_latent_from(fp)


def spread_like(coupled: torch.Tensor, fp: torch.Tensor, assignments: torch.Tensor, k: int) -> torch.Tensor:
    """``coupled``'s offsets around each cluster's mean, scaled to the standard deviation of
    ``fp``'s offsets around that cluster's mean (a cluster of one, or with no coupled spread, keeps 0)."""
    c, f = coupled.detach().double().reshape(-1), fp.detach().double().reshape(-1)
    a = assignments.reshape(-1).to(c.device)
    out = torch.zeros_like(c)
    for j in range(k):
        m = a == j
        if int(m.sum()) < 2:
            continue
        oc, of = c[m] - c[m].mean(), f[m] - f[m].mean()
        sc = oc.std()
        out[m] = oc * (of.std() / sc) if sc > 0 else 0.0
    return out.reshape(coupled.shape)


def first_step_moves(snapper) -> float:
    """Share of the snapped weights whose latent value is nearer another centroid than their own."""
    moved = total = 0
    for name, cl in snapper.clusters.items():
        latent = snapper.latent[name].reshape(-1).float()
        near = nearest_centroid(latent, cl.centroids.to(latent.device).float())
        moved += int((near != cl.assignments.reshape(-1).to(latent.device)).sum())
        total += latent.numel()
    return moved / max(total, 1)


class SnapAccuracy(Callback):
    """Test accuracy right after the snap (and the BatchNorm re-estimation), and the share of
    weights that the first step moves to another cluster (placed after the latent start)."""

    acc = moved = None

    def __init__(self, loader, refine: ClusterRefine) -> None:
        self.loader, self.refine = loader, refine

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.moved = first_step_moves(self.refine.snapper)
            self.acc = accuracy(pl_module.model, self.loader)
            print(f"snapped: {self.acc:.4f}, nearer another centroid: {self.moved:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--latent", choices=["coupled", "fp", "spread"], default="coupled", help="start of the latent weights")
    ap.add_argument("--epochs", type=int, default=2, help="refinement epochs (the run's --refine-epochs)")
    ap.add_argument("--of-epochs", type=int, default=6, help="the run's couple + refine epochs (its cosine's span)")
    ap.add_argument("--lr", type=float, default=0.01, help="the run's --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=1.0, help="limit_train_batches (for a smoke run)")
    ap.add_argument("--archive", default=None, help="CIFAR-10 archive (default: the offline copy)")
    ap.add_argument("--out", default=str(RESULTS / "refine_coupled.md"))
    ap.add_argument("--moves-only", action="store_true",
                    help="no training: print the share of weights each latent start moves at the first step")
    args = ap.parse_args()
    if not Path(args.coupled).is_file():
        raise SystemExit(f"--coupled {args.coupled}: no such file; write one with cifar10_tradeoff.py --save-coupled DIR")
    if not 1 <= args.epochs <= args.of_epochs:
        raise SystemExit(f"--epochs {args.epochs} must be in [1, --of-epochs={args.of_epochs}]")

    pl.seed_everything(args.seed)
    fp = {n: p.detach().clone() for n, p in ImageClassifier(arch="resnet20", init_from=args.pretrained).model.named_parameters()}
    module = TailCosine(args.of_epochs - args.epochs, args.of_epochs, arch="resnet20", lr=args.lr, schedule="cosine",
                        init_from=args.pretrained)
    missing = module.model.load_state_dict(_state(args.coupled), strict=False)
    if missing.missing_keys:
        raise SystemExit(f"--coupled {args.coupled}: not a ResNet-20 state_dict (missing {missing.missing_keys[:3]})")
    edges = {rf"^model\.{m}\.weight$": args.edge_bits for m in EDGE_LAYERS} if args.edge_bits else {}

    # The coupling run's w_l (w times the full-precision std), handed to a snap without a coupling.
    hint = SnapHint(w_l={f"model.{n}": args.w * float(p.float().std()) for n, p in fp.items()})

    def run_snap() -> ClusterRefine:
        return ClusterRefine(snap_epoch=0, w=args.w, snap=SnapConfig(recalibrate_bn_batches=100, max_bits=args.max_bits, max_clusters=args.max_clusters, on_unclustered="snap", max_bits_overrides=edges), refine=RefineConfig(reassign=True)).with_hint(hint)

    if args.moves_only:
        print(f"{Path(args.coupled).name}: share of the snapped weights nearer another centroid after the latent start")
        for latent in ("coupled", "fp", "spread"):
            trial = copy.deepcopy(module)
            refine = run_snap()
            refine.snapper.snap(trial, clusters=refine.snapper.find(trial, w_l=dict(hint.w_l)))
            if latent != "coupled":
                LatentFromFP(refine, fp, spread=latent == "spread").on_train_epoch_start(SimpleNamespace(current_epoch=0), trial)
            print(f"  {latent:8s} {first_step_moves(refine.snapper):.4f}")
        return
    dm = CIFAR10DataModule(archive=args.archive, seed=args.seed)
    dm.setup("fit")
    refine = run_snap()
    snapped = SnapAccuracy(dm.val_dataloader(), refine)
    start = LatentFromFP(refine, fp, spread=args.latent == "spread") if args.latent != "coupled" else None
    callbacks = [refine, *([start] if start else []), snapped]
    pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
               enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks,
               limit_train_batches=args.limit, limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=dm)
    acc = accuracy(module.model, dm.val_dataloader())
    summary = refine.snapper.summary()
    head = ("| coupled weights | latent | seed | epochs | moved at the first step | bits (weighted) | entropy "
            "| acc snapped | acc refined |\n|---|---|---|---|---|---|---|---|---|")
    row = (f"| {Path(args.coupled).name} | {args.latent} | {args.seed} | {args.epochs} of {args.of_epochs} | {snapped.moved:.4f} "
           f"| {summary['bits_weighted']:.3f} | {summary['entropy_weighted']:.3f} | {snapped.acc:.4f} | {acc:.4f} |")
    report = "\n".join([f"## latent {args.latent}, seed {args.seed} ({datetime.date.today().isoformat()})", "",
                        "    python " + " ".join(sys.argv), "", head, row, ""])
    print(report)
    save(Path(args.out), [report])


if __name__ == "__main__":
    main()
