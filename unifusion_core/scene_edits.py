"""Edits, references and questions over the synthetic scenes, every target known exactly.

An edit takes one source scene and an instruction to a target scene of the same grammar
(`scenes.py`): recolour an object, change its shape, move it (a single object to another
position; a pair to another relation or order), add an object (single -> pair), remove one
(pair -> single: the one left keeps its side), swap the two. A reference task composes two
single-object images into a pair ("the shape of the first image to the left of the shape of the
second image"). Questions ask for one attribute with a one-phrase answer.

Objects are always named by colour and shape ("the red circle"): the two objects of a pair
always differ in one of them, so the name is never ambiguous. Edits and reference tasks have a
fixed held-out split from a hash of (source prompts, instruction), as prompts have in scenes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scenes import COLORS, POSITIONS, SHAPES, Scene, SceneObject, all_scenes, split_of

EDIT_KINDS = ("recolor", "reshape", "move", "add", "remove", "swap")
# Where the object left after a removal stands: the slot of a pair as a single-object position.
SLOT_POSITION = {("to the left of", 0): "on the left", ("to the left of", 1): "on the right",
                 ("above", 0): "at the top", ("above", 1): "at the bottom"}
MOVE_TO = {"on the left": "to the left", "on the right": "to the right", "at the top": "to the top",
           "at the bottom": "to the bottom", "in the center": "to the center"}
# Instruction relation -> (grammar relation, whether the instruction's subject comes first).
PLACEMENTS = {"to the left of": ("to the left of", True), "to the right of": ("to the left of", False),
              "above": ("above", True), "below": ("above", False)}
DESCRIBE = "describe the image"


def name(obj: SceneObject) -> str:
    return f"the {obj.color} {obj.shape}"


def article(obj: SceneObject) -> str:
    return f"a {obj.color} {obj.shape}"


@dataclass(frozen=True)
class Edit:
    """One instruction taking `source` to `target`; `kind` is one of EDIT_KINDS."""

    kind: str
    source: Scene
    instruction: str
    target: Scene

    @property
    def split(self) -> str:
        return split_of(f"{self.source.prompt} | {self.instruction}")


@dataclass(frozen=True)
class Reference:
    """Two single-object scenes composed by an instruction into the pair `target`."""

    sources: tuple[Scene, Scene]
    instruction: str
    target: Scene

    @property
    def split(self) -> str:
        return split_of(f"{self.sources[0].prompt} | {self.sources[1].prompt} | {self.instruction}")


def _pair(a: SceneObject, b: SceneObject, relation: str) -> Scene | None:
    return Scene((a, b), relation=relation) if a != b else None


def _placed(subject: SceneObject, other: SceneObject, placement: str) -> Scene | None:
    relation, subject_first = PLACEMENTS[placement]
    return _pair(subject, other, relation) if subject_first else _pair(other, subject, relation)


def edits_of(scene: Scene) -> list[Edit]:
    """Every edit of the grammar that applies to a scene, in a fixed order."""
    out: list[Edit] = []
    objs = scene.objects

    def replaced(i: int, new: SceneObject) -> Scene | None:
        changed = tuple(new if j == i else o for j, o in enumerate(objs))
        if len(set(changed)) < len(changed):
            return None  # the two objects of a pair would be the same
        return Scene(changed, position=scene.position, relation=scene.relation)

    for i, obj in enumerate(objs):
        for c in COLORS:
            if c != obj.color and (t := replaced(i, SceneObject(c, obj.shape))):
                out.append(Edit("recolor", scene, f"make {name(obj)} {c}", t))
        for s in SHAPES:
            if s != obj.shape and (t := replaced(i, SceneObject(obj.color, s))):
                out.append(Edit("reshape", scene, f"turn {name(obj)} into a {s}", t))
    if scene.relation is None:
        (obj,) = objs
        for p in POSITIONS:
            if p != scene.position:
                out.append(Edit("move", scene, f"move {name(obj)} {MOVE_TO[p]}", Scene(objs, position=p)))
        for c in COLORS:
            for s in SHAPES:
                new = SceneObject(c, s)
                for placement in PLACEMENTS:
                    if t := _placed(new, obj, placement):
                        out.append(Edit("add", scene, f"add {article(new)} {placement} {name(obj)}", t))
        return out
    a, b = objs
    for subject, other in ((a, b), (b, a)):
        for placement in PLACEMENTS:
            t = _placed(subject, other, placement)
            if t != scene:
                out.append(Edit("move", scene, f"put {name(subject)} {placement} {name(other)}", t))
    for i, obj in enumerate(objs):
        keep = objs[1 - i]
        out.append(Edit("remove", scene, f"remove {name(obj)}",
                        Scene((keep,), position=SLOT_POSITION[scene.relation, 1 - i])))
    out.append(Edit("swap", scene, f"swap {name(a)} and {name(b)}", Scene((b, a), relation=scene.relation)))
    return out


def all_edits() -> list[Edit]:
    return [e for s in all_scenes() for e in edits_of(s)]


def edits(split: str | None = None, kind: str | None = None) -> list[Edit]:
    """The edits of one split ('train' / 'heldout') and kind (EDIT_KINDS); None = all."""
    if split not in (None, "train", "heldout") or kind not in (None, *EDIT_KINDS):
        raise ValueError(f"split must be 'train', 'heldout' or None and kind one of {EDIT_KINDS} or None; "
                         f"got {split!r}, {kind!r}")
    return [e for e in all_edits() if (split is None or e.split == split) and (kind is None or e.kind == kind)]


def references(split: str | None = None) -> list[Reference]:
    """Every two-image composition: a single-object scene per image, any positions, and where
    the first image's object goes relative to the second's."""
    singles = [s for s in all_scenes() if s.relation is None]
    out = []
    for first in singles:
        for second in singles:
            for placement in PLACEMENTS:
                t = _placed(first.objects[0], second.objects[0], placement)
                if t is None:
                    continue
                r = Reference((first, second), f"the shape of the first image {placement} the shape of the second "
                              "image", t)
                if split is None or r.split == split:
                    out.append(r)
    return out


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, answer) pairs with one-phrase answers: how many shapes, the colour of each
    shape and the shape of each colour where that names one object, and where each object is."""
    objs = scene.objects
    out = [("how many shapes are there", "one" if len(objs) == 1 else "two")]
    for i, obj in enumerate(objs):
        if sum(o.shape == obj.shape for o in objs) == 1:
            out.append((f"what colour is the {obj.shape}", obj.color))
        if sum(o.color == obj.color for o in objs) == 1:
            out.append((f"what shape is the {obj.color} object", obj.shape))
        where = scene.position if scene.relation is None else SLOT_POSITION[scene.relation, i]
        out.append((f"where is {name(obj)}", where))
    return out
