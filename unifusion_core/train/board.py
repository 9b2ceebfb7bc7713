"""TensorBoard beside metrics.jsonl (optional: `pip install -c constraints.txt tensorboard`).

`Metrics` is the run's metrics.jsonl as the loop writes it (one JSON record a line); with a
`Board` it also hands every record to TensorBoard, so the event files hold exactly what the JSON
lines hold: every number of a record is a scalar (train/loss, train/grad_norm, train/lr,
train/samples_per_s, train/tokens_per_s, train/mfu, ...; lists by index, e.g.
train/memory_gib_per_rank/0, and the loss's timestep quarters as train/loss_by_t/t0.00-0.25;
dicts by key, e.g. validation/heldout), and a record's samples grid and the scenes' validation
grid are images ("samples", "validation"). Only rank 0 writes (the others' metrics go to os.devnull).
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import numpy as np

INSTALL = "pip install -c constraints.txt tensorboard  (or: pip install -c constraints.txt -r requirements-train.txt)"


def summary_writer():
    """torch's SummaryWriter class, or ImportError saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise ImportError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None
    return SummaryWriter


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record as TensorBoard tags (see the module docstring)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, numbers.Number):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            # the training loss's timestep bins (quarters of [0, 1]) by their range, other lists by index
            names = ([f"t{i / len(value):.2f}-{(i + 1) / len(value):.2f}" for i in range(len(value))]
                     if prefix == "train/loss_by_t" else [str(i) for i in range(len(value))])
            for name, v in zip(names, value):
                walk(f"{prefix}/{name}", v)

    for key, value in record.items():
        if key == "step" or (key == "samples" and isinstance(value, dict)):
            continue  # the step is the x axis; a samples entry is an image
        walk(key if isinstance(value, dict) else f"train/{key}", value)
    return out


class Board:
    """TensorBoard event files in `log_dir` (RUN/tensorboard). purge_step: on a resume from the
    state of step s, s + 1: the events the run before the resume wrote from there on are dropped
    (TensorBoard shows the resumed curve, not both)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.run = Path(log_dir).parent
        self.writer = summary_writer()(log_dir=str(log_dir), purge_step=purge_step or None)

    def log(self, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        for key in ("samples", "validation"):  # the samples grid; the scenes' validation grid
            grid = record.get(key, {}).get("grid") if isinstance(record.get(key), dict) else None
            if isinstance(grid, str) and (self.run / grid).is_file():
                from PIL import Image

                with Image.open(self.run / grid) as im:
                    self.writer.add_image(key, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Metrics:
    """metrics.jsonl, opened for appending; each record written also goes to the board, if any.
    step: the step the run starts from; the records of later steps already in the file (a run
    killed after its last state logged them, and the resumed run logs those steps again) are
    dropped first, with a last line cut short by the kill, as TensorBoard's purge_step drops its
    events: the file holds each step once."""

    def __init__(self, path: str | Path, board: Board | None = None, step: int | None = None):
        path = Path(path)
        if step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _before(line, step)]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        self.file, self.board, self.pending = path.open("a"), board, ""

    def write(self, text: str) -> int:
        n = self.file.write(text)
        if self.board is not None:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                if line.strip():
                    self.board.log(json.loads(line))
        return n

    def flush(self) -> None:
        self.file.flush()
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of step <= `step` (or of no step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    at = record.get("step") if isinstance(record, dict) else None
    return line.endswith("\n") and (not isinstance(at, int) or at <= step)
