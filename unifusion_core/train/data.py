"""Training data: a `Sample` of a task (tasks.py), and what a source of them is.

A `Sample` is one training example; every cache (latents, encoder features) is keyed by its `id`
(never by loader position: diffusers #14430 paired cached latents with the wrong captions).
A source is anything with `__len__` and `get(index) -> Sample` that raises `BadSample` (with the
file named) for data it cannot use; the trainer skips, counts and logs those. The sources are in
sources.py, the mixture that draws from them in mixture.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from .tasks import TASKS


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, missing caption, ...); the message names the file."""


@dataclass
class Sample:
    """One training example.

    target: the image to generate, (3, H, W) float in 0..1 (or None when `latent` is given).
    prompt: caption (t2i) or instruction (edit); "" for reconstruction.
    images: reference / source images for the VLM (PIL images or (3, H, W) 0..1 tensors), for the
    tasks whose conditioning has images.
    cond_id: what the encoder features depend on (prompt + reference images); samples that share
    it share cached features. Defaults to `id`.
    """

    id: str
    task: str
    prompt: str = ""
    target: Tensor | None = None
    images: list = field(default_factory=list)
    latent: Tensor | None = None  # model-space latent when already encoded (cache)
    cond_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ValueError(f"sample {self.id!r}: task must be one of {tuple(TASKS)}, got {self.task!r}")
        if self.images and not TASKS[self.task].images:
            raise ValueError(f"sample {self.id!r}: {self.task} samples take no images, got {len(self.images)}")
        if not self.cond_id:
            self.cond_id = self.id


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int) -> Sample: ...
