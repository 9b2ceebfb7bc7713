"""The training tasks (paper Sec. 2.2) as data: one `Task` entry each, read by every source, the
mixture, the CLI's --mix and the feature function. A new task is one entry in `TASKS`.

A task says what its samples hold (a prompt, and what it is called in messages; reference
images), what the encoder sees (the prompt text and/or the reference images) and so what its
features depend on (`cond_id`): prompt-only features are shared by every sample with that prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def text_id(text: str) -> str:
    """A stable id for a piece of text (cache keys of prompts shared by many samples)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    """One training task: what a sample needs and what its conditioning is made of."""

    name: str
    # what the prompt is called in messages ("caption", "instruction"); None: the task has no
    # prompt (the encoder gets "" and the images alone, whatever text a row carries)
    prompt: str | None
    images: bool  # the encoder also gets the sample's reference images (one or more)
    target_is_source: bool = False  # a sample that names no reference image uses its target
    paper_ratio: float = 0.0  # its share of the paper's mix (Sec. 2.2)

    def check(self, prompt: str | None, num_images: int) -> str:
        """The prompt the encoder gets, or ValueError saying what the sample lacks."""
        if self.images and num_images == 0:
            raise ValueError(f"{self.name} samples need one or more source images ('sources')")
        if not self.images and num_images:
            raise ValueError(f"{self.name} samples take no source images, got {num_images}; "
                             f"give the row another task (e.g. 'edit') or drop its 'sources'")
        if self.prompt is None:
            return ""
        if prompt is None:
            raise ValueError(f"missing {self.prompt}")
        if not prompt.strip():
            raise ValueError(f"empty {self.prompt}")
        return prompt.strip()

    def cond_id(self, id: str, prompt: str) -> str:
        """What a sample's encoder features depend on: the prompt alone is shared by every sample
        with that prompt (and cached once); with images, the sample itself."""
        return id if self.images else text_id(prompt)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("t2i", prompt="caption", images=False, paper_ratio=0.85),  # text only
    Task("reconstruction", prompt=None, images=True, target_is_source=True, paper_ratio=0.05),  # image only
    Task("edit", prompt="instruction", images=True, paper_ratio=0.10),  # text + images
)}

# The paper's mix: 85 % text / 5 % image (reconstruction) / 10 % text-image.
PAPER_RATIOS: dict[str, float] = {t.name: t.paper_ratio for t in TASKS.values() if t.paper_ratio}


def get_task(name: object) -> Task:
    """The task called `name`, or ValueError naming the known ones."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {tuple(TASKS)}")
    return TASKS[name]
