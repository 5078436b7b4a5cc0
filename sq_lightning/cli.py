"""Command line: ``lightning fit --config configs/<stage>.yaml`` (also ``sq-lightning``
and ``python -m sq_lightning``).

A thin :class:`~lightning.pytorch.cli.LightningCLI`: any LightningModule and
LightningDataModule can be named by ``class_path``, callbacks are added in YAML, and
``fit``/``validate``/``test``/``predict`` and ``--print_config`` work as documented by
Lightning. The only project default is the logger: TensorBoard under ``runs/``.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["main"]

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs"},
    },
}


def main(args: ArgsType = None) -> None:
    """Runs the CLI on ``args`` (a list of strings, or ``None`` for ``sys.argv[1:]``).

    Returns ``None`` so that console scripts exit with status 0 on success.
    """
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


if __name__ == "__main__":
    main()
