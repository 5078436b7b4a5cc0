"""ResNet-20 / CIFAR-10: accuracy vs average bits, soft quantization against HEQ.

    python experiments/cifar10_tradeoff.py --pretrained experiments/checkpoints/resnet20_cifar10_fp.ckpt \\
        --points 1e-3:0.3 1e-3:0.45 --codebook-bits 2 --dkm-bits 2 4 --couple-epochs 2 --refine-epochs 1

For each ``h:w`` point, starting from the full-precision checkpoint:

1. soft quantization (``SoftQuantCallback``) for ``--couple-epochs`` at a constant lr
   (``--couple-from E``: the first ``E`` of them in full precision, the coupling after);
2. snap + BatchNorm recalibration + refinement (``ClusterRefine``) for ``--refine-epochs``
   (assignments fixed; with ``--reassign``, latent weights that may change cluster; with
   ``--snap-ramp-steps N``, the snap spread over the first ``N`` refinement steps);
3. post-training baselines of the full-precision model at the same per-layer ``K_l``:
   HEQ, optimal 1-D k-means and uniform, each without and with BatchNorm recalibration.

The other training-time methods, same start, same lr and the same number of epochs:

* ``--codebook-bits B``: method B (``LearnedCodebook``, learned representatives,
  ``K = 2^B`` per layer) for ``--couple-epochs``, then snap to the representatives
  and refine (``ClusterRefine(clusters_from="codebook")``) for ``--refine-epochs``;
  ``--codebook-k K`` the same with ``K`` representatives (3: ternary layers, 1.58 bits);
* ``--dkm-bits B``: coremltools' training-time palettization (DKM,
  ``coremltools.optimize.torch.palettization.DKMPalettizer``, ``n_bits=B`` on every
  conv/linear weight) for all ``couple + refine`` epochs, then ``finalize()``.
  Needs ``pip install coremltools``.

With ``--distill WEIGHT`` every training-time run (and the full-precision control) is also
distilled from the full-precision checkpoint (``ImageClassifier(distill_from=...)``,
loss ``(1 - WEIGHT) CE + WEIGHT T^2 KL``); such rows are labelled and compared among themselves.
With ``--edge-bits B`` method B and DKM give the first convolution and the classifier
(``conv1``, ``fc``: 1,072 of ResNet-20's 270k weights) ``2^B`` values instead of
``2^n_bits``, the usual exception of low-bit work; soft quantization caps them at ``2^B``
values instead of ``2^max_bits`` (``ClusterRefine(snap=SnapConfig(max_bits_overrides=...))``: they keep the
clusters they found up to that); the row's bits count them as such.

Every row records the median training-step time (forward, backward, optimizer step
and the method's own work) measured inside its own run, and the size of the trained
model exported by ``save_compressed`` with bit-packed and with entropy-coded (rANS)
indices, each file read back and checked bit-exact against the trained weights.

Resumable: every run writes its last epoch's checkpoint (model, optimizer, lr schedule and
the callbacks' state) under ``--resume-dir`` and a killed run continues from there; every
finished point is appended as one JSON line to
``experiments/results/cifar10_tradeoff.jsonl`` and skipped on the next run (a run is
finished when a line of the same seed stored the same configuration: the method and every
option it ran with, ``_fields``; a control takes its ``K_l`` from the seed-0 soft quantization
line of its own options); the markdown table ``cifar10_tradeoff.md`` and the plot ``cifar10_tradeoff.png`` are
rebuilt from all lines after each point; the markdown opens with the best configuration of
each method (mean over its seeds) under 1, 1.6, 2 and 4 weighted bits. Data: the offline archive (see
``CIFAR10DataModule``) or torchvision's download with ``--download``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from sq_lightning.config import RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine, LearnedCodebook, SoftQuantCallback
from sq_lightning.data import CIFAR10DataModule
from sq_lightning.evaluate import METHODS, accuracy, evaluate_baselines
from sq_lightning.export import CODINGS, FORMAT_VERSION, entropy_coder, load_compressed, save_compressed
from sq_lightning.models import ImageClassifier
from sq_lightning.ops import entropy_bits

RESULTS = Path(__file__).resolve().parent / "results"


def _device() -> torch.device:
    """Where the evaluations run: the GPU when there is one (training goes there by itself)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fit(module, dm, epochs: int, callbacks: list, limit: float | int, run_dir: Path | None) -> int:
    """Train ``module`` for ``epochs``; returns the epoch it started from.

    With ``run_dir`` the trainer writes ``last.ckpt`` there after every epoch (model,
    optimizer, lr schedule and every callback's state: the coupling ramp, the snapped
    clusters, the step times) and a run killed part-way resumes from it instead of
    starting over.
    """
    # One file, overwritten every epoch (Lightning writes it through a temporary file).
    ckpt = [ModelCheckpoint(dirpath=run_dir, filename="last", enable_version_counter=False)] if run_dir else []
    last = run_dir / "last.ckpt" if run_dir else None
    resume = last if last is not None and last.exists() else None
    clock = EpochClock()
    pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=bool(ckpt),
        enable_model_summary=False, enable_progress_bar=False, callbacks=[*callbacks, clock, *ckpt],
        limit_train_batches=limit, limit_val_batches=0, num_sanity_val_steps=0,
    ).fit(module, datamodule=dm, ckpt_path=resume)
    return clock.start


