"""Where does a low-bit snap cut the coupled weights? Margins to the decision boundaries.

    python experiments/snap_margins.py --pretrained experiments/checkpoints/resnet20_cifar10_fp.ckpt \\
        --coupled /tmp/coupled/softquant-0.001-0.9-seed1.pt --w 0.9 --max-bits 1 --edge-bits 4

At 1 bit, soft quantization of ResNet-20 reaches ~81% coupled but ~32% right after the
snap, and refinement (even with moving assignments) recovers less than the same budget
gives histogram-equalized (HEQ) full-precision weights (``cifar10_tradeoff.md``). This
script measures, layer by layer, how the snap partitions two sets of weights at the same
``K_l``:

* the coupled weights (written by ``cifar10_tradeoff.py --save-coupled``) partitioned as
  ``ClusterRefine`` does in that run (its own snapper, same ``w``, budget and edges);
* the full-precision weights partitioned by HEQ at those ``K_l`` (the control's start).

Per layer: the clusters the coupling formed (``K`` without a budget), the share of
weights in a formed cluster that the budget splits between two values (``split``), the
share within 5% / 10% of a level spacing of a decision boundary (the midpoint of two
adjacent values: the weights that a moving assignment flips first), the relative snap
error, and the share of weights whose level index is the one HEQ gives the same weight in
full precision (``agree``: 1 where both partitions put every weight on the same side).
Totals are weighted by layer size over the layers held to ``--max-bits``. Appends a
markdown report with the command to ``experiments/results/snap_margins.md``.

``w_l = w · σ_l`` is taken from the full-precision weights: the coupling freezes ``σ_l``
at its first step, i.e. from these same weights.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from torch import Tensor

from sq_lightning.config import SnapConfig
from sq_lightning.callbacks import ClusterRefine
from sq_lightning.ops.baselines import quantize
from sq_lightning.ops.clustering import Clusters, tie_to_clusters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import save  # noqa: E402
from cifar10_tradeoff import EDGE_LAYERS  # noqa: E402  (the run's own edge layers)

RESULTS = Path(__file__).resolve().parent / "results"


def boundary_margins(theta: Tensor, centroids: Tensor) -> Tensor:
    """Each weight's distance to its nearest decision boundary (the midpoint of two
    adjacent values of ``centroids``), in units of the spacing of those two values.

    0: on a boundary; 0.5: on a value between two boundaries; beyond the outer values the
    margin keeps growing. ``inf`` for a single value (no boundary)."""
    c = torch.sort(centroids.double().flatten()).values
    t = theta.double().flatten()
    if c.numel() < 2:
        return torch.full_like(t, float("inf"))
    mids, gaps = (c[1:] + c[:-1]) / 2, c[1:] - c[:-1]
    dist = (t[:, None] - mids[None, :]).abs() / gaps[None, :]
    return dist.min(dim=1).values


def split_share(formed: Clusters, budget: Clusters) -> float:
    """Share of the weights that sit in a formed cluster whose members the budget partition
    gives more than one value."""
    a, b = formed.assignments.flatten(), budget.assignments.flatten()
    k = budget.k
    pairs = torch.unique(a * k + b)  # (formed, budget) index pairs that occur
    values_per_formed = torch.bincount(torch.div(pairs, k, rounding_mode="floor"), minlength=formed.k)
    split = values_per_formed[a] > 1
    return float(split.double().mean())


def level_agreement(x: Clusters, y: Clusters) -> float:
    """Share of weights with the same level index (values in ascending order) in both."""
    return float((x.assignments.flatten() == y.assignments.flatten()).double().mean())


def zero_cluster(formed: Clusters) -> Tensor:
    """Mask of the weights in the formed cluster whose value is nearest 0."""
    return formed.assignments.flatten() == int(torch.argmin(formed.centroids.abs()))


def correlation(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equal-length vectors (``nan`` under 3 entries or no spread)."""
    if x.numel() < 3:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x.flatten().double(), y.flatten().double()]))[0, 1])


