"""Test helper: the training CLI, SIGKILLed after a given step (as a crash or a preemption would).

    python tests/train_killed.py STEP [the flags of python -m unifusion_core.train]

Also as torchrun's script: every rank kills itself after STEP. The kill comes from the Trainer's
`on_step_end` hook, so the shipped trainer carries no test-only code.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from unifusion_core.train import __main__ as cli

SCRIPT = Path(__file__).resolve()


def kill_after(step: int):
    """An on_step_end hook that SIGKILLs this process once `step` steps are done."""

    def on_step_end(trainer: cli.Trainer) -> None:
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step_end


def main(argv: list[str]) -> None:
    step = int(argv[0])

    class KilledTrainer(cli.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, on_step_end=kill_after(step), **kwargs)

    cli.Trainer = KilledTrainer  # the CLI builds its Trainer from this name
    cli.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