class EpochClock(Callback):
    """Prints each epoch's wall time: the progress of a long run, read from its log; ``start``
    is the epoch training began at (after a resume, the first one not in the checkpoint)."""

    start = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.current_epoch  # the checkpoint, if any, is restored by now
        if self.start:
            print(f"resumed from {trainer.ckpt_path} ({self.start} of {trainer.max_epochs} epochs done)", flush=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {time.perf_counter() - self._t:.1f} s",
              flush=True)


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end: forward, backward,
    the callbacks' gradient work and the optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0
        self._fit_start = time.perf_counter()
        self.seconds_before = 0.0  # wall time of the fit before a resume

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def state_dict(self) -> dict:
        return {"times": self.times, "seconds": self.seconds_before + time.perf_counter() - self._fit_start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.times, self.seconds_before = list(state_dict["times"]), float(state_dict["seconds"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)

    def median_ms(self) -> float:
        return 1e3 * float(torch.tensor(self.times).median()) if self.times else float("nan")


class DKMPalettize(Callback):
    """coremltools' DKM palettization of ``pl_module.model`` for the whole fit.

    The model is prepared in ``setup`` (before ``configure_optimizers`` builds the
    optimizer over its parameters), ``DKMPalettizer.step`` runs after every batch and
    ``finalize`` leaves plain modules with ``2^n_bits`` distinct values per weight.
    """

    def __init__(self, n_bits: int, module_bits: dict[str, int] | None = None) -> None:
        from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

        self.n_bits = n_bits
        self._cls = DKMPalettizer
        # Every conv/linear weight (threshold 0), clustering from the first step; the modules
        # named in module_bits with their own bits.
        common = {"weight_threshold": 0, "milestone": 0}
        self._cfg = DKMPalettizerConfig.from_dict({
            "global_config": {"n_bits": n_bits, **common},
            "module_name_configs": {m: {"n_bits": b, **common} for m, b in (module_bits or {}).items()},
        })
        self.palettizer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.palettizer is None:
            self.palettizer = self._cls(pl_module.model, self._cfg)
            pl_module.model = self.palettizer.prepare()

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run: coremltools' state dict restores each palettized layer's partitions and
        # centroids but not the per-partition lists create_partitions() makes with them; rebuilt
        # here as it builds them (the first forward of a fresh run does this itself).
        for m in pl_module.model.modules():
            parts = getattr(m, "partitions", None)
            if parts and len(getattr(m, "enable_partition", ())) != len(parts):
                n = len(parts)
                enabled = max(1, int(m.percentage_palett_enable * n))
                m.enable_partition = [True] * enabled + [False] * (n - enabled)
                m.enforce_zero = m.enforce_zero[:1] * n
                m.cum_inertia = [1e9] * n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.palettizer.step()

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.model = self.palettizer.finalize(inplace=False)


class PhaseAccuracy(Callback):
    """Test accuracy at the start of epoch ``epoch``, stored in ``self.acc``.

    Placed before ``ClusterRefine`` in the callback list it measures the coupled model
    (before the snap); placed after it, the snapped and BatchNorm-recalibrated model
    before any refinement step.
    """

    def __init__(self, epoch: int, loader, name: str) -> None:
        self.epoch, self.loader, self.name, self.acc = epoch, loader, name, None

    @property
    def state_key(self) -> str:  # two of them in one trainer: each its own entry in a checkpoint
        return self._generate_state_key(name=self.name)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and self.acc is None:
            self.acc = accuracy(pl_module.model, self.loader)

    def state_dict(self) -> dict:
        return {"acc": self.acc}

    def load_state_dict(self, state_dict: dict) -> None:
        self.acc = state_dict["acc"]


class SaveWeights(Callback):
    """Writes the model's weights (``state_dict``) to ``path`` at the start of ``epoch``:
    placed before ``ClusterRefine``, the coupled weights the snap is about to see. A run
    resumed after that epoch writes nothing (the coupled weights are gone)."""

    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                print(f"--save-coupled: replacing {self.path}", flush=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}, tmp)
            os.replace(tmp, self.path)  # never a half-written file under the final name


def _saver(args, method: str, spec) -> list[Callback]:
    """``[SaveWeights]`` at the snap epoch with ``--save-coupled DIR``, else ``[]``."""
    if not args.save_coupled:
        return []
    # The run's hash in the name: two configurations of the same point never write one file.
    tag = "-".join(f"{v:g}" for v in spec) if isinstance(spec, tuple) else str(spec)
    name = f"{method}-{tag}-seed{args.seed}-{_run_hash(args, method, spec)[:8]}.pt"
    return [SaveWeights(args.couple_epochs, Path(args.save_coupled) / name)]


def _phases(dm, epoch: int, refine: Callback) -> tuple[list[Callback], PhaseAccuracy, PhaseAccuracy]:
    """``[before, refine, after]``: accuracy of the coupled model and of the snapped one."""
    before, after = PhaseAccuracy(epoch, dm.val_dataloader(), "coupled"), PhaseAccuracy(epoch, dm.val_dataloader(), "snapped")
    return [before, refine, after], before, after


def _export_sizes(model: torch.nn.Module, clusters: dict) -> dict:
    """Bytes of ``model`` exported with each index coding (``clusters``: its quantized layers'
    distinct values and the index of each weight); each file is read back and compared."""
    params = dict(model.named_parameters())
    names = list(clusters)
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for coding in CODINGS:
            path = os.path.join(d, f"{coding}.safetensors")
            report = save_compressed(model, path, clusters, coding=coding)
            state = load_compressed(path)
            for n in names:
                if not torch.equal(state[n], params[n].detach().cpu()):
                    raise RuntimeError(f"the {coding} export of {n} does not read back bit-exact")
            sizes[coding] = report.file_bytes
            sizes[f"{coding}_header"] = report.file_bytes - report.payload_bytes
        sizes["fp32"] = report.fp32_bytes
        sizes["format"] = FORMAT_VERSION
    return sizes


def _row(args, fields: dict, module, dm, ks: dict, timer: StepTimer, t0: float, start: int = 0, **extra) -> dict:
    """``fields`` (what the run ran, ``_fields``) with what it measured: accuracy, bits, the
    post-training baselines at the same K_l and the run's facts. ``extra`` holds measurements only,
    so the configuration a row stores is exactly the one the resume lookups compare."""
    if set(extra) - _OUTCOME:
        raise ValueError(f"_row: {sorted(set(extra) - _OUTCOME)} describe the run, not its outcome: put them in _fields")
    val = dm.val_dataloader()
    acc = accuracy(module.model.to(_device()), val)
    fp = ImageClassifier(arch="resnet20", init_from=args.pretrained).model.to(_device())
    params = dict(fp.named_parameters())
    # The baselines quantize the layers in ks; a run that quantized nothing needs only the reference.
    rows = evaluate_baselines(fp, ks, val, dm.train_dataloader(), methods=() if not ks else METHODS,
                              recalibrate_batches=100)
    # Distinct values per quantized layer of the trained model, counted, not assumed.
    trained = dict(module.model.named_parameters())
    uniques = {n: trained[n].detach().cpu().unique(return_inverse=True, return_counts=True) for n in ks}
    value_counts = {n: u[2] for n, u in uniques.items()}
    distinct = {n: int(c.numel()) for n, c in value_counts.items()}
    if "bits_weighted" not in extra and ks:  # from the counted values (soft quantization passes its own summary)
        bits = {n: math.log2(k) if k > 1 else 0.0 for n, k in distinct.items()}
        extra["bits_weighted"] = sum(bits[n] * params[n].numel() for n in ks) / sum(params[n].numel() for n in ks)
        extra["bits_mean"] = sum(bits.values()) / len(bits)
    if "entropy_weighted" not in extra and ks:  # Shannon entropy of each layer's value counts (entropy-coded bits)
        ent = {n: entropy_bits(value_counts[n]) for n in ks}
        extra["entropy_weighted"] = sum(ent[n] * params[n].numel() for n in ks) / sum(params[n].numel() for n in ks)
    return {
        **fields, **extra,
        "distinct_per_layer": distinct,
        "file_bytes": _export_sizes(module.model, {n: (u[0], u[1]) for n, u in uniques.items()}) if ks else None,
        "acc": acc, "baselines": rows, "seed": args.seed, "seconds": timer.seconds_before + time.time() - t0,
        "step_ms_median": timer.median_ms(), "threads": torch.get_num_threads(),
        **({"resumed_at_epoch": start} if start else {}),
        "date": str(datetime.date.today()), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "command": args.command,
    }


def _fields(args, method: str, spec=None) -> dict:
    """What the row of one run stores about what it ran: every field ``_config_key`` compares. ``spec``
    is (h, w) for soft quantization and the controls ("refined-<quantizer>"), the bits (an int) or
    "k<K>" for method B ("codebook"), the bits for DKM, None for "fp-finetuned". Both the runs (their
    rows) and the lookups of ``main`` (is this run done? which row is a control's source?) build it
    here, so an option a run stores is always one the lookups tell apart."""
    out = {"method": method, **_options(args), "couple_epochs": args.couple_epochs, "refine_epochs": args.refine_epochs,
           "lr": args.lr, "schedule": args.schedule, "limit_train_batches": args.limit, "device": _device_name()}
    restart = {"restart_at_snap": True} if args.restart_at_snap else {}
    reassign = {"reassign": True} if args.reassign else {}
    latent = {"reassign_from": args.reassign_from} if args.reassign_from != "snap" else {}
    if method == "softquant":
        h, w = spec
        return {**out, "h": h, "w": w, "target_step": args.target_step, "placement": args.placement, "alpha": args.alpha,
                **_ramp(args)}
    if method == "codebook":
        if isinstance(spec, str):  # "k<K>": K representatives a layer
            return {**out, "n_bits": round(math.log2(int(spec[1:])), 2), "k": int(spec[1:]), "lam": args.codebook_lam,
                    **restart, **reassign, **latent}
        return {**out, "n_bits": spec, "lam": args.codebook_lam, **restart, **reassign, **latent}
    if method.startswith("refined-"):  # the source row's options, prefixed, and the refinement's own
        h, w = spec
        snap_ramp = {"snap_ramp_steps": args.snap_ramp_steps, "snap_ramp_from": args.snap_ramp_from} if args.snap_ramp_steps else {}
        return {**out, "h": h, "w": w, "source_alpha": args.alpha,
                **{f"source_{k}": v for k, v in {**_ramp(args), **_options(args)}.items()}, **reassign, **latent, **snap_ramp}
    if method == "dkm":
        return {**out, "n_bits": spec}
    if method == "fp-finetuned":
        return out
    raise ValueError(f"_fields: unknown method {method!r}")


def _device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _finished(done: list[dict], args, method: str, spec) -> bool:
    """Whether ``done`` holds the row of this run: the same configuration (``_fields``) and seed."""
    key = _config_key(_fields(args, method, spec))
    return any(r.get("seed", 0) == args.seed and _config_key(r) == key for r in done)


def _sources(done: list[dict], args, h: float, w: float) -> list[dict]:
    """The rows of ``done`` a control of these arguments takes its K_l from: soft quantization at h, w
    with the same options, cluster-mean placement, h from --points (the control's own --placement and
    --target-step are not the source's), seed 0 (every control seed pairs with it). The rows of this
    run's device if there are any, else those of another (the K_l of a row from a lent GPU serve a
    control run on the CPU: the procedure is the same)."""
    want = {**_fields(args, "softquant", (h, w)), "target_step": None, "placement": "mean"}
    found = [r for r in done if r.get("seed", 0) == 0 and _any_device_key(r) == _any_device_key(want)]
    return _own_device_first(found, want["device"])


def run_point(args, h: float, w: float, dm: CIFAR10DataModule, run_dir: Path | None = None) -> dict:
    """Stages 2 and 3 in one fit (epoch windows), then the baselines at the same K_l."""
    t0 = time.time()
    pl.seed_everything(args.seed)
    module = _module(args, restart_at_snap=True)
    e2 = args.couple_epochs
    # --couple-from E: full-precision epochs before the coupling (its window [E, e2)); with
    # reassign_from="coupling_start" the refinement's latent weights start from those trained weights.
    # --grad-ratio R: the package's default relative strength (h of --points unused).
    strength = {"h": None, "grad_ratio": args.grad_ratio} if args.grad_ratio else {"h": h}
    soft = SoftQuantCallback(**strength, w=w, alpha=args.alpha, start_epoch=args.couple_from, stop_epoch=e2,
                             target_step=args.target_step, ramp_steps=args.ramp_steps, ramp_from=args.ramp_from)
    # With a bit budget every layer is snapped to it (as the controls are), whatever its snap error.
    refine = ClusterRefine(snap_epoch=e2, w=w, snap=SnapConfig(recalibrate_bn_batches=100, placement=args.placement, max_bits=args.max_bits, max_clusters=args.max_clusters, on_unclustered="snap" if args.max_bits or args.max_clusters else "keep", max_bits_overrides=_edge_patterns(args)), refine=RefineConfig(reassign=args.reassign, reassign_from=args.reassign_from, ramp_steps=args.snap_ramp_steps, ramp_from=args.snap_ramp_from))
    timer = StepTimer()
    phases, before, after = _phases(dm, e2, refine)
    start = _fit(module, dm, e2 + args.refine_epochs, [soft, *_saver(args, "softquant", (h, w)), *phases, timer],
                 args.limit, run_dir)
    ks = {n.removeprefix("model."): r.k for n, r in refine.snapper.reports.items() if r.snapped}
    summary = refine.snapper.summary()
    return _row(
        args, _fields(args, "softquant", (h, w)), module, dm, ks, timer, t0, start,
        bits_weighted=summary["bits_weighted"], bits_mean=summary["bits_mean"], entropy_weighted=summary["entropy_weighted"],
        k_per_layer={n: r.k for n, r in refine.snapper.reports.items()},
        kept_fp32=[n for n, r in refine.snapper.reports.items() if not r.snapped],
        # A gradual snap leaves the weights as they were at the snap: no "snapped" accuracy.
        acc_coupled=before.acc, acc_snapped=None if args.snap_ramp_steps else after.acc,
    )


def _module(args, restart_at_snap: bool = False) -> ImageClassifier:
    """ResNet-20 from the full-precision checkpoint with the run's lr and schedule; for the runs
    that snap after the coupling epochs, the cosine restarted at the snap with ``--restart-at-snap``."""
    restarts = []
    if restart_at_snap and args.restart_at_snap:
        if args.schedule != "cosine" or not args.refine_epochs:
            raise SystemExit("--restart-at-snap needs --schedule cosine and --refine-epochs >= 1")
        restarts = [args.couple_epochs]
    kd = dict(distill_from=args.pretrained, distill_weight=args.distill,
              distill_temperature=args.distill_temperature) if args.distill else {}
    return ImageClassifier(arch="resnet20", lr=args.lr, schedule=args.schedule, init_from=args.pretrained,
                           restarts=restarts, **kd)


def _options(args) -> dict:
    """The row fields of the options any training-time run may take: distillation from the
    full-precision checkpoint, the first and last layers at their own bits (none when unused)."""
    out = {"distill": args.distill, "distill_temperature": args.distill_temperature} if args.distill else {}
    return {**out, "edge_bits": args.edge_bits} if args.edge_bits else out


EDGE_LAYERS = ("conv1", "fc")  # ResNet-20's first convolution and classifier (module names)


def _edge_patterns(args, as_k: bool = False) -> dict:
    """``{regex of an edge layer's weight: --edge-bits (or 2^it with as_k)}``; empty without ``--edge-bits``."""
    if not args.edge_bits:
        return {}
    return {rf"^model\.{m}\.weight$": 2**args.edge_bits if as_k else args.edge_bits for m in EDGE_LAYERS}


def _ramp(args) -> dict:
    """The row fields of the options that only some runs use (the h ramp, full-precision epochs before
    the coupling, a bit budget, moving assignments in refinement, the lr restart)."""
    out = {"ramp_steps": args.ramp_steps, "ramp_from": args.ramp_from} if args.ramp_steps else {}
    out = {**out, "couple_from": args.couple_from} if args.couple_from else out
    out = {**out, "grad_ratio": args.grad_ratio} if args.grad_ratio else out
    out = {**out, "max_bits": args.max_bits} if args.max_bits else out
    out = {**out, "max_clusters": args.max_clusters} if args.max_clusters else out
    out = {**out, "reassign": True} if args.reassign else out
    out = {**out, "reassign_from": args.reassign_from} if args.reassign_from != "snap" else out
    out = {**out, "snap_ramp_steps": args.snap_ramp_steps, "snap_ramp_from": args.snap_ramp_from} if args.snap_ramp_steps else out
    return {**out, "restart_at_snap": True} if args.restart_at_snap else out


def run_codebook(args, bits: int | str, dm: CIFAR10DataModule, run_dir: Path | None = None) -> dict:
    """Method B for the coupling epochs, then snap to its representatives and refine."""
    t0 = time.time()
    pl.seed_everything(args.seed)
    module = _module(args, restart_at_snap=True)
    e2 = args.couple_epochs
    # ``bits`` an int (2^bits representatives) or "k<K>" (K of them, --codebook-k: 3 for ternary layers).
    k = int(bits[1:]) if isinstance(bits, str) else 2**bits
    cb = LearnedCodebook(lam=args.codebook_lam, bits=None, k=k, init="kmeans", stop_epoch=e2,
                         k_overrides=_edge_patterns(args, as_k=True))
    refine = ClusterRefine(snap_epoch=e2, clusters_from="codebook", snap=SnapConfig(recalibrate_bn_batches=100, on_unclustered="snap"), refine=RefineConfig(reassign=args.reassign, reassign_from=args.reassign_from))  # method B ends by snapping to its representatives, whatever the error
    timer = StepTimer()
    phases, before, after = _phases(dm, e2, refine)
    start = _fit(module, dm, e2 + args.refine_epochs, [cb, *phases, timer], args.limit, run_dir)
    ks = {n.removeprefix("model."): r.k for n, r in refine.snapper.reports.items() if r.snapped}
    return _row(args, _fields(args, "codebook", bits), module, dm, ks, timer, t0, start,
                kept_fp32=[n for n, r in refine.snapper.reports.items() if not r.snapped],
                acc_coupled=before.acc, acc_snapped=after.acc)


def run_control(args, quantizer: str, h: float, w: float, source: dict, dm: CIFAR10DataModule,
                run_dir: Path | None = None) -> dict:
    """A post-training quantizer given the same refinement and the same budget.

    The full-precision model is quantized by ``quantizer`` (HEQ, optimal k-means or uniform) at
    the per-layer ``K_l`` of the soft quantization row ``source`` (its fp32 layers stay
    fp32), BatchNorm is re-estimated, and the model is refined as that row was (``ClusterRefine``:
    tied weights, or moving assignments with ``--reassign``) for all its ``couple + refine`` epochs.
    With ``--reassign-from coupling_start`` (the source row's option) the control is given that row's
    own refinement instead: the full-precision model trains on for the ``couple`` epochs (its weights
    then dropped, as the coupled ones are), the snap comes at the same epoch with the clusters found
    on the checkpoint's weights, the latent weights start from those weights, and the ``refine``
    epochs run in the same lr window: only the clusters differ from the source row's run.
    """
    from sq_lightning.models.batchnorm import recalibrate_batchnorm
    from sq_lightning.ops.baselines import quantize
    from sq_lightning.ops.clustering import Clusters

    t0 = time.time()
    pl.seed_everything(args.seed)
    module = _module(args)
    params = dict(module.named_parameters())
    clusters = {}
    for name, k in source["k_per_layer"].items():
        if name in source["kept_fp32"]:
            continue
        clusters[name] = Clusters.from_quantization(quantize(params[name].detach(), k, quantizer))
    if not clusters:
        raise SystemExit(f"--controls: the soft quantization row h={h:g} w={w:g} kept every layer fp32; nothing to quantize")
    timer = StepTimer()
    if args.reassign_from == "coupling_start":  # the source row's own refinement, at its epoch
        refine = ClusterRefine(snap_epoch=args.couple_epochs, snap=SnapConfig(recalibrate_bn_batches=100, on_unclustered="snap"), refine=RefineConfig(reassign=True, reassign_from="coupling_start")).snap_to(clusters)
        after = PhaseAccuracy(args.couple_epochs, dm.val_dataloader(), "snapped")
        start = _fit(module, dm, args.couple_epochs + args.refine_epochs, [refine, after, timer], args.limit, run_dir)
        acc_snapped = after.acc
    else:
        # Every layer the soft quantization row snapped is snapped here, whatever its error.
        # A gradual snap (--snap-ramp-steps) is given to the control too: snapped before the fit,
        # so snap_epoch 0 never snaps again, the weights reach their values over the ramp.
        refine = ClusterRefine(snap_epoch=0 if args.snap_ramp_steps else None, snap=SnapConfig(recalibrate_bn_batches=100, on_unclustered="snap"), refine=RefineConfig(reassign=args.reassign, ramp_steps=args.snap_ramp_steps, ramp_from=args.snap_ramp_from))
        refine.snapper.snap(module, clusters=clusters)  # ClusterRefine then ties from the first step
        dm.setup("fit")
        module.to(_device())  # the fit moves it there anyway; the stored clusters follow the weights
        recalibrate_batchnorm(module, dm.train_dataloader(), 100)
        acc_snapped = None if args.snap_ramp_steps else accuracy(module.model, dm.val_dataloader())
        start = _fit(module, dm, args.couple_epochs + args.refine_epochs, [refine, timer], args.limit, run_dir)
    ks = {n.removeprefix("model."): r.k for n, r in refine.snapper.reports.items()}
    # The same accounting as the soft quantization row: its fp32 layers count as 32 bits.
    sizes = {n: params[n].numel() for n in source["k_per_layer"]}
    bits = {n: 32.0 if n in source["kept_fp32"] else refine.snapper.reports[n].bits for n in sizes}
    ent = {n: 32.0 if n in source["kept_fp32"] else refine.snapper.reports[n].entropy for n in sizes}
    return _row(args, _fields(args, f"refined-{quantizer}", (h, w)), module, dm, ks, timer, t0, start,
                bits_weighted=sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values()),
                entropy_weighted=sum(ent[n] * sizes[n] for n in sizes) / sum(sizes.values()),
                bits_mean=sum(bits.values()) / len(bits),
                kept_fp32=list(source["kept_fp32"]), acc_snapped=acc_snapped, source_acc=source["acc"])


