"""Command line: ``lightning fit --config configs/<stage>.yaml`` (also ``sq-lightning``
and ``python -m sq_lightning``).

A thin :class:`~lightning.pytorch.cli.LightningCLI`: any LightningModule and
LightningDataModule can be named by ``class_path``, callbacks are added in YAML, and
``fit``/``validate``/``test``/``predict`` and ``--print_config`` work as documented by
Lightning. The only project default is the logger: TensorBoard under ``runs/``.
One subcommand of the project's own: ``export CHECKPOINT PATH [--coding ans]`` writes
the snapped model of a checkpoint as a compressed file (:func:`export_main`).
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["export_main", "main"]

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs"},
    },
}


def main(args: ArgsType = None) -> None:
    """Runs the CLI on ``args`` (a list of strings, or ``None`` for ``sys.argv[1:]``).

    Returns ``None`` so that console scripts exit with status 0 on success.
    Besides Lightning's subcommands, ``export CHECKPOINT PATH [--coding ans]`` writes a
    checkpoint's snapped model with :func:`sq_lightning.export.export_checkpoint`.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:
        export_main(argv[1:])
        return
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
    """``export CHECKPOINT PATH [--coding packed|ans] [--overwrite]``: a checkpoint's snapped
    model as a compressed file (:func:`sq_lightning.export.export_checkpoint`)."""
    from sq_lightning.export import CODINGS, export_checkpoint

    parser = argparse.ArgumentParser(
        prog="sq-lightning export",
        description="Write the model of a checkpoint saved after ClusterRefine's snap as codebooks + indices "
        "(safetensors); read it back with sq_lightning.load_compressed.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by a Trainer that ran ClusterRefine, after the snap")
    parser.add_argument("path", help="the file to write (.safetensors)")
    parser.add_argument("--coding", choices=CODINGS, default="packed",
                        help="packed: ceil(log2 K) bits per index; ans: entropy-coded (default: packed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at PATH")
    ns = parser.parse_args(argv)
    try:
        report = export_checkpoint(ns.checkpoint, ns.path, coding=ns.coding, overwrite=ns.overwrite)
    except FileExistsError:
        parser.exit(2, f"sq-lightning export: error: {ns.path!r} exists; pass --overwrite to replace it.\n")
    except ValueError as err:
        parser.exit(2, f"sq-lightning export: error: {err}\n")
    print(report)


if __name__ == "__main__":
    main()