def split_by_sign(cl: Clusters, members: Tensor, reference: Tensor, theta: Tensor) -> Clusters:
    """Two-value ``cl`` with its ``members`` moved to the value on the side of their
    ``reference`` sign (upper for > 0) and both values the means of their members in ``theta``."""
    a = cl.assignments.flatten().clone()
    a[members] = (reference.flatten()[members] > 0).long()
    counts = torch.bincount(a, minlength=2)
    c = torch.where(counts > 0, tie_to_clusters(theta, a, 2, counts), cl.centroids.float())  # an empty side keeps its value
    return Clusters(c, a.reshape(cl.assignments.shape), counts)


def _evaluate(args, fp_model, coupled_model, snapped, heqs, found, budgeted) -> list[str]:
    """Test accuracy right after three snaps at the same ``K_l`` (BatchNorm re-estimated)."""
    import copy

    import lightning.pytorch as pl

    from sq_lightning.data import CIFAR10DataModule
    from sq_lightning.evaluate import accuracy
    from sq_lightning.models.batchnorm import recalibrate_batchnorm

    pl.seed_everything(0)
    dm = CIFAR10DataModule(archive=args.archive, batch_size=128, seed=0)
    dm.setup("fit")
    fp = dict(fp_model.named_parameters())
    coupled = dict(coupled_model.named_parameters())
    split = {n: split_by_sign(cl, zero_cluster(found[n]), fp[n].detach(), coupled[n]) if n in budgeted and cl.k == 2 else cl
             for n, cl in snapped.items()}

    def snapped_accuracy(model, clusters) -> float:
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for n, cl in clusters.items():
                params[n].copy_(cl.values(params[n].dtype).reshape(params[n].shape))
        recalibrate_batchnorm(m, dm.train_dataloader(), 100)
        return accuracy(m, dm.val_dataloader())

    return [
        "| snap (same K_l, BatchNorm re-estimated) | test accuracy |", "|---|---|",
        f"| coupled weights, no snap | {accuracy(coupled_model, dm.val_dataloader()):.4f} |",
        f"| coupled weights, the run's snap | {snapped_accuracy(coupled_model, snapped):.4f} |",
        f"| coupled weights, the cluster nearest 0 split by the full-precision sign (2-value layers) "
        f"| {snapped_accuracy(coupled_model, split):.4f} |",
        f"| full-precision weights, HEQ | {snapped_accuracy(fp_model, heqs):.4f} |",
    ]


