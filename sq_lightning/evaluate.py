"""Post-training baselines at the same per-layer ``K_l`` as a clustered model.

The soft quantization paper (arXiv:2601.21219) compares against histogram-equalized
post-training quantization (HEQ) with the same number of levels per layer. This module
quantizes a full-precision model with HEQ, optimal 1-D k-means and uniform levels at the
``K_l`` read from a clustered model, evaluates each with and without BatchNorm
recalibration, and prints a table beside the clustered model's own accuracy.

Command line::

    python -m sq_lightning.evaluate --reference runs/.../pretrain/checkpoints/best.ckpt \\
        --quantized runs/.../refine/checkpoints/last.ckpt --data cifar10
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import nn

from sq_lightning.layers import LayerSelector
from sq_lightning.models.batchnorm import recalibrate_batchnorm
from sq_lightning.ops.baselines import quantize

log = logging.getLogger(__name__)

METHODS = ("heq", "kmeans", "uniform")


def clusters_per_layer(model: nn.Module, selector: Optional[LayerSelector] = None) -> dict[str, int]:
    """``K_l`` of every selected layer, counted as distinct weight values (exact after refinement)."""
    selector = selector or LayerSelector()
    return {name: int(torch.unique(p.detach()).numel()) for name, p in selector.select(model)}


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` batches ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1)
        correct += int((pred == y.to(device)).sum())
        total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("`loader` yielded no batch: nothing to evaluate.")
    return correct / total


@torch.no_grad()
def quantize_model(model: nn.Module, ks: dict[str, int], method: str) -> nn.Module:
    """A copy of ``model`` whose layers in ``ks`` are quantized post-training to ``ks[name]`` levels."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    missing = sorted(set(ks) - set(params))
    if missing:
        raise ValueError(f"`ks` names layers the model does not have: {missing}. Were both models built alike?")
    for name, k in ks.items():
        params[name].copy_(quantize(params[name], k, method).values)
    return out


def evaluate_baselines(
    reference: nn.Module,
    ks: dict[str, int],
    val_loader: Iterable,
    train_loader: Optional[Iterable] = None,
    methods: Sequence[str] = METHODS,
    recalibrate_batches: int = 100,
) -> list[dict]:
    """Accuracy of each post-training baseline at the same ``K_l``, raw and BN-recalibrated.

    Returns one row per method: ``{"method", "acc", "acc_bn"}`` (``acc_bn`` is ``None``
    without ``train_loader`` or when the model has no BatchNorm).
    """
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules())
    rows = [{"method": "full precision", "acc": accuracy(reference, val_loader), "acc_bn": None}]
    for method in methods:
        q = quantize_model(reference, ks, method)
        row = {"method": f"{method} (post-training)", "acc": accuracy(q, val_loader), "acc_bn": None}
        if train_loader is not None and has_bn and recalibrate_batches:
            recalibrate_batchnorm(q, train_loader, recalibrate_batches)
            row["acc_bn"] = accuracy(q, val_loader)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<28} {'acc':>8} {'acc (BN recal.)':>16}"]
    for r in rows:
        bn = f"{r['acc_bn']:.4f}" if r.get("acc_bn") is not None else "-"
        lines.append(f"{r['method']:<28} {r['acc']:>8.4f} {bn:>16}")
    return "\n".join(lines)


def _load_classifier(path: str):
    from sq_lightning.models import ImageClassifier

    module = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    return module.model.eval()


def _datamodule(name: str, archive: Optional[str], batch_size: int):
    if name == "cifar10":
        from sq_lightning.data import CIFAR10DataModule

        return CIFAR10DataModule(archive=archive, batch_size=batch_size)
    if name == "digits":
        from sq_lightning.data import DigitsDataModule

        return DigitsDataModule(batch_size=batch_size)
    raise ValueError(f"`--data` must be 'cifar10' or 'digits', got {name!r}.")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m sq_lightning.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="full-precision ImageClassifier checkpoint")
    parser.add_argument("--quantized", required=True, help="clustered ImageClassifier checkpoint (K_l are read from it)")
    parser.add_argument("--data", default="cifar10", choices=["cifar10", "digits"])
    parser.add_argument("--archive", default=None, help="CIFAR-10 archive (default: the data module's search)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--recalibrate-batches", type=int, default=100, help="0 disables BatchNorm recalibration")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)

    reference, quantized = _load_classifier(args.reference), _load_classifier(args.quantized)
    ks = clusters_per_layer(quantized)
    dm = _datamodule(args.data, args.archive, args.batch_size)
    dm.setup("fit")
    rows = evaluate_baselines(reference, ks, dm.val_dataloader(), dm.train_dataloader(), args.methods, args.recalibrate_batches)
    rows.insert(1, {"method": "clustered model", "acc": accuracy(quantized, dm.val_dataloader()), "acc_bn": None})
    print("K_l per layer: " + ", ".join(f"{n}={k}" for n, k in ks.items()))
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
