"""Edits, references and questions over the synthetic scenes: every target is a scene of the
grammar and says what the instruction asks, checked against the renderer and by counting."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from unifusion_core import scene_edits as se
from unifusion_core import scenes
from unifusion_core.scenes import Scene, SceneObject

EDITS = se.all_edits()


def objects_at(scene: Scene) -> dict[SceneObject, tuple[float, float]]:
    return dict(zip(scene.objects, scenes.centres(scene)))


def test_every_target_is_a_scene_of_the_grammar_and_differs_from_its_source():
    for e in EDITS:
        assert scenes.parse_prompt(e.target.prompt) == e.target
        assert e.target != e.source, e
    for r in se.references():
        assert scenes.parse_prompt(r.target.prompt) == r.target


@pytest.mark.parametrize("kind", se.EDIT_KINDS)
def test_each_kind_changes_what_it_names_and_nothing_else(kind):
    for e in (x for x in EDITS if x.kind == kind):
        src, tgt = e.source.objects, e.target.objects
        if kind in ("recolor", "reshape"):
            assert len(src) == len(tgt) and e.target.position == e.source.position
            assert e.target.relation == e.source.relation
            changed = [(a, b) for a, b in zip(src, tgt) if a != b]
            assert len(changed) == 1
            a, b = changed[0]
            same = "shape" if kind == "recolor" else "color"
            assert getattr(a, same) == getattr(b, same)
            assert f"the {a.color} {a.shape}" in e.instruction
            assert (b.color if kind == "recolor" else b.shape) in e.instruction.split()
        elif kind == "remove":
            (left,) = tgt
            (gone,) = set(src) - {left}
            assert e.instruction == f"remove the {gone.color} {gone.shape}"
            # the object left stays on its side: its place in the target is near its place before
            before, after = objects_at(e.source)[left], objects_at(e.target)[left]
            assert max(abs(before[0] - after[0]), abs(before[1] - after[1])) <= 0.06
        elif kind == "swap":
            assert tgt == src[::-1] and e.target.relation == e.source.relation
        elif kind == "add":
            assert len(src) == 1 and len(tgt) == 2 and src[0] in tgt
            (new,) = set(tgt) - set(src)
            assert e.instruction.startswith(f"add a {new.color} {new.shape} ")
        else:  # move
            assert set(src) == set(tgt)


@pytest.mark.parametrize("placement", list(se.PLACEMENTS))
def test_placements_put_the_subject_where_the_instruction_says(placement):
    """'add X to the right of Y' draws X right of Y; 'below' draws it lower, and so on."""
    dx, dy = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}[placement]
    for e in (x for x in EDITS if x.kind in ("add", "move") and f" {placement} " in x.instruction):
        at = objects_at(e.target)
        words = e.instruction.split(f" {placement} ")
        subject = next(o for o in e.target.objects if f"{o.color} {o.shape}" in words[0])
        other = next(o for o in e.target.objects if f"{o.color} {o.shape}" in words[1])
        assert np.sign(at[subject][0] - at[other][0]) == dx and np.sign(at[subject][1] - at[other][1]) == dy, e


def test_references_take_each_object_from_its_image():
    for r in se.references()[::37]:
        first, second = (s.objects[0] for s in r.sources)
        placement = r.instruction.removeprefix("the shape of the first image ").removesuffix(
            " the shape of the second image")
        relation, first_first = se.PLACEMENTS[placement]
        assert r.target.relation == relation
        assert r.target.objects == ((first, second) if first_first else (second, first))


def test_splits_are_fixed_disjoint_and_about_a_tenth_of_each_kind():
    counts = collections.Counter((e.kind, e.split) for e in EDITS)
    for kind in se.EDIT_KINDS:
        held = counts[kind, "heldout"] / (counts[kind, "heldout"] + counts[kind, "train"])
        assert 0.05 < held < 0.16, (kind, held)
    train, held = se.edits("train"), se.edits("heldout")
    assert len(train) + len(held) == len(EDITS)
    assert not {(e.source, e.instruction) for e in train} & {(e.source, e.instruction) for e in held}
    refs = se.references("heldout")
    assert 0.05 < len(refs) / len(se.references()) < 0.16
    assert se.edits("heldout", "swap") == [e for e in held if e.kind == "swap"]


def test_edit_instructions_are_unique_per_source():
    seen = collections.Counter((e.source, e.instruction) for e in EDITS)
    assert max(seen.values()) == 1


def test_questions_have_one_right_answer():
    for scene in scenes.all_scenes():
        for q, a in se.questions(scene):
            if q.startswith("what colour is the "):
                shape = q.removeprefix("what colour is the ")
                assert [o.color for o in scene.objects if o.shape == shape] == [a]
            elif q.startswith("what shape is the "):
                color = q.removeprefix("what shape is the ").removesuffix(" object")
                assert [o.shape for o in scene.objects if o.color == color] == [a]
            elif q.startswith("where is "):
                assert a in scenes.POSITIONS
            else:
                assert a == ("one" if len(scene.objects) == 1 else "two")


def test_bad_split_or_kind_is_refused():
    with pytest.raises(ValueError, match="kind one of"):
        se.edits(kind="rotate")
    with pytest.raises(ValueError, match="split must be"):
        se.edits(split="test")
