"""Held-out check of the documented default recipe on models the defaults were not tuned on.

Every model gets exactly ``SoftQuantCallback(stop_epoch=C)`` for ``C`` epochs and then
``ClusterRefine()`` (snap where the coupling stops, refine ``R`` epochs), every other argument
at its default; only the training budget (``C``, ``R``, batches per epoch) depends on the model.
Per model and seed, all from the same trained full-precision model:

- ``fp``: the full-precision metric;
- ``default``: the metric after the recipe, the weighted bits ``Σ N_l log2 K_l / Σ N_l`` over the
  selected layers (a layer kept float32 would count 32), and the share of selected layers whose
  own clusters snapped within ``max_snap_error`` (the others are quantized by the default
  k-means fallback and are *not* counted as clustered);
- ``ptq-heq`` / ``ptq-kmeans``: post-training HEQ and optimal 1-D k-means at the same ``K_l``,
  BatchNorm re-estimated (20 batches) where the model has it;
- ``kmeans-refine``: k-means at the same ``K_l`` then ``ClusterRefine`` for ``C + R`` epochs (the
  fair control: the same training steps with clusters chosen without training);
- ``step_ratio``: mean optimizer-step time with ``SoftQuantCallback()`` over plain training,
  measured in this process on the same batches (two interleaved rounds).

Models (the training data are the offline archives; nothing is downloaded):

- ``digits-mlp``: 64-256-128-10 MLP on scikit-learn's 8x8 digits, SGD lr 0.05 momentum 0.9;
- ``no-forward``: the same MLP with BatchNorm, kept in ``self.model`` by a LightningModule with no
  ``forward``;
- ``resnet20``: CIFAR ResNet-20 from ``experiments/checkpoints/resnet20_cifar10_fp.ckpt``, SGD lr
  0.01 momentum 0.9 weight decay 5e-4;
- ``resnet18``: torchvision ResNet-18 (11.2 M weights) trained 6 epochs on 10,000 CIFAR-10
  images, AdamW lr 1e-3 weight decay 1e-4;
- ``mobilenetv2``: torchvision MobileNetV2 (depthwise convolutions) trained the same way with
  SGD lr 0.05 momentum 0.9 weight decay 4e-5;
- ``gpt``: the character GPT of ``experiments/checkpoints/shakespeare_gpt_fp.ckpt``, AdamW lr 3e-4
  weight decay 0.1; the metric is validation loss in nats per character (lower is better).

CIFAR metrics are accuracies on the first 2,000 test images. The seed sets the order (for
CIFAR-10 also the 10,000-image subset) of the compression batches; the starting model and the
held-out data are the same for every seed.

    python experiments/zoo.py --model digits-mlp --seeds 0 1 2
    python experiments/zoo.py --report     # -> experiments/results/zoo.md

Rows go to ``experiments/results/zoo.jsonl``; trained starting models are cached in
``$SQ_EXPERIMENT_CACHE`` (default ``/tmp/sq_zoo``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
ROWS = RESULTS / "zoo.jsonl"
CACHE = Path(os.environ.get("SQ_EXPERIMENT_CACHE", "/tmp/sq_zoo"))

from experiments._rows import append_row, t_interval  # noqa: E402
from sq_lightning.config import SnapConfig
from sq_lightning import ClusterRefine, SoftQuantCallback  # noqa: E402
from sq_lightning.models.batchnorm import recalibrate_batchnorm  # noqa: E402
from sq_lightning.ops.baselines import heq_quantize, kmeans_quantize  # noqa: E402
from sq_lightning.ops.clustering import Clusters  # noqa: E402


# -- models -------------------------------------------------------------------------------

class Classifier(pl.LightningModule):
    """``net`` trained by cross-entropy with SGD (momentum 0.9) or AdamW."""

    def __init__(self, net: nn.Module, opt: str, lr: float, wd: float):
        super().__init__()
        self.net, self.opt, self.lr, self.wd = net, opt, lr, wd

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.wd)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.wd)


class NoForward(pl.LightningModule):
    """The common pattern the defaults must survive: the network in ``self.model``, no ``forward``
    (with BatchNorm, whose statistics the snap re-estimates through ``training_step``)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128),
                                   nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


