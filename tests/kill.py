"""A callback that SIGKILLs its own process, for resume tests at the level of the command.

Added to a ``lightning fit`` run with ``--trainer.callbacks+=tests.kill.KillAtEpoch``: the
process dies at the start of epoch ``epoch``, after the checkpoints of the epoch before
were written, with no chance to clean up (as a machine that loses power or a job killed
by a scheduler).
"""

import os
import signal

from lightning.pytorch import Callback


class KillAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
