"""The VLM side of the benchmark: does a VLM read the scenes? Exact-match of its greedy VERIFI
rewrites (default system prompt, the images, the user's text) on five tasks:

    describe   an image -> its scene's description
    question   an image + "what colour is the circle" -> "red" (scene_edits.questions)
    edit       an image + an edit instruction -> the edited scene's description
    reference  two images + "the shape of the first image ..." -> the composed scene
    text       a paraphrase of a prompt (paraphrase.py) -> the grammar's description

Each example is drawn from one split: the held-out split has held-out compositions, edits,
references and (for text) held-out templates and styles; images are rendered at seeds no
training run draws (EVAL_SALT). The training of the pack's VLM draws its examples here too.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from .. import paraphrase, scene_edits, scenes

TASKS = ("describe", "question", "edit", "reference", "text")
EVAL_SALT = 7_000_001  # seeds evaluation images are rendered at: never a training seed


class Example(NamedTuple):
    text: str  # the user's text
    images: list  # PIL images, in order
    answer: str  # the exact expected rewrite
    kind: str  # the task, or the edit's kind for edits


def make_pools() -> dict:
    """What examples are drawn from, per split: scenes, edits and references."""
    return {**{("scenes", s): scenes.scenes(s) for s in ("train", "heldout")},
            **{("edits", s): scene_edits.edits(s) for s in ("train", "heldout")},
            **{("edits", s, k): scene_edits.edits(s, k) for s in ("train", "heldout") for k in scene_edits.EDIT_KINDS},
            **{("references", s): scene_edits.references(s) for s in ("train", "heldout")}}


def example(task: str, rng: np.random.Generator, split: str, pools: dict, kind: str | None = None) -> Example:
    """One example of a task drawn from `split` (64 x 64 renders, jittered by rng); an edit of
    `kind` (scene_edits.EDIT_KINDS) when given, else of any kind as the pool holds them."""
    def render(scene):
        return Image.fromarray(scenes.render(scene, 64, rng))

    if task in ("describe", "question", "text"):
        scene = pools["scenes", split][rng.integers(len(pools["scenes", split]))]
        if task == "describe":
            return Example(scene_edits.DESCRIBE, [render(scene)], scene.prompt, task)
        if task == "text":  # a paraphrase of the split's templates and styles, rewritten to the grammar's words
            return Example(paraphrase.random_paraphrase(scene, rng, split)[0], [], scene.prompt, task)
        qs = scene_edits.questions(scene)
        q, a = qs[rng.integers(len(qs))]
        return Example(q, [render(scene)], a, task)
    if task == "edit":
        pool = pools["edits", split] if kind is None else pools["edits", split, kind]
        e = pool[rng.integers(len(pool))]
        return Example(e.instruction, [render(e.source)], e.target.prompt, e.kind)
    if task != "reference":
        raise ValueError(f"unknown task {task!r}; the tasks are {TASKS}")
    r = pools["references", split][rng.integers(len(pools["references", split]))]
    return Example(r.instruction, [render(s) for s in r.sources], r.target.prompt, task)


def answers(enc, examples: list[Example], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """The VLM's greedy VERIFI rewrites of examples, batched (`VLMEncoder.rewrite_batch`: the same
    text as `encode(..., rewrite=True)` one at a time; the tests check it)."""
    rewrites = enc.rewrite_batch([ex.text for ex in examples], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 images=[ex.images or None for ex in examples], max_tiles=1)
    return [r.text for r in rewrites]


def evaluate(enc, n: int, split: str, pools: dict, tasks=TASKS, batch_size: int = 32) -> dict:
    """Exact-match of greedy answers per task on n examples each, rendered at evaluation seeds,
    and per edit kind under 'edit_kinds' (with how many of each were drawn). Edits are drawn kind by
    kind in turn (n / 6 of each): drawn as the pool holds them, a held-out 100 had 1 swap and 9 removes."""
    out: dict = {}
    kinds: dict[str, list[int]] = {}
    for task in tasks:
        rng = np.random.default_rng([EVAL_SALT, TASKS.index(task), 0 if split == "train" else 1])
        turn = scene_edits.EDIT_KINDS if task == "edit" else (None,)
        examples = [example(task, rng, split, pools, turn[i % len(turn)]) for i in range(n)]
        right = 0
        for got, ex in zip(answers(enc, examples, batch_size=batch_size), examples):
            right += got == ex.answer
            if task == "edit":
                kinds.setdefault(ex.kind, [0, 0])[0] += got == ex.answer
                kinds[ex.kind][1] += 1
        out[task] = right / n
    if kinds:
        out["edit_kinds"] = {k: {"exact": r / c, "n": c} for k, (r, c) in sorted(kinds.items())}
    return out
