"""Paraphrases of the synthetic-scene prompts, with held-out templates: a model's grasp of the scene
language measured apart from the wording it was trained on.

`scenes` words each scene one way ("a red circle to the left of a blue square"), so a model trained on
that text alone may have learned the strings rather than the language. Here each scene has many
wordings. Templates vary the structure and the function words, never the colour and shape words: word
order ("on the left, a red circle"), "there is" / "is" / "sits", articles ("red circle on the left",
"the red circle is ..."), phrase variants ("on the left of the image", "left of", "over") and inverse
relations ("a blue square to the right of a red circle" is the canonical "a red circle to the left of a
blue square"; "below", "under", "beneath" invert "above"). A separate, orthogonal surface step varies
case and punctuation ("A RED CIRCLE ON THE LEFT", "A red circle on the left."). Templates and surface
styles each belong to a fixed split, written in the lists below (not drawn by a hash or a seed): about a
quarter of each is held out, so a model trained on the train wordings can be scored on wordings it never
read, while `scenes.split_of` holds out compositions independently.

`canonical` parses any text these produce (and the canonical prompts) back to the one Scene it describes:
case and punctuation are normalised away, then each template is matched as a regular expression built
from the scene vocabulary.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .scenes import COLORS, POSITIONS, RELATIONS, SHAPES, Scene, SceneObject

# Position phrase tables: canonical position -> its wording in that form.
POSITION_FORMS: dict[str, dict[str, str]] = {
    "canonical": {p: p for p in POSITIONS},
    "image": {p: f"{p} of the image" for p in POSITIONS},
    "side": {  # the centre has no side: "at the center"
        "on the left": "on the left side",
        "on the right": "on the right side",
        "at the top": "on the top side",
        "at the bottom": "on the bottom side",
        "in the center": "at the center",
    },
}
# Relation phrase tables: canonical relation -> its wording in that form. The inverse forms name the
# objects the other way round: "{b} below {a}" says "{a} above {b}".
RELATION_FORMS: dict[str, dict[str, str]] = {
    "canonical": {r: r for r in RELATIONS},
    "short": {"to the left of": "left of", "above": "over"},
    "inverse": {"to the left of": "to the right of", "above": "below"},
    "inverse_short": {"to the left of": "right of", "above": "under"},
    "inverse_beneath": {"to the left of": "on the right of", "above": "beneath"},
}
# What a template varies; each variation the templates of a scene kind use is in that kind's training split.
VARIATIONS = ("order", "structure", "article", "phrase", "inverse")


@dataclass(frozen=True)
class Template:
    """One wording of a scene kind. pattern: {a}, {b} the scene's first and second object (with the
    template's article), {where} its position and {rel} its relation, in the template's phrase form."""

    name: str  # stable id, "<kind>.<variant>"
    kind: str  # "single" or "pair"
    split: str  # "train" or "heldout"
    pattern: str
    variations: tuple[str, ...] = ()  # none: the canonical wording
    article: str = "a"  # before each object: "a", "the" or "" (none)
    form: str = "canonical"  # key of POSITION_FORMS (single) or RELATION_FORMS (pair)


def _t(kind: str, variant: str, split: str, pattern: str, *variations: str, article: str = "a",
       form: str = "canonical") -> Template:
    return Template(f"{kind}.{variant}", kind, split, pattern, variations, article, form)


# The fixed list and its split. Held out: about a quarter of each kind, including for pairs an inverse
# relation ("beneath", "on the right of") and a word order that no training template has.
TEMPLATES: list[Template] = [
    _t("single", "canonical", "train", "{a} {where}"),
    _t("single", "there_is", "train", "there is {a} {where}", "structure"),
    _t("single", "is", "train", "{a} is {where}", "structure"),
    _t("single", "picture_of", "train", "a picture of {a} {where}", "structure"),
    _t("single", "fronted", "train", "{where}, {a}", "order"),
    _t("single", "fronted_there", "train", "{where}, there is {a}", "order", "structure"),
    _t("single", "bare", "train", "{a} {where}", "article", article=""),
    _t("single", "the_is", "train", "{a} is {where}", "article", "structure", article="the"),
    _t("single", "image", "train", "{a} {where}", "phrase", form="image"),
    _t("single", "side", "train", "{a} {where}", "phrase", form="side"),
    _t("single", "sits_side", "heldout", "{a} sits {where}", "structure", "phrase", form="side"),
    _t("single", "fronted_is", "heldout", "{where} is {a}", "order"),
    _t("single", "bare_image", "heldout", "{a} {where}", "article", "phrase", article="", form="image"),
    _t("pair", "canonical", "train", "{a} {rel} {b}"),
    _t("pair", "there_is", "train", "there is {a} {rel} {b}", "structure"),
    _t("pair", "is", "train", "{a} is {rel} {b}", "structure"),
    _t("pair", "picture_of", "train", "a picture of {a} {rel} {b}", "structure"),
    _t("pair", "short", "train", "{a} {rel} {b}", "phrase", form="short"),
    _t("pair", "inverse", "train", "{b} {rel} {a}", "inverse", form="inverse"),
    _t("pair", "inverse_short", "train", "{b} {rel} {a}", "inverse", "phrase", form="inverse_short"),
    _t("pair", "inverse_is", "train", "{b} is {rel} {a}", "inverse", "structure", form="inverse"),
    _t("pair", "fronted", "train", "{rel} {b}, {a}", "order"),
    _t("pair", "fronted_inverse", "train", "{rel} {a}, {b}", "order", "inverse", form="inverse"),
    _t("pair", "bare", "train", "{a} {rel} {b}", "article", article=""),
    _t("pair", "the_is", "train", "{a} is {rel} {b}", "article", "structure", article="the"),
    _t("pair", "inverse_beneath", "heldout", "{b} {rel} {a}", "inverse", "phrase", form="inverse_beneath"),
    _t("pair", "fronted_is", "heldout", "{rel} {b} is {a}", "order"),
    _t("pair", "sits", "heldout", "{a} sits {rel} {b}", "structure"),
    _t("pair", "bare_short", "heldout", "{a} {rel} {b}", "article", "phrase", article="", form="short"),
]
_BY_NAME = {t.name: t for t in TEMPLATES}


@dataclass(frozen=True)
class Surface:
    """A case and punctuation style, applied to a template's (lower-case) text."""

    name: str
    split: str
    apply: Callable[[str], str]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


