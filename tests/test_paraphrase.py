"""The paraphrase grammar of the scene prompts: every wording parses back to its scene, the inverse
relations keep their meaning, the held-out templates and styles are fixed and never coincide with a
training wording, draws are reproducible, and text outside the grammar is refused with what it accepts."""

import numpy as np
import pytest

from unifusion_core import paraphrase as pp
from unifusion_core import scenes as sc

SCENES = sc.all_scenes()
SINGLE = sc.parse_prompt("a red circle on the left")
LEFT = sc.parse_prompt("a red circle to the left of a blue square")
ABOVE = sc.parse_prompt("a red circle above a blue square")

# Every template, in order, with its split and its wording of SINGLE, or of LEFT and ABOVE: the list is
# fixed, and the inverse templates are read here by eye.
EXPECTED = {
    "single.canonical": ("train", "a red circle on the left"),
    "single.there_is": ("train", "there is a red circle on the left"),
    "single.is": ("train", "a red circle is on the left"),
    "single.picture_of": ("train", "a picture of a red circle on the left"),
    "single.fronted": ("train", "on the left, a red circle"),
    "single.fronted_there": ("train", "on the left, there is a red circle"),
    "single.bare": ("train", "red circle on the left"),
    "single.the_is": ("train", "the red circle is on the left"),
    "single.image": ("train", "a red circle on the left of the image"),
    "single.side": ("train", "a red circle on the left side"),
    "single.sits_side": ("heldout", "a red circle sits on the left side"),
    "single.fronted_is": ("heldout", "on the left is a red circle"),
    "single.bare_image": ("heldout", "red circle on the left of the image"),
    "pair.canonical": ("train", "a red circle to the left of a blue square", "a red circle above a blue square"),
    "pair.there_is": ("train", "there is a red circle to the left of a blue square",
                      "there is a red circle above a blue square"),
    "pair.is": ("train", "a red circle is to the left of a blue square", "a red circle is above a blue square"),
    "pair.picture_of": ("train", "a picture of a red circle to the left of a blue square",
                        "a picture of a red circle above a blue square"),
    "pair.short": ("train", "a red circle left of a blue square", "a red circle over a blue square"),
    "pair.inverse": ("train", "a blue square to the right of a red circle", "a blue square below a red circle"),
    "pair.inverse_short": ("train", "a blue square right of a red circle", "a blue square under a red circle"),
    "pair.inverse_is": ("train", "a blue square is to the right of a red circle",
                        "a blue square is below a red circle"),
    "pair.fronted": ("train", "to the left of a blue square, a red circle", "above a blue square, a red circle"),
    "pair.fronted_inverse": ("train", "to the right of a red circle, a blue square",
                             "below a red circle, a blue square"),
    "pair.bare": ("train", "red circle to the left of blue square", "red circle above blue square"),
    "pair.the_is": ("train", "the red circle is to the left of the blue square",
                    "the red circle is above the blue square"),
    "pair.inverse_beneath": ("heldout", "a blue square on the right of a red circle",
                             "a blue square beneath a red circle"),
    "pair.fronted_is": ("heldout", "to the left of a blue square is a red circle",
                        "above a blue square is a red circle"),
    "pair.sits": ("heldout", "a red circle sits to the left of a blue square", "a red circle sits above a blue square"),
    "pair.bare_short": ("heldout", "red circle left of blue square", "red circle over blue square"),
}


def test_the_templates_are_the_fixed_list():
    assert [t.name for t in pp.TEMPLATES] == list(EXPECTED)
    for t in pp.TEMPLATES:
        split, *texts = EXPECTED[t.name]
        assert t.split == split, t.name
        examples = [SINGLE] if t.kind == "single" else [LEFT, ABOVE]
        assert [pp.paraphrase(s, t.name) for s in examples] == texts, t.name


def test_every_template_reads_back_every_scene():
    """~700 scenes x their kind's templates: each text is read by its own template alone, as its scene."""
    for s in SCENES:
        assert pp.canonical(s.prompt) == s
        for t in pp.templates(kind=s.kind):
            text = pp.paraphrase(s, t.name)
            assert pp.readings(text) == [(t.name, s)], text
            assert pp.canonical(text) == s
            assert pp.canonical(text).prompt == s.prompt


def test_every_surface_style_reads_back():
    for style in pp.surface_styles():
        for s in SCENES[::11]:
            for t in pp.templates(kind=s.kind):
                assert pp.canonical(pp.paraphrase(s, t.name, style)) == s, (t.name, style)


def test_surface_styles():
    text = "on the left, a red circle"
    assert {name: pp.restyle(text, name) for name in pp.surface_styles()} == {
        "plain": "on the left, a red circle",
        "capital": "On the left, a red circle",
        "period": "on the left, a red circle.",
        "sentence": "On the left, a red circle.",
        "exclaim": "On the left, a red circle!",
        "upper": "ON THE LEFT, A RED CIRCLE",
        "title": "On The Left, A Red Circle",
        "shout": "ON THE LEFT, A RED CIRCLE!",
    }
    assert pp.surface_styles("heldout") == ["title", "shout"]
    assert pp.paraphrase(SINGLE, "single.there_is", "sentence") == "There is a red circle on the left."
    with pytest.raises(ValueError, match="unknown surface style 'bold'"):
        pp.restyle(text, "bold")


