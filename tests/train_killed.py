"""Test helper: the training CLI, SIGKILLed after a given step (as a crash would).

    python tests/train_killed.py STEP[:SIGNAL] [the flags of python -m unifusion_core.train]

STEP:TERM (or :USR1) sends that signal instead, as a scheduler's preemption does, to the rank
given by the environment variable SIGNAL_RANK (default: every rank), or with SIGNAL_PARENT=1 to
the process that launched it (torchrun, as a scheduler signals the job's main process). Also as torchrun's script:
every rank kills itself after STEP. The kill comes from the Trainer's `on_step_end` hook, so the
shipped trainer carries no test-only code.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from unifusion_core.train import __main__ as cli

SCRIPT = Path(__file__).resolve()


def kill_after(step: int, sig: signal.Signals = signal.SIGKILL):
    """An on_step_end hook that sends `sig` to this process once `step` steps are done."""
    rank, parent = os.environ.get("SIGNAL_RANK"), os.environ.get("SIGNAL_PARENT") == "1"

    def on_step_end(trainer: cli.Trainer) -> None:
        if trainer.step == step and (rank is None or int(rank) == trainer.dist.rank):
            os.kill(os.getppid() if parent else os.getpid(), sig)

    return on_step_end


def main(argv: list[str]) -> None:
    step, _, name = argv[0].partition(":")
    step, sig = int(step), getattr(signal, f"SIG{name or 'KILL'}")

    class KilledTrainer(cli.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, on_step_end=kill_after(step, sig), **kwargs)

    cli.Trainer = KilledTrainer  # the CLI builds its Trainer from this name
    cli.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