SURFACES: list[Surface] = [
    Surface("plain", "train", lambda t: t),
    Surface("capital", "train", _capital),  # "A red circle on the left"
    Surface("period", "train", lambda t: t + "."),
    Surface("sentence", "train", lambda t: _capital(t) + "."),
    Surface("exclaim", "train", lambda t: _capital(t) + "!"),
    Surface("upper", "train", str.upper),
    Surface("title", "heldout", lambda t: " ".join(_capital(w) for w in t.split(" "))),  # "A Red Circle On The Left"
    Surface("shout", "heldout", lambda t: t.upper() + "!"),
]
_SURFACE = {s.name: s for s in SURFACES}


def _check_split(split: str | None) -> None:
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None (both); got {split!r}")


def templates(split: str | None = None, kind: str | None = None) -> list[Template]:
    """The templates of one split ('train' / 'heldout') and scene kind ('single' / 'pair'); None = all."""
    _check_split(split)
    if kind not in (None, "single", "pair"):
        raise ValueError(f"kind must be 'single', 'pair' or None (both); got {kind!r}")
    return [t for t in TEMPLATES if split in (None, t.split) and kind in (None, t.kind)]


def surface_styles(split: str | None = None) -> list[str]:
    """The names of the surface styles of one split; None = all."""
    _check_split(split)
    return [s.name for s in SURFACES if split in (None, s.split)]


def restyle(text: str, style: str) -> str:
    """A template's text in a surface style (case and punctuation)."""
    if style not in _SURFACE:
        raise ValueError(f"unknown surface style {style!r}; the styles are {list(_SURFACE)}")
    return _SURFACE[style].apply(text)


def _object(obj: SceneObject, article: str) -> str:
    return f"{article} {obj.color} {obj.shape}" if article else f"{obj.color} {obj.shape}"


def paraphrase(scene: Scene, template: str, surface: str | None = None) -> str:
    """A scene worded by the template of that name, in a surface style (None: as the template writes it)."""
    if template not in _BY_NAME:
        raise ValueError(f"unknown template {template!r}; the templates are {list(_BY_NAME)}")
    t = _BY_NAME[template]
    if t.kind != scene.kind:
        raise ValueError(f"template {template!r} words {t.kind} scenes; {scene.prompt!r} is a {scene.kind} scene")
    slots = {"a": _object(scene.objects[0], t.article)}
    if scene.kind == "single":
        slots["where"] = POSITION_FORMS[t.form][scene.position]
    else:
        slots["b"] = _object(scene.objects[1], t.article)
        slots["rel"] = RELATION_FORMS[t.form][scene.relation]
    text = t.pattern.format(**slots)
    return text if surface is None else restyle(text, surface)


def paraphrases(scene: Scene, split: str | None = None, surface: str | None = None) -> list[str]:
    """The scene worded by every template of a split (None: all), in TEMPLATES order."""
    return [paraphrase(scene, t.name, surface) for t in templates(split, scene.kind)]


def random_paraphrase(scene: Scene, rng: np.random.Generator, split: str = "train",
                      surfaces: Sequence[str] | None = None) -> tuple[str, str]:
    """(text, template name): a template of the split and a surface style drawn from rng (the same
    draws for the same generator state). surfaces: the styles to draw from (default: those of the
    split; ("plain",) keeps the template's own text)."""
    choices = templates(split, scene.kind)
    t = choices[int(rng.integers(len(choices)))]
    styles = surface_styles(split) if surfaces is None else list(surfaces)
    return paraphrase(scene, t.name, styles[int(rng.integers(len(styles)))]), t.name