@pytest.mark.parametrize("text, prompt", [
    ("a blue square to the right of a red circle", "a red circle to the left of a blue square"),
    ("A blue square right of a red circle!", "a red circle to the left of a blue square"),
    ("a blue square on the right of a red circle", "a red circle to the left of a blue square"),
    ("To the right of a red circle, a blue square.", "a red circle to the left of a blue square"),
    ("a blue square below a red circle", "a red circle above a blue square"),
    ("a blue square under a red circle", "a red circle above a blue square"),
    ("a blue square beneath a red circle", "a red circle above a blue square"),
    ("a blue square is below a red circle", "a red circle above a blue square"),
    ("a red circle below a blue square", "a blue square above a red circle"),
    ("a red circle right of a blue square", "a blue square to the left of a red circle"),
])
def test_inverse_relations_swap_the_objects(text, prompt):
    assert pp.canonical(text) == sc.parse_prompt(prompt)


def test_the_splits():
    names = {split: {t.name for t in pp.templates(split)} for split in ("train", "heldout")}
    assert not names["train"] & names["heldout"]
    assert names["train"] | names["heldout"] == {t.name for t in pp.TEMPLATES}
    for kind in ("single", "pair"):
        train, heldout = pp.templates("train", kind), pp.templates("heldout", kind)
        assert train and heldout
        assert 0.2 <= len(heldout) / (len(train) + len(heldout)) <= 0.3, kind
        # every kind of variation the templates of a kind use is in training
        used = {v for t in pp.templates(kind=kind) for v in t.variations}
        assert used <= {v for t in train for v in t.variations}, kind
        assert "order" in {v for t in heldout for v in t.variations}, kind
    assert {v for t in pp.templates(kind="pair") for v in t.variations} == set(pp.VARIATIONS)
    assert "inverse" in {v for t in pp.templates("heldout", "pair") for v in t.variations}
    assert {t.name for t in pp.templates("train") if not t.variations} == {"single.canonical", "pair.canonical"}
    assert pp.surface_styles("train") and pp.surface_styles("heldout")
    assert not set(pp.surface_styles("train")) & set(pp.surface_styles("heldout"))


def test_heldout_wording_is_never_a_training_wording():
    for s in SCENES:
        heldout = set(pp.paraphrases(s, "heldout"))
        assert s.prompt not in heldout
        assert not heldout & set(pp.paraphrases(s, "train")), s.prompt
        # not even after case and punctuation are normalised away
        assert not {pp.normalise(x) for x in heldout} & {pp.normalise(x) for x in pp.paraphrases(s, "train")}


def test_pair_paraphrases_are_unambiguous():
    for s in sc.scenes(kind="pair"):
        for text in pp.paraphrases(s):
            assert {scene for _, scene in pp.readings(text)} == {s}, text


def test_random_paraphrase_is_reproducible_and_keeps_to_its_split():
    def draws(seed, split="train", surfaces=None):
        rng = np.random.default_rng(seed)
        return [pp.random_paraphrase(s, rng, split, surfaces) for s in SCENES[::7] for _ in range(3)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    for split in ("train", "heldout"):
        got = draws(3, split)
        names = {t.name for t in pp.templates(split)}
        assert {name for _, name in got} == names  # every template of the split, and no other
        for text, name in got:
            assert pp.readings(text)[0][0] == name
    plain = draws(4, "heldout", surfaces=("plain",))
    assert all(text == text.lower() and text[-1].isalpha() for text, _ in plain)
    # the heldout split's styles only: title case or capitals with "!", never a training style
    assert all(text[0].isupper() and (text.istitle() or text.endswith("!")) for text, _ in draws(5, "heldout"))


@pytest.mark.parametrize("text, why", [
    ("a orange circle on the left", r"unknown words \['orange'\]"),
    ("a red hexagon on the left", r"unknown words \['hexagon'\]"),
    ("a red circle to the left of", "a relation needs a second object"),
    ("a red circle above", "a relation needs a second object"),
    ("", "the text is empty"),
    (" .! ", "the text is empty"),
    ("on the left", "no '<colour> <shape>' object"),
    ("a red circle to the left of a red circle", "the two objects of a pair must differ"),
    ("on the left a red circle is", "no template puts them in this order"),
    ("a red circle on the left to the left of a blue square", "no template puts them in this order"),
])
def test_canonical_refuses_text_outside_the_grammar(text, why):
    with pytest.raises(ValueError, match=why) as e:
        pp.canonical(text)
    msg = str(e.value)
    for accepted in ("'red'", "'triangle'", "'on the left'", "'to the left of'", "'beneath'", "templates"):
        assert accepted in msg


def test_paraphrase_refuses_unknown_and_mismatched_templates():
    with pytest.raises(ValueError, match="unknown template 'single.nope'"):
        pp.paraphrase(SINGLE, "single.nope")
    with pytest.raises(ValueError, match="words pair scenes"):
        pp.paraphrase(SINGLE, "pair.inverse")
    with pytest.raises(ValueError, match="split must be"):
        pp.templates("test")
