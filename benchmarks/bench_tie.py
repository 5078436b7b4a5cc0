"""Cost of ClusterRefine's per-step tie on ResNet-20, against a training step.

During refinement ``ClusterRefine`` calls ``ClusterSnapper.tie`` after every optimizer
step: each snapped weight is set to the mean of its cluster's members. This script
snaps every conv/linear weight of ResNet-20 (``sq_lightning.models.resnet20``) to
``--k`` values (optimal 1-D k-means) and times, alternately in one process:

* ``tie``: ``ClusterSnapper.tie`` as shipped (cluster sizes stored with the clusters,
  the clusters kept on the weights' device);
* ``tie, sizes counted each call``: the same arithmetic with a ``bincount`` of the
  assignments on every call (what ``tie`` did before; on CUDA ``bincount`` waits for
  the device to size its output, a host sync per layer per step);
* ``tie, gradual snap``: ``ClusterRefine(refine=RefineConfig(ramp_steps=...))`` during its ramp (each
  weight moved part of the way to its cluster's mean: a ``lerp`` where the exact tie copies);
* ``train step``: forward, backward and an SGD step (momentum 0.9) at batch ``--batch``.

Usage::

    python benchmarks/bench_tie.py [--device cpu|cuda] [--k 4] [--batch 128] [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import _common as C
from sq_lightning.config import RefineConfig, SnapConfig
from sq_lightning.models import resnet20
from sq_lightning.ops.clustering import tie_to_clusters
from sq_lightning.snapper import ClusterSnapper

RESULTS = C.RESULTS_DIR / "tie.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load = C.uptime()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet20().to(dev)
    moving_model = copy.deepcopy(model)
    bits = max(1, (args.k - 1).bit_length())
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0, max_bits=bits, on_unclustered="snap"))
    snapper.snap(model)
    moving = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0, max_bits=bits, on_unclustered="snap"), refine=RefineConfig(reassign=True))
    moving.snap(moving_model)
    ramp_model = copy.deepcopy(model)  # a ramp that never ends: every call is a partial pull
    ramp = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0, max_bits=bits, on_unclustered="snap"), refine=RefineConfig(ramp_steps=10**9))
    ramp.snap(ramp_model)
    params = dict(model.named_parameters())
    n_weights = sum(params[n].numel() for n in snapper.clusters)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def tie() -> None:
        snapper.tie(model)
        sync()

    def tie_reassign() -> None:
        moving.tie(moving_model)
        sync()

    def tie_ramp() -> None:
        ramp.tie(ramp_model)
        sync()

    @torch.no_grad()
    def tie_counting() -> None:
        for name, cl in snapper.clusters.items():
            p = params[name]
            means = tie_to_clusters(p, cl.assignments, cl.k)  # counts=None: bincount every call
            p.copy_(means[cl.assignments].to(p.dtype).reshape(p.shape))
        sync()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    times = C.alternate({"tie": tie, "tie, sizes counted each call": tie_counting,
                             "tie, reassign=True": tie_reassign, "tie, gradual snap": tie_ramp, "train step": step}, args.rounds)
    base = times["train step"]
    lines = C.header(
        "ClusterRefine tie per step, ResNet-20",
        [
            f"Device {dev}; {len(snapper.clusters)} layers, {n_weights:,} weights snapped to K <= {args.k}; batch {args.batch}; "
            f"{args.rounds} rounds, candidates alternated. Ratios are per round against the training step of the same round.",
            "",
            "| what | median per call (ms) [p25, p75] | / train step: median [p25, p75] |",
            "| --- | ---: | ---: |",
        ],
        load,
    )
    for name, ts in times.items():
        r = C.ratios(ts, base)
        lines.append(f"| {name} | {1e3 * C.median(ts):.3f} {C.spread([1e3 * t for t in ts])} | "
                     f"{C.median(r):.4f} {C.spread(r, '{:.4f}')} |")
    print("\n".join(lines))
    C.save(RESULTS, lines, not args.no_save)


if __name__ == "__main__":
    main()
