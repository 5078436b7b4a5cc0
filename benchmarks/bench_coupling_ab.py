"""A/B of ``sq_lightning/ops/coupling.py`` against the version of a git revision.

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219): this checks a
change to the coupling ops before it is committed. The file at ``--ref`` (default
``HEAD``) is loaded as a separate module beside the working-tree one; both must give
the same gradients and losses (max abs difference printed), and their times are
compared alternately in one process (median of per-round ratios new / ref, 25-75 %
spread): ResNet-20's 20 layers through ``WeightCoupler`` (auto, histogram, exact),
and one layer of N weights for ``coupling_histogram`` and ``coupling_exact``.

Usage::

    python benchmarks/bench_coupling_ab.py [--ref HEAD] [--threads 1] [--save]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import _common as C
from sq_lightning import coupler as coupler_mod
from sq_lightning.coupler import WeightCoupler
from sq_lightning.models import resnet20

NEW = importlib.import_module("sq_lightning.ops.coupling")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = C.RESULTS_DIR / "coupling_ab.md"


def load_ref(ref: str):
    src = subprocess.run(
        ["git", "show", f"{ref}:sq_lightning/ops/coupling.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "coupling_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("coupling_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coupling_ref"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="git revision of the baseline coupling.py")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 4096, 36864, 1e5, 1e6, 1e7])
    parser.add_argument("--save", action="store_true", help=f"append the table to {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = C.uptime()
    ref = load_ref(args.ref)

    torch.manual_seed(0)
    model = resnet20()
    params = {n: p.detach() for n, p in model.named_parameters() if p.dim() > 1}
    rows = [
        f"Baseline: `coupling.py` at `{args.ref}`; new: the working tree. new / ref < 1 means faster.",
        "",
        "| case | max abs grad diff | ref (ms) | new (ms) | new / ref [p25, p75] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def line(name, f_ref, f_new, diff, rounds):
        res = C.alternate({"ref": f_ref, "new": f_new}, rounds=rounds)
        rr = C.ratios(res["new"], res["ref"])
        rows.append(
            f"| {name} | {diff:.3g} | {1e3 * C.median(res['ref']):.4g} | {1e3 * C.median(res['new']):.4g} | "
            f"{C.median(rr):.3f} {C.spread(rr, '{:.3f}')} |"
        )
        print(rows[-1], flush=True)

    for backend, with_loss in (("auto", False), ("histogram", False), ("exact", False), ("auto", True)):
        cpl = WeightCoupler(h=1e-3, w=0.3, backend=backend)
        cpl.prepare(model)

        def run(mod, cpl=cpl, with_loss=with_loss):
            saved = coupler_mod.coupling_exact, coupler_mod.coupling_grad_batched
            coupler_mod.coupling_exact, coupler_mod.coupling_grad_batched = mod.coupling_exact, mod.coupling_grad_batched
            try:
                return cpl.gradients(params, compute_loss=with_loss)
            finally:
                coupler_mod.coupling_exact, coupler_mod.coupling_grad_batched = saved

        (la, ga), (lb, gb) = run(ref), run(NEW)
        diff = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
        if with_loss:
            diff = max(diff, max(abs(float(la[k]) - float(lb[k])) for k in la))
        what = "grad + loss" if with_loss else "grad only"
        line(f"ResNet-20 WeightCoupler {backend} ({what})", lambda: run(ref), lambda: run(NEW), diff, args.rounds)

    gen = torch.Generator().manual_seed(0)
    for n in (int(s) for s in args.sizes):
        x = torch.randn(n, generator=gen)
        rounds = max(3, args.rounds if n <= 10**5 else args.rounds // 3)
        for name in ("coupling_histogram", "coupling_exact"):
            if name == "coupling_exact" and n > 10**6:
                continue
            fa, fb = getattr(ref, name), getattr(NEW, name)
            a, b = fa(x, 0.3, 1.0), fb(x, 0.3, 1.0)
            diff = max(float((a.grad - b.grad).abs().max()), abs(float(a.loss) - float(b.loss)))
            line(f"{name} N={n} (grad only)", lambda fa=fa: fa(x, 0.3, 1e-3, compute_loss=False),
                 lambda fb=fb: fb(x, 0.3, 1e-3, compute_loss=False), diff, rounds)
        del x
        C.free_memory()
    C.save(RESULTS, C.header(f"coupling.py A/B against {args.ref}", [], load_start) + rows, args.save)


if __name__ == "__main__":
    main()