def run_dkm(args, bits: int, dm: CIFAR10DataModule, run_dir: Path | None = None) -> dict:
    """coremltools DKM palettization for all the epochs, then finalize."""
    t0 = time.time()
    pl.seed_everything(args.seed)
    module = _module(args)
    edges = {m: args.edge_bits for m in EDGE_LAYERS} if args.edge_bits else {}
    dkm = DKMPalettize(bits, edges)
    timer = StepTimer()
    start = _fit(module, dm, args.couple_epochs + args.refine_epochs, [dkm, timer], args.limit, run_dir)
    ks = {n: 2 ** edges.get(n.removesuffix(".weight"), bits) for n, p in module.model.named_parameters() if p.dim() > 1}
    return _row(args, _fields(args, "dkm", bits), module, dm, ks, timer, t0, start, kept_fp32=[])


def run_fp(args, dm: CIFAR10DataModule, run_dir: Path | None = None) -> dict:
    """The full-precision model trained on for the same epochs, lr and schedule: how much of a
    quantized run's accuracy the extra training alone would give."""
    t0 = time.time()
    pl.seed_everything(args.seed)
    module = _module(args)
    timer = StepTimer()
    start = _fit(module, dm, args.couple_epochs + args.refine_epochs, [timer], args.limit, run_dir)
    return _row(args, _fields(args, "fp-finetuned"), module, dm, {}, timer, t0, start, bits_weighted=32.0, bits_mean=32.0,
                kept_fp32=[])


# Arguments that select which runs to do or where results go, not what a run is.
_NOT_THE_RUN = {"points", "codebook_bits", "codebook_k", "dkm_bits", "controls", "fp_control", "out", "report_only", "archive",
                "download", "command", "resume_dir", "save_coupled"}


