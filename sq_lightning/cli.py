"""Command line: ``lightning fit --config configs/<stage>.yaml`` (also ``sq-lightning``
and ``python -m sq_lightning``).

A thin :class:`~lightning.pytorch.cli.LightningCLI`: any LightningModule and
LightningDataModule can be named by ``class_path``, callbacks are added in YAML, and
``fit``/``validate``/``test``/``predict`` and ``--print_config`` work as documented by
Lightning. The only project default is the logger: TensorBoard under ``runs/``.
One subcommand of the project's own: ``export CHECKPOINT PATH [--format safetensors|coreml|onnx]``
writes the snapped model of a checkpoint as a compressed file, a palettized Core ML package or
an ONNX file (:func:`export_main`).
"""

from __future__ import annotations

import argparse
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from sq_lightning.config import MOVED, reject_moved

__all__ = ["export_main", "main"]

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs"},
    },
}


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(argv: list[str]) -> None:
    """Fails for a ``ClusterRefine`` in a ``--config`` file that uses a key of an earlier
    version (``gap``, ``max_bits``, ``reassign``, ``export_path``, ``refine: false``, ...),
    naming the key's new place, before LightningCLI's generic "unexpected key" error.

    Raises:
        SystemExit: such a key, with the message.
    """
    import yaml

    for path in _config_paths(argv):
        if not os.path.isfile(path):
            continue  # LightningCLI reports a missing file
        with open(path) as f:
            try:
                cfg = yaml.safe_load(f)
            except yaml.YAMLError:
                continue  # LightningCLI reports the syntax error
        callbacks = ((cfg or {}).get("trainer") or {}).get("callbacks") if isinstance(cfg, dict) else None
        for cb in callbacks if isinstance(callbacks, list) else []:
            if not (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ClusterRefine")):
                continue
            init = cb.get("init_args") or {}
            if not isinstance(init, dict):
                continue
            msgs = []
            old = {k: v for k, v in init.items() if k in MOVED}
            if old:
                try:
                    reject_moved("ClusterRefine", old)
                except TypeError as err:
                    msgs.append(str(err))
            if isinstance(init.get("refine"), bool):
                msgs.append("ClusterRefine: `refine: false` is now `refine: null`; `refine: true` is the default "
                            "(leave it out).")
            if msgs:
                raise SystemExit(f"{path}: " + " ".join(msgs))


def main(args: ArgsType = None) -> None:
    """Runs the CLI on ``args`` (a list of strings, or ``None`` for ``sys.argv[1:]``).

    Returns ``None`` so that console scripts exit with status 0 on success.
    Besides Lightning's subcommands, ``export CHECKPOINT PATH [--format ...]`` writes a
    checkpoint's snapped model (:func:`export_main`).
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:
        export_main(argv[1:])
        return
    if isinstance(argv, list):
        check_config_files(argv)
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


def export_main(argv: list[str]) -> None:
    """``export CHECKPOINT PATH [--format safetensors|coreml|onnx] ...``: a checkpoint's snapped model
    as a compressed file (:func:`sq_lightning.export.export_checkpoint`, the default), a Core ML
    package with palettized weights (:func:`sq_lightning.deploy.export_coreml`) or an ONNX file
    with codebook + indices weights (:func:`sq_lightning.deploy.export_onnx`); the last two are
    checked after writing (:func:`~sq_lightning.deploy.verify_coreml`, :func:`~sq_lightning.deploy.verify_onnx`)."""
    from sq_lightning.export import CODINGS, export_checkpoint

    parser = argparse.ArgumentParser(
        prog="sq-lightning export",
        description="Write the model of a checkpoint saved after ClusterRefine's snap as codebooks + indices: "
        "safetensors (read it back with sq_lightning.load_compressed), a Core ML .mlpackage whose clustered "
        "weights are lookup tables, or an ONNX file whose clustered weights are codebook + uint8 indices "
        "(Core ML and ONNX need `pip install 'sq_lightning[deploy]'`).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by a Trainer that ran ClusterRefine, after the snap")
    parser.add_argument("path", help="the file to write (.safetensors, .mlpackage or .onnx)")
    parser.add_argument("--format", choices=("safetensors", "coreml", "onnx"), default="safetensors",
                        help="safetensors (default): sq_lightning's compressed file; coreml: .mlpackage with "
                        "palettized weights; onnx: Gather(codebook, indices) weights")
    parser.add_argument("--coding", choices=CODINGS, default="packed",
                        help="safetensors only: packed: ceil(log2 K) bits per index; ans: entropy-coded (default: packed)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                        help="coreml only: dtype of the lookup-table entries and other weights (default: fp16)")
    parser.add_argument("--target", choices=("iOS16", "iOS17", "iOS18"), default="iOS16",
                        help="coreml only: minimum deployment target (default: iOS16; iOS18 adds 3-bit LUTs)")
    parser.add_argument("--opset", type=int, default=17, help="onnx only: ONNX opset (default: 17)")
    parser.add_argument("--index-dtype", choices=("uint8", "uint4"), default="uint8",
                        help="onnx only: stored index type; uint4 (opset 21) for layers with K <= 16 (default: uint8)")
    parser.add_argument("--model-class", default=None,
                        help="coreml/onnx: the checkpoint's LightningModule class as module.Class, when it is not "
                        "sq_lightning's ImageClassifier or CharLanguageModel")
    parser.add_argument("--no-verify", action="store_true", help="coreml/onnx: skip reading the file back to check it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at PATH")
    ns = parser.parse_args(argv)
    prog = "sq-lightning export: error: "
    try:
        if ns.format == "safetensors":
            report = export_checkpoint(ns.checkpoint, ns.path, coding=ns.coding, overwrite=ns.overwrite)
        else:
            report = _export_deploy(ns)
    except FileExistsError:
        parser.exit(2, f"{prog}{ns.path!r} exists; pass --overwrite to replace it.\n")
    except ImportError as err:
        parser.exit(2, f"{prog}{err}\n")
    except (ValueError, RuntimeError) as err:
        parser.exit(2, f"{prog}{err}\n")
    print(report)


def _export_deploy(ns: argparse.Namespace):
    """``--format coreml|onnx``: export, then verify unless ``--no-verify``."""
    import importlib

    from sq_lightning import deploy

    model = None
    if ns.model_class:
        module_name, _, cls_name = ns.model_class.rpartition(".")
        try:
            model = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"--model-class {ns.model_class!r} cannot be imported ({err}).") from err
    # Check the optional dependencies before the (slower) model loading and tracing.
    needed = ("coremltools",) if ns.format == "coreml" else ("onnx", "onnxruntime")
    for name in needed:
        deploy._require(name, f"--format {ns.format}")
    cm = deploy.load_clustered(ns.checkpoint, model=model)
    if ns.format == "coreml":
        report = deploy.export_coreml(cm.module, ns.path, clusters=cm.clusters, example_input=cm.example_input,
                                      precision=ns.precision, target=ns.target, overwrite=ns.overwrite)
        check = None if ns.no_verify else deploy.verify_coreml(ns.path, cm)
        summary = check and f"verified: {len(check.layers)} lookup tables ({check.lut_dtype}) hold their centroids"
    else:
        report = deploy.export_onnx(cm.module, ns.path, clusters=cm.clusters, example_input=cm.example_input,
                                    opset=ns.opset, index_dtype=ns.index_dtype, overwrite=ns.overwrite)
        check = None if ns.no_verify else deploy.verify_onnx(ns.path, cm)
        summary = check and (f"verified: {len(check.layers)} codebook + indices weights; onnxruntime vs torch "
                             f"max |diff| {check.max_abs_diff:.2e}")
    return f"{report}\n{summary}" if summary else str(report)


if __name__ == "__main__":
    main()