class Setup:
    """One zoo entry: how to build, train and score the model."""

    def __init__(self, build: Callable[[], pl.LightningModule], data: Callable[[int], tuple], metric: str,
                 pretrain_epochs: int, couple: int, refine: int, limit: int | None, checkpoint: str | None = None,
                 timed_steps: int = 12):
        self.build, self.data, self.metric = build, data, metric
        self.pretrain_epochs, self.couple, self.refine, self.limit = pretrain_epochs, couple, refine, limit
        self.checkpoint, self.timed_steps = checkpoint, timed_steps


def _digits(seed: int):
    from sq_lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")  # the held-out split of seed 0 for every seed: the starting model never saw it
    dm.seed = seed  # the seed sets the order of the training batches only
    return dm.train_dataloader(), dm.val_dataloader()


def _cifar(batch_size: int):
    def make(seed: int):
        from sq_lightning.data import CIFAR10DataModule

        dm = CIFAR10DataModule(batch_size=batch_size, limit_train=10000, seed=seed)
        dm.setup("fit")
        return dm.train_dataloader(), dm.val_dataloader()
    return make


def _shakespeare(seed: int):
    from sq_lightning.data import ShakespeareDataModule

    dm = ShakespeareDataModule(block_size=128, batch_size=32, batches_per_epoch=100, seed=seed)
    dm.setup("fit")
    return dm.train_dataloader(), dm.val_dataloader()


def _resnet20():
    from sq_lightning.models import ImageClassifier

    return ImageClassifier(arch="resnet20", lr=0.01, schedule="constant", weight_decay=5e-4,
                           init_from=str(ROOT / "experiments" / "checkpoints" / "resnet20_cifar10_fp.ckpt"))


def _gpt():
    from sq_lightning.models import CharLanguageModel

    return CharLanguageModel(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=192, lr=3e-4,
                             weight_decay=0.1, warmup_steps=0, schedule="constant",
                             init_from=str(ROOT / "experiments" / "checkpoints" / "shakespeare_gpt_fp.ckpt"))


def _torchvision(name: str, opt: str, lr: float, wd: float):
    def make():
        import torchvision

        return Classifier(getattr(torchvision.models, name)(num_classes=10), opt, lr, wd)
    return make


SETUPS = {
    "digits-mlp": Setup(lambda: Classifier(_mlp(), "sgd", 0.05, 0.0), _digits, "acc", 10, 8, 4, None, timed_steps=22),
    "no-forward": Setup(NoForward, _digits, "acc", 10, 8, 4, None, timed_steps=22),
    "resnet20": Setup(_resnet20, _cifar(128), "acc", 0, 2, 1, 60, checkpoint="committed"),
    "resnet18": Setup(_torchvision("resnet18", "adamw", 1e-3, 1e-4), _cifar(32), "acc", 6, 3, 1, 80),
    "mobilenetv2": Setup(_torchvision("mobilenet_v2", "sgd", 0.05, 4e-5), _cifar(32), "acc", 6, 3, 1, 80),
    "gpt": Setup(_gpt, _shakespeare, "loss", 0, 2, 1, None, checkpoint="committed"),
}


# -- helpers ------------------------------------------------------------------------------

def _trainer(epochs: int, callbacks, limit=None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      limit_train_batches=limit, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)


def _network(module: pl.LightningModule) -> nn.Module:
    return module.model if isinstance(module, (NoForward,)) else module