# Arguments added after runs became resumable, at the value that runs started before them
# used: left out of a run's identity at that value, so those runs still resume.
_LATER_ARGS = {"max_clusters": None, "snap_ramp_steps": 0, "snap_ramp_from": 1e-3, "couple_from": 0, "grad_ratio": None}


def _identity(what: dict) -> dict:
    return {k: v for k, v in what.items() if k not in _LATER_ARGS or v != _LATER_ARGS[k]}


def _what(args, method: str, spec) -> dict:
    """Everything that defines one run: its method, its point and every argument of ``args`` that is a run's."""
    return _identity({"method": method, "spec": spec, **{k: v for k, v in vars(args).items() if k not in _NOT_THE_RUN}})


def _run_hash(args, method: str, spec) -> str:
    """16 hex digits naming one run (its resume directory, its ``--save-coupled`` file)."""
    return hashlib.sha1(json.dumps(_what(args, method, spec), sort_keys=True).encode()).hexdigest()[:16]


def _run_dir(args, method: str, spec) -> Path | None:
    """The directory of one run's resume checkpoint, named by a hash of everything that
    defines the run (so a changed argument never resumes another run's weights). A
    directory whose ``run.json`` describes the same run is reused whatever its name (one
    written before an argument of ``_LATER_ARGS`` existed)."""
    if not args.resume_dir:
        return None
    what = _what(args, method, spec)
    # The checkpoint by where it is, however the path was written (relative here, absolute in the GPU script).
    where = lambda w: {**w, "pretrained": str(Path(w["pretrained"]).resolve())} if "pretrained" in w else w  # noqa: E731
    for saved in sorted(Path(args.resume_dir).glob(f"{method}-*/run.json")):
        try:
            if where(_identity(json.loads(saved.read_text()))) == where(what):
                return saved.parent
        except (OSError, ValueError):
            continue
    text = json.dumps(what, sort_keys=True)
    run_dir = Path(args.resume_dir) / f"{method}-{_run_hash(args, method, spec)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(text + "\n")
    return run_dir


LR = 0.01  # the SGD lr of every run unless --lr says otherwise
# How the size table, its front and the summary name the training-time methods.
SHORT_NAMES = {"softquant": "soft quantization + refine", "codebook": "method B + refine", "dkm": "coremltools DKM"}


def _method(r: dict) -> str:
    return r.get("method", "softquant")


def _config_text(r: dict) -> str:
    """How the report's tables name a row's configuration beyond ``_label`` (method, point, epochs) and its
    device: the options it ran away from their defaults (the lr among them), so that no two configurations
    read alike (tests/test_benchmark_reports.py checks the results file)."""
    return (", cosine lr" if r.get("schedule") == "cosine" else "") + (
        f", lr {r['lr']:g}" if r.get("lr", LR) != LR else "") + (f", seed {r['seed']}" if r.get("seed") else "") + {"kmeans": ", k-means snap", "heq": ", HEQ snap"}.get(r.get("placement"), "") + (
        f", alpha {r.get('alpha', r.get('source_alpha')):g}" if r.get("alpha", r.get("source_alpha", 0.66)) != 0.66 else "") + (
        f", full precision for {r['couple_from']} epochs before the coupling" if r.get("couple_from") else "") + (
        f", h ramp x{r['ramp_from']:g} over {r['ramp_steps']} steps" if r.get("ramp_steps") else "") + (
        f", source h ramp x{r['source_ramp_from']:g} over {r['source_ramp_steps']} steps" if r.get("source_ramp_steps") else "") + (
        f", at most {r['max_bits']} bit(s) a layer" if r.get("max_bits") else "") + (
        f", at most {r['max_clusters']} values a layer" if r.get("max_clusters") else "") + (
        f", source at most {r['source_max_clusters']} values a layer" if r.get("source_max_clusters") else "") + (
        f", source at most {r['source_max_bits']} bit(s) a layer" if r.get("source_max_bits") else "") + (
        ", lr restarted at the snap" if r.get("restart_at_snap") else "") + (
        ", reassigned refinement" if r.get("reassign") else "") + (
        (", latent weights from before coupling" if not _method(r).startswith("refined-") else
         ", snapped after the fp epochs, latent weights from the checkpoint's")
        if r.get("reassign_from") == "coupling_start" else "") + (
        f", snap spread over {r['snap_ramp_steps']} steps from x{r['snap_ramp_from']:g}" if r.get("snap_ramp_steps") else "") + (
        f", lam {r['lam']:g}" if r.get("lam", 30.0) != 30.0 else "") + (
        ", source lr restarted at the snap" if r.get("source_restart_at_snap") else "") + (
        f", distilled from full precision (weight {r['distill']:g}, T {r['distill_temperature']:g})" if r.get("distill") else "") + (
        f", first conv and fc at {'most ' if r.get('h') is not None else ''}{r['edge_bits']} bits" if r.get("edge_bits") else "")


