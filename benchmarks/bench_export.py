"""Size and speed of the exported file: bit-packed against entropy-coded (rANS) indices.

``save_compressed(coding="packed")`` stores each index in ``ceil(log2 K_l)`` bits;
``coding="ans"`` codes the indices of each layer with rANS (constriction) under the
layer's cluster populations. This script measures, on real weights, the file sizes
(against the entropy of the populations and against ``xz -9`` of the packed file) and
the write / read times of both codings, alternated in one process:

* ``resnet20 k-means K=2`` / ``K=4``: every conv/linear weight of the committed
  full-precision ResNet-20 checkpoint quantized post-training by optimal 1-D k-means
  (nearly balanced populations: little for an entropy coder to gain);
* ``coupled-like layer``: one layer of ``--n`` weights with 4 values populated
  0.85 / 0.10 / 0.04 / 0.01, the shape soft quantization leaves (one crowded cluster);
* ``--ckpt PATH``: the snapped layers of a Lightning checkpoint written by a run with
  ``ClusterRefine`` (e.g. the quickstart's ``runs/quickstart/version_0/checkpoints/*.ckpt``).

Usage::

    python benchmarks/bench_export.py [--n 10000000] [--rounds 5] [--ckpt PATH]
"""

from __future__ import annotations

import argparse
import lzma
import tempfile
from pathlib import Path

import torch
from torch import nn

import _common as C
from sq_lightning.callbacks import ClusterRefine
from sq_lightning.export import load_compressed, save_compressed
from sq_lightning.models import ImageClassifier
from sq_lightning.ops import entropy_bits
from sq_lightning.ops.baselines import quantize

RESULTS = C.RESULTS_DIR / "export.md"
CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "resnet20_cifar10_fp.ckpt"


def _resnet20(k: int) -> tuple[nn.Module, dict]:
    model = ImageClassifier(arch="resnet20", init_from=str(CHECKPOINT)).model
    clusters = {}
    for name, p in model.named_parameters():
        if p.dim() > 1:
            q = quantize(p.detach(), k, "kmeans")
            with torch.no_grad():
                p.copy_(q.values)
            clusters[name] = (q.centroids, q.assignments)
    return model, clusters


def _coupled_like(n: int) -> tuple[nn.Module, dict]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(n // 1000, 1000, bias=False)
    centroids = torch.tensor([0.0, -0.05, 0.05, 0.12])
    assignments = torch.multinomial(torch.tensor([0.85, 0.10, 0.04, 0.01]), n, replacement=True, generator=gen)
    assignments = assignments.reshape(model.weight.shape)
    with torch.no_grad():
        model.weight.copy_(centroids[assignments])
    return model, {"weight": (centroids, assignments)}


def _from_checkpoint(path: str) -> tuple[nn.Module, dict]:
    """The checkpoint's ImageClassifier and the clusters its ClusterRefine state holds."""
    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]["ClusterRefine"]
    refine = ClusterRefine()
    refine.load_state_dict(state)
    return model, refine.clusters()


def measure(label: str, model: nn.Module, clusters: dict, rounds: int, tmp: Path) -> list[str]:
    paths = {c: tmp / f"{c}.safetensors" for c in ("packed", "ans")}
    reports = {}

    def writer(coding):
        def write():
            reports[coding] = save_compressed(model, paths[coding], clusters, coding=coding, overwrite=True)
        return write

    def reader(coding):
        return lambda: load_compressed(paths[coding])

    times = C.alternate({"write packed": writer("packed"), "write ans": writer("ans"),
                         "read packed": reader("packed"), "read ans": reader("ans")}, rounds)
    # Both files hold the same model.
    a, b = load_compressed(paths["packed"]), load_compressed(paths["ans"])
    assert all(torch.equal(a[k], b[k]) for k in a), f"{label}: the two codings read back differently"
    n = sum(a[name].numel() for name in clusters)
    entropy_bytes = sum(a[name].numel() * entropy_bits(torch.bincount(cl[1].reshape(-1).long())) / 8
                        for name, cl in clusters.items())
    idx = {c: sum(layer.index_bytes for layer in reports[c].layers.values()) for c in reports}
    xz = len(lzma.compress(paths["packed"].read_bytes(), preset=9))
    w = C.ratios(times["write ans"], times["write packed"])
    r = C.ratios(times["read ans"], times["read packed"])
    return [
        f"| {label} | {n:,} | {8 * entropy_bytes / n:.3f} | {reports['packed'].file_bytes:,} | {reports['ans'].file_bytes:,} | "
        f"{xz:,} | {idx['packed']:,} | {idx['ans']:,} | {entropy_bytes:,.0f} | "
        f"{1e3 * C.median(times['write packed']):.1f} / {1e3 * C.median(times['write ans']):.1f} | {C.median(w):.2f} {C.spread(w, '{:.2f}')} | "
        f"{1e3 * C.median(times['read packed']):.1f} / {1e3 * C.median(times['read ans']):.1f} | {C.median(r):.2f} {C.spread(r, '{:.2f}')} |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="weights of the coupled-like layer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ckpt", default=None, help="a Lightning checkpoint with ClusterRefine state")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load = C.uptime()
    cases = [("resnet20 k-means K=2", lambda: _resnet20(2)), ("resnet20 k-means K=4", lambda: _resnet20(4)),
             (f"coupled-like layer, {args.n:,} weights", lambda: _coupled_like(args.n))]
    if args.ckpt:
        cases.append((f"checkpoint `{Path(args.ckpt).name}`", lambda: _from_checkpoint(args.ckpt)))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, make in cases:
            model, clusters = make()
            rows += measure(label, model, clusters, args.rounds, Path(d))
            C.free_memory()
    lines = C.header(
        "Exported file: bit-packed vs entropy-coded (rANS) indices",
        [
            f"{args.rounds} rounds, the four operations alternated; times are medians (ms), ratios ans / packed per round "
            "[p25, p75]. 'entropy' is the weight-weighted entropy of the cluster populations (bits per weight); "
            "'xz' is `lzma.compress(packed file, preset=9)`; index bytes exclude codebooks and header.",
            "",
            "| model | quantized weights | entropy | packed file | ans file | xz of packed | packed indices | ans indices | "
            "entropy bound | write ms packed / ans | write ans / packed | read ms packed / ans | read ans / packed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ],
        load,
    )
    print("\n".join(lines))
    C.save(RESULTS, lines, not args.no_save)


if __name__ == "__main__":
    main()
