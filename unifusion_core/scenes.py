"""Synthetic compositional scenes: a prompt grammar, an exact renderer and a fixed held-out split.

The scenes are flat coloured shapes on a black canvas, so a generated image can be scored exactly
(`unifusion_core.eval`) with no judge model to err. Two prompt kinds:

    single: "a red circle on the left"              (colour, shape, position)
    pair:   "a red circle to the left of a blue square"   (two objects and their relation)

Every prompt has a fixed split ("train" or "heldout") derived from its text alone, so the
held-out compositions are never seen in training whatever the seed or the vocabulary order.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

# Colours as they are drawn (RGB 0..255); far apart so that the nearest one is never in doubt.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 210),
    "white": (240, 240, 240),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
# Position phrase -> object centre as a fraction of the canvas (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.22, 0.5),
    "on the right": (0.78, 0.5),
    "at the top": (0.5, 0.22),
    "at the bottom": (0.5, 0.78),
    "in the center": (0.5, 0.5),
}
# Relation phrase -> centres of (first, second) object.
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "to the left of": ((0.27, 0.5), (0.73, 0.5)),
    "above": ((0.5, 0.27), (0.5, 0.73)),
}
OBJECT_SIZE = 0.30  # side of an object's bounding box, as a fraction of the canvas
JITTER = 0.05  # uniform jitter of each centre, as a fraction of the canvas
HELDOUT_FRACTION = 0.1
EXAMPLE = "a red circle to the left of a blue square"  # a prompt of the grammar, for help texts


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: one object at a position, or two objects in a relation."""

    objects: tuple[SceneObject, ...]
    position: str | None = None  # single-object scenes
    relation: str | None = None  # two-object scenes

    @property
    def prompt(self) -> str:
        a = self.objects[0]
        if self.relation is None:
            return f"a {a.color} {a.shape} {self.position}"
        b = self.objects[1]
        return f"a {a.color} {a.shape} {self.relation} a {b.color} {b.shape}"

    @property
    def kind(self) -> str:
        return "single" if self.relation is None else "pair"

    @property
    def split(self) -> str:
        return split_of(self.prompt)


def split_of(prompt: str) -> str:
    """'heldout' for a fixed ~10 % of prompts (by a hash of the text), else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "heldout" if h % 1000 < HELDOUT_FRACTION * 1000 else "train"


def all_scenes() -> list[Scene]:
    """Every prompt of the grammar: 90 single-object and 612 two-object scenes."""
    objs = [SceneObject(c, s) for c in COLORS for s in SHAPES]
    out = [Scene((o,), position=p) for o in objs for p in POSITIONS]
    out += [Scene((a, b), relation=r) for r in RELATIONS for a in objs for b in objs if a != b]
    return out


def scenes(split: str | None = None, kind: str | None = None) -> list[Scene]:
    """The scenes of one split ('train' / 'heldout') and kind ('single' / 'pair'); None = all."""
    if split not in (None, "train", "heldout") or kind not in (None, "single", "pair"):
        raise ValueError("split must be 'train', 'heldout' or None and kind 'single', 'pair' or None; "
                         f"got {split!r}, {kind!r}")
    return [s for s in all_scenes() if (split is None or s.split == split) and (kind is None or s.kind == kind)]


@functools.cache
def _by_prompt() -> dict[str, Scene]:
    return {s.prompt: s for s in all_scenes()}


def parse_prompt(prompt: str) -> Scene:
    """The Scene a prompt of this grammar describes; ValueError for anything else."""
    found = _by_prompt().get(prompt.strip().lower())
    if found is not None:
        return found
    raise ValueError(
        f"{prompt!r} is not a prompt of the synthetic-scene grammar: 'a <colour> <shape> <position>' or "
        f"'a <colour> <shape> <relation> a <colour> <shape>' with colours {list(COLORS)}, shapes "
        f"{list(SHAPES)}, positions {list(POSITIONS)}, relations {list(RELATIONS)}"
    )


def centres(scene: Scene, rng: np.random.Generator | None = None) -> list[tuple[float, float]]:
    """Object centres (fractions of the canvas), jittered when an rng is given."""
    base = [POSITIONS[scene.position]] if scene.relation is None else list(RELATIONS[scene.relation])
    if rng is None:
        return base
    return [(x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)) for x, y in base]


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None,
           palette: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Draw a scene: (size, size, 3) uint8. Pixel centres are tested against each shape exactly.
    palette: colour name -> RGB, for colours beyond the grammar's (default COLORS; e.g. the LoRA demo's)."""
    colors = COLORS if palette is None else palette
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    half = OBJECT_SIZE * size / 2
    for obj, (cx, cy) in zip(scene.objects, centres(scene, rng)):
        cx, cy = cx * size, cy * size
        if obj.shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
        elif obj.shape == "square":
            # a square of the circle's area would look smaller; same bounding box as the others
            s = half * 0.85
            inside = (abs(xx - cx) <= s) & (abs(yy - cy) <= s)
        else:  # upright isosceles triangle filling the bounding box
            top, bottom = cy - half, cy + half
            t = (yy - top) / (bottom - top)  # 0 at the apex, 1 at the base
            inside = (t >= 0) & (t <= 1) & (abs(xx - cx) <= t * half)
        img[inside] = colors[obj.color]
    return img


def describe_vocabulary() -> str:
    """One line naming what the synthetic-scene models know."""
    return (
        f"colours {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; positions {', '.join(POSITIONS)}; "
        f"relations {', '.join(RELATIONS)}"
    )


def object_area(shape: str, size: int) -> float:
    """Ideal area in pixels of one object at a canvas size (for the detector's size checks)."""
    half = OBJECT_SIZE * size / 2
    return {"circle": math.pi * half**2, "square": (2 * half * 0.85) ** 2, "triangle": 2 * half * half}[shape]