def write_reports(lines: list[dict], directory: Path = RESULTS) -> None:
    """``cifar10_tradeoff.md`` and ``.png`` in ``directory`` from all result lines."""
    if not lines:
        return
    fp = next(r["acc"] for r in lines[0]["baselines"] if r["method"] == "full precision")
    cell = lambda b, m, key: f"{b[m][key]:.4f}" if b.get(m) and b[m].get(key) is not None else "-"  # noqa: E731
    step = lambda r: f"{r['step_ms_median']:.0f}" if r.get("step_ms_median") else "-"  # noqa: E731
    phase = lambda r, key: f"{r[key]:.4f}" if r.get(key) is not None else "-"  # noqa: E731
    ent = lambda r: f"{r['entropy_weighted']:.2f}" if r.get("entropy_weighted") is not None else "-"  # noqa: E731
    out = [
        "# ResNet-20 / CIFAR-10: soft quantization vs post-training baselines at the same K_l",
        "",
        f"Full-precision accuracy of the starting checkpoint: {fp:.4f}. Data: offline CIFAR-10 JPEG copy (slightly below the",
        "original binary release). Baselines quantize the full-precision model post-training at the per-layer K_l that the",
        "training-time method found; 'BN' columns re-estimate BatchNorm statistics on 100 training batches. 'step' is the",
        "median training-step time (batch 128, forward + backward + the method's work + SGD step) inside that run; runs on",
        "this 2-core machine used 1 torch thread each and two of them could share the machine, so compare step times",
        "within one table row or between rows of the same date loosely. The command of every row is listed below the tables.",
        "",
        "## Soft quantization + refinement (SoftQuantCallback, ClusterRefine)",
        "",
        "'coupled' is the accuracy at the end of coupling (before the snap), 'snapped' right after the snap and the",
        "BatchNorm re-estimation (before refinement); '-' where a row predates these measurements. 'entropy' is the",
        "parameter-weighted Shannon entropy of each layer's cluster populations: the bits per weight an entropy coder",
        "would need (at most the bits; fp32 layers count 32 in both).",
        "",
        "| h (or target_step S) | w | bits (weighted) | bits (mean) | entropy (weighted) | layers kept fp32 | coupled | snapped | soft quant + refine | degradation | HEQ | HEQ+BN | k-means | k-means+BN | uniform | uniform+BN | step ms | epochs (couple/refine) | date, device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fps = sorted((r for r in lines if _method(r) == "fp-finetuned"), key=lambda r: r["couple_epochs"] + r["refine_epochs"])
    glance, frontier = _summary(fp, lines, fps, _config_text)
    out[out.index("## Soft quantization + refinement (SoftQuantCallback, ClusterRefine)"):0] = glance
    soft = sorted((r for r in lines if _method(r) == "softquant"), key=lambda r: (r["w"], r["h"], r["couple_epochs"]))
    for r in soft:
        b = {x["method"].split(" ")[0]: x for x in r["baselines"]}
        hcell = (f"S={r['target_step']:g}" if r.get("target_step") else
                 f"ratio {r['grad_ratio']:g}" if r.get("grad_ratio") else f"{r['h']:g}")
        out.append(
            f"| {hcell} | {r['w']:g} | {r['bits_weighted']:.2f} | {r['bits_mean']:.2f} | {ent(r)} | {len(r['kept_fp32'])} | "
            f"{phase(r, 'acc_coupled')} | {phase(r, 'acc_snapped')} | {r['acc']:.4f} | {fp - r['acc']:+.4f} | {cell(b, 'heq', 'acc')} | {cell(b, 'heq', 'acc_bn')} | "
            f"{cell(b, 'kmeans', 'acc')} | {cell(b, 'kmeans', 'acc_bn')} | {cell(b, 'uniform', 'acc')} | "
            f"{cell(b, 'uniform', 'acc_bn')} | {step(r)} | "
            f"{r['couple_epochs']}/{r['refine_epochs']}{_config_text(r)} | {r['date']}, {r['device']} |"
        )
    others = sorted((r for r in lines if _method(r) in ("codebook", "dkm")), key=lambda r: (_method(r), r["n_bits"]))
    controls = sorted((r for r in lines if _method(r).startswith("refined-")), key=lambda r: (r["w"], r["h"], _method(r)))
    if controls:
        out += [
            "",
            "## Control: post-training quantizers given the same refinement and budget",
            "",
            "The full-precision model quantized by HEQ, optimal k-means or uniform at the K_l of a soft quantization row (its fp32 "
            "layers kept fp32), BatchNorm re-estimated, then refined as that row (ClusterRefine: tied weights, or moving "
            "assignments where the row says 'reassigned refinement') for all the epochs that row trained (couple + refine), "
            "same lr and schedule. Where the epochs read 'fp + refined' the control is given the row's own refinement "
            "(`--reassign-from coupling_start`): the full-precision model trains on for the coupling epochs (weights then "
            "dropped, as the coupled ones are), is snapped at the row's snap epoch with its latent weights from the "
            "checkpoint's, and refined over the same lr window: only the clusters differ.",
            "",
            "| quantizer | K_l of soft quant h, w | bits (weighted) | entropy (weighted) | snapped (+BN) | after refinement | soft quant + refine (same K_l) | step ms | epochs | date, device |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in controls:
            out.append(
                f"| {_method(r).removeprefix('refined-')} | {r['h']:g}, {r['w']:g} | {r['bits_weighted']:.2f} | {ent(r)} | "
                f"{phase(r, 'acc_snapped')} | {r['acc']:.4f} | {r['source_acc']:.4f} | {step(r)} | "
                f"{_control_epochs(r)}{'' if r.get('reassign') else ' tied'}{_config_text(r)} | {r['date']}, {r['device']} |"
            )
    if fps:
        out += [
            "",
            "## Reference: the full-precision model trained on for the same epochs",
            "",
            "No quantization, same start, lr, schedule and number of epochs (couple + refine) as the rows it is compared "
            "with: the accuracy that the extra training alone gives. A quantized run's cost is its gap to this row "
            "as much as to the starting checkpoint's.",
            "",
            "| epochs | accuracy | vs the starting checkpoint | step ms | date, device |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in fps:
            out.append(f"| {r['couple_epochs'] + r['refine_epochs']}{_config_text(r)} | {r['acc']:.4f} | "
                       f"{r['acc'] - fp:+.4f} | {step(r)} | {r['date']}, {r['device']} |")
    if others:
        names = {"codebook": "method B (LearnedCodebook) + refine", "dkm": "coremltools DKM palettization"}
        out += [
            "",
            "## Other training-time methods, same start, lr and epochs",
            "",
            "Method B: regularized for the 'couple' epochs, then snapped to its learned representatives and refined. "
            "DKM: palettized for all the epochs (couple + refine), then finalized. Bits are counted from the distinct "
            "values of the trained model.",
            "",
            "| method | n_bits | bits (weighted) | entropy (weighted) | before snap | snapped | accuracy | degradation | HEQ+BN | k-means+BN | step ms | epochs | date, device |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in others:
            b = {x["method"].split(" ")[0]: x for x in r["baselines"]}
            out.append(
                f"| {names.get(_method(r), _method(r))} | {r['n_bits']} | {r['bits_weighted']:.2f} | {ent(r)} | "
                f"{phase(r, 'acc_coupled')} | {phase(r, 'acc_snapped')} | {r['acc']:.4f} | "
                f"{fp - r['acc']:+.4f} | {cell(b, 'heq', 'acc_bn')} | {cell(b, 'kmeans', 'acc_bn')} | {step(r)} | "
                f"{r['couple_epochs']}/{r['refine_epochs']}{_config_text(r)} | {r['date']}, {r['device']} |"
            )
    sized = [r for r in lines if r.get("file_bytes")]
    if sized:
        names = SHORT_NAMES
        out += [
            "",
            "## Exported size",
            "",
            "The trained model written by `save_compressed` (codebooks, indices, the unquantized parameters and "
            "buffers, safetensors header with checksums): indices bit-packed at ceil(log2 K_l) bits, or entropy-coded "
            "with rANS (`coding=\"ans\"`) under each layer's cluster populations; each file read back bit-exact. "
            "'header' is the safetensors header of the ans file (tensor table, layout, checksums), the same for any "
            "bit-width; it depends on the file format: version 2 held a SHA-256 per tensor, version 3 one for the "
            "whole file (about 13.6 kB less for ResNet-20). Rows made before the export was measured are not listed.",
            "",
            "| method | row | bits (weighted) | entropy (weighted) | accuracy | packed kB | ans kB | of which header kB | format | fp32 kB | date, device |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(sized, key=lambda r: r["file_bytes"]["ans"]):
            label, what = _label(r, names)
            fb = r["file_bytes"]
            out.append(
                f"| {label} | {what}{_config_text(r)} | {r['bits_weighted']:.2f} | {ent(r)} | {r['acc']:.4f} | "
                f"{fb['packed'] / 1000:.1f} | {fb['ans'] / 1000:.1f} | {fb['ans_header'] / 1000:.1f} | {fb.get('format', 2)} | "
                f"{fb['fp32'] / 1000:.1f} | {r['date']}, {r['device']} |"
            )
        out += _pareto(sized, names, _config_text)
    out += _targets(fp, soft, controls, others, fps, _config_text)
    out += _relation([r for r in soft if not r.get("target_step") and not r.get("seed")
                      and r.get("placement", "mean") == "mean" and r.get("alpha", 0.66) == 0.66 and not r.get("ramp_steps")
                      and not r.get("max_bits") and not r.get("max_clusters") and not r.get("restart_at_snap") and not r.get("reassign")
                      and not r.get("distill")])
    cmds = sorted({r.get("command", LEGACY_COMMAND) for r in lines})
    out += ["", "## Commands", "", *[f"- `{c}`" for c in cmds]]
    (directory / "cifar10_tradeoff.md").write_text("\n".join(out) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev extra
        return
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.4), dpi=100)
    # The HEQ placement is a diagnostic of the partition (see ClusterSnapper), not a way to quantize: not plotted.
    pts = sorted((r for r in soft if r.get("placement") != "heq" and len(r["baselines"]) > 1), key=lambda r: r["bits_weighted"])
    x = [r["bits_weighted"] for r in pts]
    # The training-time methods and the controls, one series each, on both panels.
    series = (
        (pts, "o", "C0", "soft quantization + refine"),
        ([r for r in controls if _method(r) == "refined-heq"], "x", "C1", "HEQ + same refinement"),
        ([r for r in controls if _method(r) == "refined-kmeans"], "x", "C2", "k-means + same refinement"),
        ([r for r in controls if _method(r) == "refined-uniform"], "x", "C3", "uniform + same refinement"),
        (sorted((r for r in others if _method(r) == "codebook"), key=lambda r: r["bits_weighted"]), "D", "C4", "method B + refine"),
        (sorted((r for r in others if _method(r) == "dkm"), key=lambda r: r["bits_weighted"]), "P", "C5", "coremltools DKM"),
    )
    for i, (method, marker) in enumerate((("heq", "s"), ("kmeans", "^"), ("uniform", "v"))):
        ys = [next(b["acc_bn"] for b in r["baselines"] if b["method"].startswith(method)) for r in pts]
        ax.plot(x, ys, marker, color=f"C{i + 1}", mfc="none", label=f"{method} post-training (+BN recal.) at the same K_l")
    for rs, marker, color, label in series:
        if rs:
            ax.plot([r["bits_weighted"] for r in rs], [r["acc"] for r in rs], marker, color=color, ms=7, label=label)
    ax.axhline(fp, color="gray", lw=0.8, label="full precision")
    ax.set_xlabel("average bits per weight (parameter-weighted)")
    ax.set_ylabel("CIFAR-10 test accuracy")
    ax.set_title("ResNet-20: accuracy vs bits (log2 K_l)")
    ax.set_xlim(0, 6)  # rows that kept layers fp32 (up to 31 bits) lie beyond: see the table
    ax.legend(fontsize=6.5, loc="lower right")
    # The same runs against what an entropy coder stores (save_compressed(coding="ans")):
    # the parameter-weighted entropy of the cluster populations; rows without it are left out.
    for group, marker, color, label in series:
        rs = [r for r in group if r.get("entropy_weighted") is not None and r["entropy_weighted"] < 8]
        if rs:
            ax2.plot([r["entropy_weighted"] for r in rs], [r["acc"] for r in rs], marker, color=color, ms=7, label=label)
    ax2.axhline(fp, color="gray", lw=0.8, label="full precision")
    ax2.set_xlabel("entropy-coded bits per weight (weighted entropy of the cluster populations)")
    ax2.set_title("the same runs vs entropy-coded size (rows that measured it)")
    ax2.legend(fontsize=6.5, loc="lower right")
    # The summary table as curves, zoomed in: the best configuration of each method under each budget.
    styles = {"soft quantization + refine": ("o-", "C0"), "heq + same refinement": ("x--", "C1"),
              "method B + refine": ("D-", "C4"), "coremltools DKM": ("P-", "C5"),
              "post-training HEQ + BN": ("s:", "C1"), "post-training k-means + BN": ("^:", "C2")}
    low = min(a for pts_ in frontier.values() for _, a in pts_)
    for name, pts_ in frontier.items():
        marker, color = styles.get(name, ("*-", "k"))
        ax3.plot([b for b, _ in pts_], [a for _, a in pts_], marker, color=color, ms=7,
                 mfc="none" if name.startswith("post-training") else color, label=name)
    ax3.axhline(fp, color="gray", lw=0.8, label="full precision")
    ax3.set_ylim(max(low, fp - 0.3) - 0.01, fp + 0.01)
    ax3.set_xticks([b for b, _ in SUMMARY_BUDGETS])
    ax3.set_xlabel("bit budget (parameter-weighted log2 K_l, at most)")
    ax3.set_title("best of each method under a budget (mean over seeds)")
    ax3.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(directory / "cifar10_tradeoff.png")


def _label(r: dict, names: dict) -> tuple[str, str]:
    """A row's method name and what it ran (h and w, or the bits; the epochs)."""
    m = _method(r)
    # A target-step run stores the h of --points but does not use it.
    strength = lambda: (f"S={r['target_step']:g}" if r.get("target_step") else  # noqa: E731
                        f"ratio={r['grad_ratio']:g}" if r.get("grad_ratio") else f"h={r['h']:g}")
    what = f"{strength()}, w={r['w']:g}" if m == "softquant" or m.startswith("refined-") else (
        f"K={r['k']}" if r.get("k") else f"n_bits={r.get('n_bits')}")
    what += f", {r['couple_epochs']}/{r['refine_epochs']} epochs"
    return (f"{m.removeprefix('refined-')} + same refinement" if m.startswith("refined-") else names.get(m, m)), what


# What a row measured or where it ran, not what it ran: every other field (and any option added later) tells
# configurations apart, so a new option can never pool two configurations.
_OUTCOME = {"acc", "acc_coupled", "acc_snapped", "baselines", "bits_mean", "bits_weighted", "entropy_weighted",
            "distinct_per_layer", "file_bytes", "k_per_layer", "kept_fp32", "source_acc", "seconds", "step_ms_median",
            "threads", "resumed_at_epoch", "date", "machine", "torch", "command", "method", "seed"}
# An option left at its default is the same configuration whether an older row stored it or not.
_DEFAULTS = {"schedule": "constant", "placement": "mean", "alpha": 0.66, "source_alpha": 0.66, "lam": 30.0,
             "target_step": None, "reassign": False, "restart_at_snap": False, "limit_train_batches": 1.0}


def _config_key(r: dict) -> tuple:
    """What a row ran, but its seed: its method and every option it stored that differs from the default."""
    return _method(r), tuple(sorted((k, repr(v)) for k, v in r.items() if k not in _OUTCOME and v != _DEFAULTS.get(k, object())))


def _any_device_key(r: dict) -> tuple:
    """``_config_key`` without the device: the same procedure wherever it ran."""
    return _config_key({k: v for k, v in r.items() if k != "device"})


def _own_device_first(rows: list[dict], device: str) -> list[dict]:
    """The rows of ``device`` if there are any, else all of ``rows``."""
    return [r for r in rows if r.get("device") == device] or rows


def _devices(rows: list[dict]) -> str:
    return " + ".join(sorted({r["device"] for r in rows}))


def _best_config(rows: list[dict]) -> tuple[list[dict], float, dict] | None:
    """The configuration (``_config_key``) with the best mean accuracy over its seeds: its rows, that mean and
    its lowest-seed row; None without rows. Seeds run on different devices are one configuration (the same
    procedure: a seed finished on the CPU beside two from a lent GPU); ``_devices`` names them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_any_device_key(r), []).append(r)
    if not groups:
        return None
    best = max(groups.values(), key=lambda g: sum(r["acc"] for r in g) / len(g))
    return best, sum(r["acc"] for r in best) / len(best), min(best, key=lambda r: r.get("seed", 0))


def _spread(rows: list[dict]) -> str:
    """The seeds behind a mean: each seed's accuracy, the sample standard deviation and the standard error
    of the mean, so that a target within the seed noise reads as such; empty for one seed."""
    if len(rows) < 2:
        return ""
    rows = sorted(rows, key=lambda r: r.get("seed", 0))
    accs = [r["acc"] for r in rows]
    sd = statistics.stdev(accs)
    return (f" (seeds {' / '.join(str(r.get('seed', 0)) for r in rows)}: {' / '.join(f'{a:.4f}' for a in accs)}; "
            f"sd {sd:.4f}, standard error {sd / math.sqrt(len(accs)):.4f})")


def _control_epochs(r: dict) -> str:
    """A control's epochs: all of them refined, or (given its source's own refinement) the full-precision
    epochs before the snap and the refined ones."""
    if r.get("reassign_from") == "coupling_start":
        return f"{r['couple_epochs']} fp + {r['refine_epochs']} refined"
    return str(r["couple_epochs"] + r["refine_epochs"])


def _pareto(sized: list[dict], names: dict, sched) -> list[str]:
    """The rows no other row beats on both entropy-coded size and accuracy (one file format)."""
    fmt = max(r["file_bytes"].get("format", 2) for r in sized)
    # The HEQ placement is a diagnostic of the partition, not a way to quantize.
    rows = [r for r in sized if r["file_bytes"].get("format", 2) == fmt and r.get("placement") != "heq"]
    size = lambda r: round(r["file_bytes"]["ans"], -2)  # noqa: E731  (the 0.1 kB shown: a few bytes decide nothing)
    front = [r for r in rows if not any(size(s) <= size(r) and s["acc"] >= r["acc"]
                                        and (size(s), s["acc"]) != (size(r), r["acc"]) for s in rows)]
    out = [
        "",
        "### Size against accuracy: the rows no other row beats on both",
        "",
        f"Among the format-{fmt} rows above, those for which no other row is both as small entropy-coded (ans) and as "
        "accurate: where each method sits on the trade-off between the shipped file and its accuracy, whatever its "
        "nominal bits. Single rows, whatever their epochs: a configuration run over several seeds shows its best one "
        "here (the means over seeds are in the next section).",
        "",
        "| ans kB | accuracy | method | row | bits (weighted) | entropy (weighted) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(front, key=size):
        label, what = _label(r, names)
        ent = f"{r['entropy_weighted']:.2f}" if r.get("entropy_weighted") is not None else "-"
        out.append(f"| {size(r) / 1000:.1f} | {r['acc']:.4f} | {label} | {what}{sched(r)} | {r['bits_weighted']:.2f} | {ent} |")
    return out


def _same_budget_fp(r: dict, fps: list[dict]) -> float | None:
    """Mean accuracy of the full-precision model trained on for the epochs, lr and schedule of ``r``: on the
    device of ``r`` where it was, else on any (a GPU row beside the CPU's reference, as the controls pair)."""
    budget = lambda f: (f["couple_epochs"] + f["refine_epochs"], f.get("schedule"), f.get("lr"))  # noqa: E731
    found = [f for f in fps if budget(f) == budget(r) and not f.get("distill")]
    same = [f["acc"] for f in _own_device_first(found, r["device"])]
    return sum(same) / len(same) if same else None


# Budgets of the summary: at most this many parameter-weighted bits (log2 K_l), with the tolerance of the targets.
SUMMARY_BUDGETS = ((1, "1 bit"), (1.6, "1.6 bits (ternary)"), (2, "2 bits"), (4, "4 bits"))


def _summary(fp: float, lines: list[dict], fps: list[dict], sched) -> tuple[list[str], dict[str, list[tuple]]]:
    """For each bit budget, the best configuration of each method (mean over its seeds), beside the post-training
    quantizers at the best K_l any training-time row under that budget found: the markdown lines, and per method
    its ``(budget, accuracy)`` points for the plot."""
    names = SHORT_NAMES
    order = ("softquant", "refined-heq", "codebook", "dkm")
    # The HEQ placement of soft quantization is a diagnostic of its partition, not a method.
    trained = [r for r in lines if _method(r) in order and r.get("placement") != "heq"]
    out = [
        "## At a glance: the best of each method under a bit budget",
        "",
        "For each budget (parameter-weighted log2 K_l, +0.05), the configuration of each method with the best mean "
        "accuracy over its seeds; 'below FP' is against the starting checkpoint, 'below FP, same epochs' against the "
        "full-precision model trained on for the same epochs ('-' where that was not measured). The post-training rows "
        "quantize the full-precision model at the K_l of a training-time row under the budget (the best such row), "
        "with BatchNorm re-estimated and no training. The best configurations differ in epochs (see each one): compare "
        "a method's figure with the full-precision model of its own epochs. The right panel of the plot draws this "
        "table. Every row is in the tables below, with its command.",
        "",
        "| budget | method | configuration | seeds | accuracy (mean) | below FP | below FP, same epochs | bits (weighted) "
        "| entropy (weighted) | ans kB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    points: dict[str, list[tuple]] = {}
    for bits, label in SUMMARY_BUDGETS:
        fits = [r for r in trained if r["bits_weighted"] <= bits + 0.05]
        for method in order:
            found = _best_config([r for r in fits if _method(r) == method])
            if found is None:
                continue
            best, mean, r0 = found
            name, what = _label(r0, names)
            ref = _same_budget_fp(r0, fps)
            ans = [r["file_bytes"]["ans"] for r in best if r.get("file_bytes")]
            ents = [r["entropy_weighted"] for r in best if r.get("entropy_weighted") is not None]
            points.setdefault(name, []).append((bits, mean))
            out.append(
                f"| <= {label} | {name} | {what}{sched({**r0, 'seed': 0})}, {_devices(best)} | {len(best)} | {mean:.4f} | "
                f"{(fp - mean) * 100:.2f} | {f'{(ref - mean) * 100:.2f}' if ref is not None else '-'} | "
                f"{sum(r['bits_weighted'] for r in best) / len(best):.2f} | "
                f"{f'{sum(ents) / len(ents):.2f}' if ents else '-'} | {f'{sum(ans) / len(ans) / 1000:.1f}' if ans else '-'} |"
            )
        for quantizer, title in (("heq", "post-training HEQ + BN"), ("kmeans", "post-training k-means + BN")):
            at = [(b["acc_bn"], r) for r in fits if not _method(r).startswith("refined-")
                  for b in r["baselines"] if b["method"].startswith(quantizer) and b.get("acc_bn") is not None]
            if at:
                acc, r = max(at, key=lambda t: t[0])
                name, what = _label(r, names)
                points.setdefault(title, []).append((bits, acc))
                out.append(f"| <= {label} | {title} | at the K_l of {name} ({what}) | - | {acc:.4f} | "
                           f"{(fp - acc) * 100:.2f} | - | {r['bits_weighted']:.2f} | - | - |")
    return out + [""], points


def _targets(fp: float, soft: list[dict], controls: list[dict], others: list[dict], fps: list[dict], sched) -> list[str]:
    """The issue's targets against the rows: margin over HEQ at the same K_l, degradation at 2 and 1 bits
    (against the starting checkpoint, and against ``fps``, the full-precision model trained on for the
    same epochs, where such a row exists)."""

    def budget(r: dict, mean: float) -> str:
        ref = _same_budget_fp(r, fps)
        if ref is None:
            return ""
        return (f", {(ref - mean) * 100:.2f} below the full-precision model trained on for the same "
                f"{r['couple_epochs'] + r['refine_epochs']} epochs ({ref:.4f})")

    out = ["", "## Where the targets stand", ""]
    # The HEQ placement is a diagnostic, not a method; a run that kept every layer fp32 has no baselines.
    rows = [r for r in soft if r.get("placement") != "heq" and any(b["method"].startswith("heq") for b in r["baselines"])]
    heq_bn = lambda r: next(b["acc_bn"] for b in r["baselines"] if b["method"].startswith("heq"))  # noqa: E731
    wins = [r for r in rows if r["acc"] > heq_bn(r)]
    losses = ", ".join(f"{r['bits_weighted']:.2f} bits ({r['acc']:.4f} vs {heq_bn(r):.4f})" for r in rows if r not in wins)
    bands = []
    for lo, hi in ((0.0, 1.5), (1.5, 2.5), (2.5, 3.5), (3.5, 8.0)):
        margins = [r["acc"] - heq_bn(r) for r in rows if lo <= r["bits_weighted"] < hi]
        if margins:
            bands.append(f"{lo:g}-{hi:g} bits: {sum(margins) / len(margins):+.4f} (mean of {len(margins)})")
    out.append(
        f"- Beat post-training HEQ (+BN re-estimation) at the same K_l at every point: {len(wins)} of {len(rows)} rows"
        + (f"; not at {losses}" if losses else "") + ". Margin by weighted bits: " + "; ".join(bands) + "."
    )
    pairs, ahead = [], 0
    for c in (c for c in controls if _method(c) == "refined-heq" and not c.get("reassign_from")):
        src = [r for r in rows if r["h"] == c["h"] and r["w"] == c["w"] and r["acc"] == c.get("source_acc")]
        if src:
            pairs.append(f"{c['bits_weighted']:.2f} bits: {src[0]['acc']:.4f} vs {c['acc']:.4f}")
            ahead += src[0]["acc"] > c["acc"]
    if pairs:
        out.append(
            f"- Against HEQ given the same refinement and epochs (a stronger control than the issue asks for): soft "
            f"quantization ahead in {ahead} of {len(pairs)} pairs (soft quantization vs control: {'; '.join(pairs)})."
        )
    same = _same_seed_pairs(rows, controls)
    if same:
        out.append(
            "- The same, with the refinement's latent weights from before coupling (`--reassign-from coupling_start`; "
            "up to the snap the run is the configuration without it, at the same K_l, so that configuration's HEQ "
            "controls serve, paired by seed): "
            f"soft quantization ahead in {sum(a > b for _, a, b, _ in same)} of {len(same)} pairs ("
            + "; ".join(f"{bits:.2f} bits: {a:.4f} vs {b:.4f}" + (f" ({dev})" if dev else "") for bits, a, b, dev in same)
            + ")."
        )
    own = _same_seed_pairs(rows, controls, own_refinement=True)
    if own:
        out.append(
            "- Against HEQ given the option's own refinement (snapped at the same epoch after as many full-precision "
            "epochs, latent weights from the checkpoint's, the same lr window: only the clusters differ), paired by seed: "
            f"soft quantization ahead in {sum(a > b for _, a, b, _ in own)} of {len(own)} pairs ("
            + "; ".join(f"{bits:.2f} bits: {a:.4f} vs {b:.4f}" + (f" ({dev})" if dev else "") for bits, a, b, dev in own)
            + ")."
        )
    # The issue counts bits as log2 K_l; the last line counts what an entropy-coded file stores.
    for measure, bits, goal in (("bits_weighted", 2, 0.01), ("bits_weighted", 1, 0.02), ("entropy_weighted", 1, 0.02)):
        fits = lambda r: r.get(measure) is not None and r[measure] <= bits + 0.05  # noqa: E731
        unit = ("bits (weighted" if measure == "bits_weighted" else "entropy-coded bit(s) per weight (weighted entropy of "
                "the cluster populations, a size view beside the log2 K_l count of the issue")
        near = [r for r in rows if fits(r)]
        if not near:
            continue
        best, mean, r0 = _best_config(near)
        peer_best, peer_mean, peer = _best_config([r for r in others if fits(r)]) or (None, None, None)
        out.append(
            f"- Degradation at <= {bits} {unit}, +0.05), target under {goal * 100:g} point(s): best soft quantization "
            f"configuration h={r0['h']:g}, w={r0['w']:g}{sched(r0)} ({r0['couple_epochs']}/{r0['refine_epochs']} epochs, "
            f"{_devices(best)}): {mean:.4f} over {len(best)} seed(s){_spread(best)}, "
            f"{(fp - mean) * 100:.2f} points below full precision ({'met' if fp - mean < goal else 'not met'}){budget(r0, mean)}"
            + (f"; best other training-time configuration: {_method(peer)} {peer['n_bits']} bit(s){sched(peer)} "
               f"({peer['couple_epochs']}/{peer['refine_epochs']} epochs, {_devices(peer_best)}): {peer_mean:.4f} over "
               f"{len(peer_best)} seed(s){_spread(peer_best)}, {(fp - peer_mean) * 100:.2f} points below{budget(peer, peer_mean)}" if peer else "") + "."
        )
    out.append("- The h -> bits relation and the N_l exponent: see the next section and `strength_scaling.md`.")
    return out


def _same_seed_pairs(rows: list[dict], controls: list[dict], own_refinement: bool = False) -> list[tuple[float, float, float, str]]:
    """``(bits, soft quantization, control, devices)`` for each ``reassign_from`` row and the HEQ control
    of the same seed whose source is that row's configuration without the option (the same procedure
    up to the snap, the same budget and K_l), or with ``own_refinement`` the HEQ control given that
    row's own refinement (``reassign_from`` on the control; its source is the row's configuration).
    The device is not part of the match (a GPU row pairs with a CPU control); ``devices`` names both
    where they differ, else is empty."""
    out = []
    for r in (r for r in rows if r.get("reassign_from")):
        key = _any_device_key(r if own_refinement else {k: v for k, v in r.items() if k != "reassign_from"})
        sources = [s for s in rows if s.get("seed", 0) == 0 and _any_device_key(s) == key]
        for c in controls:
            if (_method(c) == "refined-heq" and bool(c.get("reassign_from")) == own_refinement and c.get("seed", 0) == r.get("seed", 0)
                    and any(c.get("source_acc") == s["acc"] and c["h"] == s["h"] and c["w"] == s["w"] for s in sources)):
                devices = f"{r['device']} vs {c['device']}" if r.get("device") != c.get("device") else ""
                out.append((r["bits_weighted"], r["acc"], c["acc"], devices))
    return out


def _clustered_bits(r: dict) -> float:
    """Mean log2 K_l over the layers that clustered (fp32 layers left out, not counted as 32)."""
    ks = [k for n, k in r["k_per_layer"].items() if n not in r["kept_fp32"]]
    return sum(math.log2(k) if k > 1 else 0.0 for k in ks) / len(ks) if ks else float("nan")


def _relation(soft: list[dict]) -> list[str]:
    """Bits as a function of w (fixed h) and of h (fixed w), same schedule, with a monotonicity check."""
    out = ["", "## How h and w set the bits", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in soft:
        groups.setdefault((r["couple_epochs"], r["refine_epochs"], r.get("schedule", "constant")), []).append(r)
    for (ce, re_, sch), rows in sorted(groups.items()):
        label = f"{ce}/{re_} epochs, {sch} lr"
        for key, other in (("w", "h"), ("h", "w")):
            by: dict[float, list[dict]] = {}
            for r in rows:
                by.setdefault(r[other], []).append(r)
            for fixed, rs in sorted(by.items()):
                if len(rs) < 2:
                    continue
                rs = sorted(rs, key=lambda r: r[key])
                bits = [_clustered_bits(r) for r in rs]
                trend = ("falls" if all(b > a for a, b in zip(bits[1:], bits)) else
                         "rises" if all(b < a for a, b in zip(bits[1:], bits)) else "is not monotone")
                seq = ", ".join(
                    f"{key}={r[key]:g}: {_clustered_bits(r):.2f} bits, {len(r['kept_fp32'])} layer(s) fp32" for r in rs
                )
                out.append(f"- {label}, {other}={fixed:g}: mean log2 K_l over the clustered layers: {seq}; "
                           f"it {trend} as {key} grows.")
    out += [
        "",
        "Reading: `w` sets the cluster spacing (`w_l = w·σ_l`), so it sets the bits; `h` sets how fast and whether a "
        "layer clusters within the schedule (too weak: layers stay fp32; too strong: weights are thrown apart). At a "
        "fixed w a stronger h gives, if anything, slightly MORE clusters (they nucleate before they can merge), so in "
        "this parametrization fewer bits come from a larger w, not from a larger h. In "
        "`strength_scaling.md` the weakest per-layer strength that clusters a layer scales as N_l^-1.27 and the "
        "strongest usable one as N_l^-0.19, so the paper's N_l^-0.66 sits between the two edges of every layer's "
        "window; `target_step` (strength set from the dimensionless step S_l) removes the size dependence of the "
        "lower edge.",
    ]
    return out


# Rows written before commands were recorded per row all came from this script at 1/1 epochs.
LEGACY_COMMAND = (
    "python experiments/cifar10_tradeoff.py --pretrained experiments/checkpoints/resnet20_cifar10_fp.ckpt "
    "--points 1e-3:0.3 1e-3:0.45 3e-3:0.3 --couple-epochs 1 --refine-epochs 1"
)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments of one command line (``argv`` without the program), ``--limit`` normalised."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", required=True, help="full-precision ImageClassifier checkpoint")
    ap.add_argument("--points", nargs="*", default=[], help="soft quantization h:w pairs")
    ap.add_argument("--target-step", type=float, default=None,
                    help="soft quantization: set each h_l from this dimensionless step (h of --points is then unused)")
    ap.add_argument("--codebook-bits", type=int, nargs="*", default=[], help="method B runs at these bits")
    ap.add_argument("--codebook-k", type=int, nargs="*", default=[],
                    help="method B runs with this many representatives a layer (3: ternary; LearnedCodebook(k=...))")
    ap.add_argument("--codebook-lam", type=float, default=30.0, help="method B strength")
    ap.add_argument("--dkm-bits", type=int, nargs="*", default=[], help="coremltools DKM runs at these bits")
    ap.add_argument("--grad-ratio", type=float, default=None, metavar="R",
                    help="soft quantization: the default relative strength, SoftQuantCallback(h=None, grad_ratio=R) "
                         "(h of --points is then unused); exclusive with --target-step")
    ap.add_argument("--controls", nargs="*", default=[], metavar="Q:H:W",
                    help="HEQ, k-means or uniform ('heq:1e-3:0.9', 'kmeans:...', 'uniform:...') at the K_l of the soft quantization row h:w "
                         "(same epochs and schedule), then the same refinement (tied, or reassigned with --reassign) for all its "
                         "couple + refine epochs")
    ap.add_argument("--fp-control", action="store_true",
                    help="also train the full-precision model on for the same epochs (no quantization)")
    ap.add_argument("--alpha", type=float, default=0.66, help="soft quantization: h_l = h · N_l^-alpha")
    ap.add_argument("--ramp-steps", type=int, default=0,
                    help="soft quantization: h_l grows geometrically from --ramp-from x to full over this many "
                         "coupled steps (391 per epoch at batch 128); --controls then take their K_l from such a row")
    ap.add_argument("--ramp-from", type=float, default=0.01, help="soft quantization: start of the h ramp")
    ap.add_argument("--placement", choices=["mean", "kmeans", "heq"], default="mean",
                    help="soft quantization snap: cluster means, optimal k-means values, or equal-population (HEQ) "
                         "bins of the coupled weights at the discovered K_l")
    ap.add_argument("--max-bits", type=int, default=None,
                    help="soft quantization snap: at most 2^max_bits values a layer (optimal k-means of the coupled "
                         "weights where more clusters were found; every layer snapped); --controls then take their "
                         "K_l from such a row")
    ap.add_argument("--max-clusters", type=int, default=None,
                    help="soft quantization snap: the budget in values instead of bits (3: ternary layers, "
                         "ClusterRefine(snap=SnapConfig(max_clusters=...))); exclusive with --max-bits")
    ap.add_argument("--restart-at-snap", action="store_true",
                    help="cosine lr restarted at the snap (soft quantization, method B): refinement at a real lr")
    ap.add_argument("--reassign", action="store_true",
                    help="refinement with moving assignments (ClusterRefine(refine=RefineConfig(reassign=True))): latent weights take the "
                         "updates and join their nearest centroid after each step (soft quantization, method B, controls)")
    ap.add_argument("--reassign-from", choices=["snap", "coupling_start"], default="snap",
                    help="soft quantization or method B with --reassign: start the latent weights from the coupled "
                         "weights at the snap, or from the full-precision ones spread around the snapped values "
                         "(ClusterRefine(refine=RefineConfig(reassign_from=...))); --controls with coupling_start get that refinement: "
                         "snapped at epoch --couple-epochs after as many full-precision epochs, latent weights from "
                         "the checkpoint's, the same lr window")
    ap.add_argument("--snap-ramp-steps", type=int, default=0,
                    help="gradual snap (ClusterRefine(refine=RefineConfig(ramp_steps=...))): after the snap each weight moves a growing "
                         "fraction of the way to its cluster's mean per step, reaching the exact tie after this many "
                         "steps (soft quantization, controls); 0: snap at once")
    ap.add_argument("--snap-ramp-from", type=float, default=1e-3, help="the first step's fraction of --snap-ramp-steps")
    ap.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                    help="distil every training-time run from the full-precision checkpoint with this weight in (0, 1] "
                         "(ImageClassifier(distill_from=...)); 0: labels only")
    ap.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature of --distill")
    ap.add_argument("--edge-bits", type=int, default=None, metavar="B",
                    help="the first convolution and the classifier at B bits (2^B values), the other layers at "
                         "their --codebook-bits / --dkm-bits; soft quantization: at most B bits there, --max-bits elsewhere")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run and of the data order/augmentation")
    ap.add_argument("--couple-epochs", type=int, default=1)
    ap.add_argument("--couple-from", type=int, default=0, metavar="E",
                    help="soft quantization: the first E of the --couple-epochs train in full precision, the coupling "
                         "runs from epoch E to the snap (SoftQuantCallback(start_epoch=E)); with --reassign-from "
                         "coupling_start the refinement's latent weights start from the weights after those E "
                         "epochs; 0 (default): coupling from the first epoch")
    ap.add_argument("--refine-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=LR, help="SGD lr over coupling and refinement")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="lr schedule over all the epochs of a run (cosine: decays to 0 at the end)")
    ap.add_argument("--limit", type=float, default=1.0, help="limit_train_batches (for a smoke run)")
    ap.add_argument("--archive", default=None)
    ap.add_argument("--download", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "cifar10_tradeoff.jsonl"))
    ap.add_argument("--resume-dir", default=str(Path(__file__).resolve().parent / "checkpoints" / "runs"),
                    help="each run writes its last epoch's checkpoint under here and a killed run resumes from it "
                         "(removed once its row is written); '' to train every run from the start")
    ap.add_argument("--save-coupled", default=None, metavar="DIR",
                    help="soft quantization runs also write their coupled weights (the model's state_dict at the "
                         "snap) to DIR/softquant-H-W-seedS-HASH.pt (HASH: of the run's arguments), for "
                         "experiments/snap_margins.py")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from --out, train nothing")
    args = ap.parse_args(argv)
    for flag, specs, parts in (("--points", args.points, 2), ("--controls", args.controls, 3)):
        for spec in specs:
            numbers = spec.split(":")[parts - 2:]
            try:
                ok = len(spec.split(":")) == parts and all(float(v) > 0 for v in numbers)
            except ValueError:
                ok = False
            if not ok:
                ap.error(f"{flag}: {spec!r} is not " + ("h:w" if parts == 2 else "Q:h:w") + " with positive numbers "
                         "h and w (e.g. " + ("1e-3:0.9" if parts == 2 else "heq:1e-3:0.9") + ")")
    if args.grad_ratio is not None and (args.grad_ratio <= 0 or args.target_step):
        ap.error(f"--grad-ratio {args.grad_ratio}: a number > 0, without --target-step (both set the strength)")
    if args.couple_from and not (0 < args.couple_from < args.couple_epochs and args.points
                                 and not (args.codebook_bits or args.codebook_k or args.dkm_bits or args.controls
                                          or args.fp_control)):
        ap.error(f"--couple-from {args.couple_from}: an epoch from 1 to --couple-epochs - 1 "
                 f"(here {args.couple_epochs - 1}; 0, the default, couples from the first epoch), for soft "
                 "quantization runs only (--points, without --codebook-bits, --codebook-k, --dkm-bits, "
                 "--controls or --fp-control in the same command)")
    if args.limit >= 1:
        args.limit = 1.0 if args.limit == 1 else int(args.limit)
    return args


def main() -> None:
    args = _parse(sys.argv[1:])
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # its run.json
    args.command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    read = lambda: [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []  # noqa: E731
    if args.report_only:
        write_reports(read(), out.parent)
        return
    if args.edge_bits is not None and (not 1 <= args.edge_bits <= 16 or args.fp_control):
        raise SystemExit("--edge-bits: an integer in [1, 16], for --points, --codebook-bits, --dkm-bits and --controls "
                         "runs (a control reads the K_l of the soft quantization row run with the same --edge-bits); "
                         "the full-precision control has no bits")
    if args.reassign_from != "snap" and not (args.reassign and args.couple_epochs >= 1
                                             and (args.points or args.codebook_bits or args.codebook_k or args.controls)):
        raise SystemExit("--reassign-from coupling_start: the latent weights of a reassigned refinement of soft quantization, "
                         "method B or a control (given that row's refinement); it needs --reassign, --couple-epochs >= 1 "
                         "and --points, --codebook-bits, --codebook-k or --controls")
    dm = CIFAR10DataModule(archive=args.archive, download=args.download, batch_size=128, seed=args.seed)
    jobs = [("softquant", p) for p in args.points] + [("codebook", b) for b in args.codebook_bits]
    jobs += [("codebook", f"k{k}") for k in args.codebook_k]
    jobs += [("dkm", b) for b in args.dkm_bits] + [("control", c) for c in args.controls]
    jobs += [("fp-finetuned", None)] if args.fp_control else []
    if any(method != "fp-finetuned" for method, _ in jobs):
        try:  # every quantized row has an entropy-coded size: fail now, not after hours of training
            entropy_coder()
        except ImportError as err:
            raise SystemExit(f"cifar10_tradeoff: {err}") from err
    for method, spec in jobs:
        done = read()  # re-read: another process may share the results file
        what = None if method in ("fp-finetuned", "dkm", "codebook") else tuple(float(v) for v in spec.split(":")[-2:])
        if method == "control":
            quantizer = spec.split(":")[0]
            if quantizer not in ("heq", "kmeans", "uniform"):
                raise SystemExit(f"--controls: quantizer must be 'heq', 'kmeans' or 'uniform', got {quantizer!r} in {spec!r}")
            method = f"refined-{quantizer}"
            source = _sources(done, args, *what)
            if not source:
                raise SystemExit(f"--controls {spec}: no soft quantization row h={what[0]:g} w={what[1]:g} (seed 0) with these "
                                 f"epochs, schedule and options in {out}; run --points {what[0]:g}:{what[1]:g} first")
        if _finished(done, args, method, what if what is not None else spec):
            print(f"skip {method} {spec}: already in {out}")
            continue
        run_dir = _run_dir(args, method, spec)
        if method == "softquant":
            row = run_point(args, *what, dm, run_dir)
        elif method == "codebook":
            row = run_codebook(args, spec, dm, run_dir)
        elif method == "fp-finetuned":
            row = run_fp(args, dm, run_dir)
        elif method.startswith("refined-"):
            row = run_control(args, method.removeprefix("refined-"), *what, source[0], dm, run_dir)
        else:
            row = run_dkm(args, spec, dm, run_dir)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if run_dir is not None:  # the row holds the result; the run's own checkpoint is spent
            shutil.rmtree(run_dir)
        print(json.dumps({k: row.get(k) for k in ("method", "h", "w", "n_bits", "bits_weighted", "acc", "step_ms_median")}), flush=True)
        write_reports(read(), out.parent)


if __name__ == "__main__":
    main()