# Parsing: the text is lower-cased, punctuation becomes spaces and whitespace is collapsed; each
# template (its literal parts normalised the same way) then becomes one anchored regular expression.
_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalise(text: str) -> str:
    """Case and punctuation removed: the form `canonical` matches templates against."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


def _regex(t: Template) -> re.Pattern[str]:
    article = f"{t.article} " if t.article else ""
    phrases = (POSITION_FORMS if t.kind == "single" else RELATION_FORMS)[t.form].values()
    slots = {
        tag: f"{article}(?P<{tag}_color>{_alternatives(COLORS)}) (?P<{tag}_shape>{_alternatives(SHAPES)})"
        for tag in ("a", "b")
    }
    slots["where"] = f"(?P<where>{_alternatives(phrases)})"
    slots["rel"] = f"(?P<rel>{_alternatives(phrases)})"
    parts = re.split(r"\{(\w+)\}", t.pattern)  # literal text at even indices, slot names at odd ones
    parts[::2] = [re.escape(re.sub(" +", " ", p.lower().translate(_PUNCTUATION))) for p in parts[::2]]
    return re.compile("".join(slots[p] if i % 2 else p for i, p in enumerate(parts)))


_REGEX = {t.name: _regex(t) for t in TEMPLATES}
# phrase -> canonical position or relation, per form
_POSITION_OF = {f: {v: k for k, v in table.items()} for f, table in POSITION_FORMS.items()}
_RELATION_OF = {f: {v: k for k, v in table.items()} for f, table in RELATION_FORMS.items()}


def readings(text: str) -> list[tuple[str, Scene]]:
    """Every (template name, Scene) that reads the text, in TEMPLATES order. A text of this grammar has
    exactly one; a pair of two equal objects is read too (not a scene of the grammar: `canonical` refuses it)."""
    norm = normalise(text)
    out = []
    for t in TEMPLATES:
        m = _REGEX[t.name].fullmatch(norm)
        if m is None:
            continue
        a = SceneObject(m["a_color"], m["a_shape"])
        if t.kind == "single":
            out.append((t.name, Scene((a,), position=_POSITION_OF[t.form][m["where"]])))
        else:
            b = SceneObject(m["b_color"], m["b_shape"])
            out.append((t.name, Scene((a, b), relation=_RELATION_OF[t.form][m["rel"]])))
    return out


_POSITION_PHRASES = sorted({p for table in POSITION_FORMS.values() for p in table.values()})
_RELATION_PHRASES = sorted({p for table in RELATION_FORMS.values() for p in table.values()})
# Every word a template can write, to name the words of a refused text that are outside the grammar.
_WORDS = frozenset(normalise(" ".join([
    *(re.sub(r"\{\w+\}", " ", t.pattern) + " " + t.article for t in TEMPLATES),
    *COLORS, *SHAPES, *_POSITION_PHRASES, *_RELATION_PHRASES,
])).split())
_OBJECT = re.compile(rf"\b(?:{_alternatives(COLORS)}) (?:{_alternatives(SHAPES)})\b")
_RELATION_PHRASE = re.compile(rf"\b(?:{_alternatives(_RELATION_PHRASES)})\b")


def _why_not(norm: str) -> str:
    """The first thing wrong with a normalised text no template reads."""
    if not norm:
        return "the text is empty"
    unknown = sorted({w for w in norm.split() if w not in _WORDS})
    if unknown:
        return f"unknown words {unknown}"
    objects = _OBJECT.findall(norm)
    if not objects:
        return "it names no '<colour> <shape>' object"
    if _RELATION_PHRASE.search(norm) and len(objects) < 2:
        return "a relation needs a second object"
    return "its words are the grammar's, but no template puts them in this order"


def canonical(text: str) -> Scene:
    """The Scene a canonical prompt or any paraphrase of this grammar (any template, any surface style)
    describes: its `.prompt` is the canonical text. ValueError for anything else."""
    found = {s for _, s in readings(text)}
    valid = [s for s in found if s.kind == "single" or s.objects[0] != s.objects[1]]
    if len(valid) == 1:
        return valid[0]
    if len(valid) > 1:  # the templates are built so that this never happens; the tests check it
        raise ValueError(f"{text!r} is ambiguous: it reads as {sorted(s.prompt for s in valid)}")
    why = "the two objects of a pair must differ" if found else _why_not(normalise(text))
    raise ValueError(
        f"{text!r} is not a synthetic-scene prompt or paraphrase ({why}): the grammar accepts one "
        f"'<colour> <shape>' object at a position, or two different objects in a relation, worded by one of its "
        f"{len(TEMPLATES)} templates (e.g. 'a red circle on the left', 'there is a red circle on the left', "
        f"'a blue square below a red circle'; any case, punctuation ignored), with colours {list(COLORS)}, "
        f"shapes {list(SHAPES)}, positions {_POSITION_PHRASES}, relations {_RELATION_PHRASES}"
    )