def _state(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:  # a Lightning checkpoint of ImageClassifier
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    return state


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The checkpoints and the snap arguments of the run that wrote ``--coupled``."""
    ap.add_argument("--pretrained", required=True, help="full-precision ImageClassifier checkpoint")
    ap.add_argument("--coupled", required=True, help="coupled weights from cifar10_tradeoff.py --save-coupled")
    ap.add_argument("--w", type=float, required=True, help="the run's w (w_l = w · σ_l)")
    ap.add_argument("--max-bits", type=int, default=None, help="the run's --max-bits")
    ap.add_argument("--max-clusters", type=int, default=None, help="the run's --max-clusters")
    ap.add_argument("--edge-bits", type=int, default=None, help="the run's --edge-bits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--placement", choices=["mean", "kmeans", "heq"], default="mean", help="the run's --placement")
    ap.add_argument("--evaluate", action="store_true",
                    help="also the CIFAR-10 test accuracy right after each snap (BatchNorm re-estimated on 100 batches)")
    ap.add_argument("--archive", default=None, help="CIFAR-10 archive for --evaluate (default: the offline copy)")
    ap.add_argument("--out", default=str(RESULTS / "snap_margins.md"))
    args = ap.parse_args()
    if not Path(args.coupled).is_file():
        raise SystemExit(f"--coupled {args.coupled}: no such file; write one with cifar10_tradeoff.py --save-coupled DIR")

    from sq_lightning.models import ImageClassifier

    fp_model = ImageClassifier(arch="resnet20", init_from=args.pretrained).model
    coupled_model = ImageClassifier(arch="resnet20", init_from=args.pretrained).model
    missing = coupled_model.load_state_dict(_state(args.coupled), strict=False)
    if missing.missing_keys:
        raise SystemExit(f"--coupled {args.coupled}: not a ResNet-20 state_dict (missing {missing.missing_keys[:3]})")
    edges = {rf"^{m}\.weight$": args.edge_bits for m in EDGE_LAYERS} if args.edge_bits else {}
    budget = ClusterRefine(w=args.w, snap=SnapConfig(placement=args.placement, max_bits=args.max_bits, max_clusters=args.max_clusters, on_unclustered="snap", max_bits_overrides=edges)).snapper
    formed = ClusterRefine(w=args.w, snap=SnapConfig(on_unclustered="snap")).snapper
    fp = dict(fp_model.named_parameters())
    w_l = {n: args.w * float(p.detach().float().std()) for n, p in fp.items()}
    snapped = budget.find(coupled_model, w_l=w_l)
    found = formed.find(coupled_model, w_l=w_l)
    coupled = dict(coupled_model.named_parameters())
    budgeted = {n for n in snapped if (args.max_bits is not None or args.max_clusters is not None)
                and n not in {f"{m}.weight" for m in EDGE_LAYERS}}

    cols = ("split", "zero", "zcorr", "near5c", "near5f", "near10c", "near10f", "errc", "errf", "agree")
    head = ("| layer | N | K formed | K | split | zero share | zero corr | near 5% coupled | near 5% FP-HEQ | near 10% coupled "
            "| near 10% FP-HEQ | snap err coupled | snap err FP-HEQ | agree |")
    lines, totals, heqs = [head, "|" + "---|" * 14], {}, {}
    for name, cl in snapped.items():
        theta_c, theta_f = coupled[name].detach(), fp[name].detach()
        heq = heqs[name] = Clusters.from_quantization(quantize(theta_f, cl.k, "heq"))
        mc, mf = boundary_margins(theta_c, cl.centroids), boundary_margins(theta_f, heq.centroids)
        zero = zero_cluster(found[name])
        row = {
            "split": split_share(found[name], cl),
            "zero": float(zero.double().mean()), "zcorr": correlation(theta_f.flatten()[zero], theta_c.flatten()[zero]),
            "near5c": float((mc < 0.05).double().mean()), "near5f": float((mf < 0.05).double().mean()),
            "near10c": float((mc < 0.10).double().mean()), "near10f": float((mf < 0.10).double().mean()),
            "errc": cl.snap_error(theta_c), "errf": heq.snap_error(theta_f),
            "agree": level_agreement(cl, heq) if heq.k == cl.k else float("nan"),
        }
        n = theta_c.numel()
        if name in budgeted:
            for key, v in row.items():
                totals[key] = totals.get(key, 0.0) + v * n
            totals["n"] = totals.get("n", 0) + n
        lines.append(f"| {name} | {n} | {found[name].k} | {cl.k} | " + " | ".join(f"{row[k]:.3f}" for k in cols) + " |")
    if totals:
        n = totals.pop("n")
        avg = {k: v / n for k, v in totals.items()}
        lines.append(f"| **all budgeted ({n} weights)** | | | | " + " | ".join(f"**{avg[k]:.3f}**" for k in cols) + " |")
    if args.evaluate:
        lines += ["", *_evaluate(args, fp_model, coupled_model, snapped, heqs, found, budgeted)]
    report = "\n".join([
        f"## {Path(args.coupled).name} ({datetime.date.today().isoformat()})", "",
        "    python " + " ".join(sys.argv), "",
        *lines, "",
    ])
    print(report)
    save(Path(args.out), [report])


if __name__ == "__main__":
    main()