@torch.no_grad()
def evaluate(module: pl.LightningModule, val, metric: str, limit: int = 2000) -> float:
    net = _network(module)
    net.eval()
    total = count = 0.0
    for x, y in val:
        out = net(x)
        if metric == "acc":
            total += float((out.argmax(-1) == y).sum())
            count += len(y)
        else:
            total += float(nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        if metric == "acc" and count >= limit:
            break
    net.train()
    return total / count


def pretrained(name: str, train) -> pl.LightningModule:
    setup = SETUPS[name]
    module = setup.build()
    if setup.checkpoint == "committed":
        return module
    path = CACHE / f"{name}.pt"
    if path.exists():
        module.load_state_dict(torch.load(path, weights_only=True))
        return module
    pl.seed_everything(0)
    module = setup.build()
    start = time.perf_counter()
    _trainer(setup.pretrain_epochs, []).fit(module, train)
    print(f"{name}: pretrained {setup.pretrain_epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return module


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _ptq(base: pl.LightningModule, ks: dict[str, int], method: str, train) -> pl.LightningModule:
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    quantize = heq_quantize if method == "heq" else kmeans_quantize
    with torch.no_grad():
        for n, k in ks.items():
            params[n].copy_(quantize(params[n].detach(), k).values)
    if _has_bn(model):
        recalibrate_batchnorm(_network(model), train, 20)
    return model


class _StepTimer(pl.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def step_ratio(base: pl.LightningModule, train, steps: int, rounds: int = 3) -> float:
    """Mean step time with the default coupling over plain training (first 2 steps of each run dropped)."""
    plain, coupled = [], []
    for _ in range(rounds):
        for sink, callbacks in ((plain, []), (coupled, [SoftQuantCallback(histogram_every_n_epochs=0)])):
            timer = _StepTimer()
            pl.seed_everything(0)
            _trainer(1, callbacks + [timer], limit=steps).fit(copy.deepcopy(base), train)
            sink += timer.times[2:]
    return statistics.mean(coupled) / statistics.mean(plain)


def run(name: str, seed: int) -> dict:
    setup = SETUPS[name]
    base = pretrained(name, setup.data(0)[0])  # the starting model is trained once, on seed 0's order
    train, val = setup.data(seed)  # the seed sets the order of the compression batches
    row: dict = {"model": name, "seed": seed, "metric": setup.metric, "couple_epochs": setup.couple,
                 "refine_epochs": setup.refine, "batches_per_epoch": setup.limit}
    row["fp"] = evaluate(base, val, setup.metric)

    pl.seed_everything(seed)
    model = copy.deepcopy(base)
    soft, refine = SoftQuantCallback(stop_epoch=setup.couple), ClusterRefine()
    start = time.perf_counter()
    _trainer(setup.couple + setup.refine, [soft, refine], setup.limit).fit(model, train)
    row["seconds"] = round(time.perf_counter() - start, 1)
    reps = refine.snapper.reports
    ks = {n: r.k for n, r in reps.items() if r.snapped}
    numel = {n: r.numel for n, r in reps.items()}
    row["default"] = evaluate(model, val, setup.metric)
    row["layers"], row["clustered"] = len(reps), sum(r.clustered for r in reps.values())
    row["unclustered"] = {n: round(r.snap_error, 3) for n, r in reps.items() if not r.clustered}
    bits = {n: (math.log2(ks[n]) if ks[n] > 1 else 0.0) if n in ks else 32.0 for n in reps}
    row["bits"] = sum(bits[n] * numel[n] for n in reps) / sum(numel.values())
    row["k"] = ks

    row["ptq_heq"] = evaluate(_ptq(base, ks, "heq", train), val, setup.metric)
    row["ptq_kmeans"] = evaluate(_ptq(base, ks, "kmeans", train), val, setup.metric)

    pl.seed_everything(seed)
    control = copy.deepcopy(base)
    params = dict(control.named_parameters())
    clusters = {n: Clusters.from_quantization(kmeans_quantize(params[n].detach(), k)) for n, k in ks.items()}
    fixed = ClusterRefine(snap_epoch=0, snap=SnapConfig(on_unclustered="snap")).snap_to(clusters)
    _trainer(setup.couple + setup.refine, [fixed], setup.limit).fit(control, train)
    row["kmeans_refine"] = evaluate(control, val, setup.metric)

    row["step_ratio"] = round(step_ratio(base, train, setup.timed_steps), 3)
    return row


def _append(row: dict, argv: list[str]) -> None:
    append_row(ROWS, row, "zoo.py", argv)
    print(json.dumps({k: v for k, v in row.items() if k not in ("k", "command")}), flush=True)


# -- report -------------------------------------------------------------------------------

def _mean(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f}" if xs else "-"


def _diff_ci(a: list[float], b: list[float]) -> str:
    """Mean of the paired differences a - b with a 95% t interval; 'tie' when it contains 0."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return f"{d[0]:+.4f} (1 seed)"
    m, half = t_interval(d)
    tag = "tie" if m - half <= 0 <= m + half else ("better" if m > 0 else "worse")
    return f"{m:+.4f} ± {half:.4f} ({tag})"


def report() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    lines = [
        "# Model zoo: the default recipe on models it was not tuned on",
        "",
        "Generated by `python experiments/zoo.py --report` from `experiments/results/zoo.jsonl`; the",
        "protocol is in the script's docstring. Every model: `SoftQuantCallback(stop_epoch=C)` then",
        "`ClusterRefine()`, all other arguments default. Metric: accuracy on 2,000 CIFAR-10 test images",
        "or the digits validation split (higher is better), or GPT validation loss in nats per",
        "character (lower is better). `clustered`: selected layers whose own clusters snapped",
        "within `max_snap_error` (the rest go to the k-means fallback). Differences are",
        "`default - control` signed so that positive means the default is better, with a 95% t",
        "interval over seeds; one seed gives no interval. ResNet-18 and MobileNetV2 start from a",
        "short pretraining (6 epochs on 10,000 images), far from converged: the extra epochs of the",
        "recipe raise their accuracy, so read them against the controls at equal steps, not fp.",
        "",
        "| model | seeds | C+R epochs | fp | default | bits | clustered | PTQ HEQ | PTQ k-means "
        "| k-means + refine | default vs PTQ k-means | default vs k-means + refine | step ratio |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for name in SETUPS:
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue
        sign = 1.0 if rs[0]["metric"] == "acc" else -1.0
        col = lambda key: [r[key] for r in rs]  # noqa: E731
        signed = lambda key: [sign * v for v in col(key)]  # noqa: E731
        clustered = f"{sum(col('clustered'))}/{sum(col('layers'))}"
        lines.append(
            f"| {name} | {len(rs)} | {rs[0]['couple_epochs']}+{rs[0]['refine_epochs']} | {_mean(col('fp'))} "
            f"| {_mean(col('default'))} | {statistics.mean(col('bits')):.2f} | {clustered} | {_mean(col('ptq_heq'))} "
            f"| {_mean(col('ptq_kmeans'))} | {_mean(col('kmeans_refine'))} "
            f"| {_diff_ci(signed('default'), signed('ptq_kmeans'))} "
            f"| {_diff_ci(signed('default'), signed('kmeans_refine'))} | {statistics.mean(col('step_ratio')):.2f} |"
        )
    loose = [(r["model"], r["seed"], n, e) for r in rows for n, e in r.get("unclustered", {}).items()]
    if loose:
        lines += ["", "Layers that did not cluster (quantized by the k-means fallback; its relative snap error):", ""]
        lines += [f"- {m} seed {s}: `{n}` ({e})" for m, s, n, e in loose]
    lines += ["", "Commands:", ""] + sorted({f"- `{r['command']}`" for r in rows})
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(SETUPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--report", action="store_true")
    ns = p.parse_args(argv)
    if ns.report:
        (RESULTS / "zoo.md").write_text(report())
        print(RESULTS / "zoo.md")
        return 0
    if ns.model is None:
        p.error("--model is required (or --report)")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    for seed in ns.seeds:
        _append(run(ns.model, seed), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
