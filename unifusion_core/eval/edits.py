"""The image side of the benchmark for a UniFusion model: edits, reconstructions and two-image
references, each scored exactly against the scene it should draw.

A case holds what the VLM reads (the user's text and the source images, rendered at seeds no
training run draws) and the target scene. The model draws every case with several seeds; the
detector (`detect.py`) scores each image against the target; the report gives, per split and per
kind (each edit kind, reconstruction, reference), the all-correct fraction as the mean over seeds
and best-of-N, as the text benchmark does.

    python -m unifusion_core.eval --task edit|reconstruct|multiref --model CKPT --vlm VLM --out DIR
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import scene_edits, scenes
from ..features import Features
from .describe import EVAL_SALT
from .detect import detect, score

TASKS = ("edit", "reconstruct", "multiref")


@dataclass
class Case:
    kind: str  # an edit kind, "reconstruct" or "reference"
    text: str  # what the user writes ("" for a reconstruction)
    images: list[np.ndarray]  # the source images, (H, W, 3) uint8
    target: scenes.Scene
    split: str


def cases(task: str, split: str, n: int, size: int = 64) -> list[Case]:
    """n fixed cases of a task from a split: the same every call (drawn from EVAL_SALT)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = np.random.default_rng([EVAL_SALT, TASKS.index(task), 0 if split == "train" else 1, 1])
    out = []
    if task == "reconstruct":
        pool = scenes.scenes(split)
        for i in rng.permutation(len(pool))[:n]:
            out.append(Case("reconstruct", "", [scenes.render(pool[i], size, rng)], pool[i], split))
    elif task == "edit":
        # kind by kind in turn (n / 6 of each, per kind without repeats; a kind used up drops out of
        # the turn): drawn as the pool holds them, a held-out 100 had 1 swap and 9 removes, too few
        # to score a kind by
        pools = [scene_edits.edits(split, k) for k in scene_edits.EDIT_KINDS]
        perms = [rng.permutation(len(p)) for p in pools]
        turns = [(p, i) for row in itertools.zip_longest(*perms) for p, i in zip(pools, row) if i is not None]
        for pool, i in turns[:n]:
            e = pool[i]
            out.append(Case(e.kind, e.instruction, [scenes.render(e.source, size, rng)], e.target, split))
    else:
        pool = scene_edits.references(split)
        for i in rng.permutation(len(pool))[:n]:
            r = pool[i]
            out.append(Case("reference", r.instruction, [scenes.render(s, size, rng) for s in r.sources], r.target,
                            split))
    return out


def encode(vlm, case_list: Sequence[Case], encoder, rewrite: bool = False) -> list[Features]:
    """The features of each case as the model was trained: its layers and system prompt; with
    rewrite, VERIFI's (the rewrite's tokens + every image token)."""
    from PIL import Image

    return [vlm.encode(c.text, images=[Image.fromarray(im) for im in c.images], rewrite=rewrite,
                       layers=encoder.layers, system_prompt=encoder.system_prompt) for c in case_list]


def encode_schedule(vlm, case_list: Sequence[Case], encoder) -> tuple[list[Features], list[Features], list[str]]:
    """The conditioning schedule of paper Sec. 5.2, for a model never trained on edits: the source
    images' tokens alone first, then the text of the target, which the VLM writes itself (its
    VERIFI rewrite of the instruction and images; the user's text where it writes nothing).
    Returns (image features, text features, the rewrites).

    One VLM pass a case: the image tokens of the rewriting pass are those an image-only encode
    would give (they come before the user's text, and the model is causal)."""
    from PIL import Image

    passes = [vlm.encode(c.text or "describe the image", images=[Image.fromarray(im) for im in c.images],
                         rewrite=True, max_new_tokens=48, layers=encoder.layers, system_prompt=encoder.system_prompt)
              for c in case_list]
    rewrites = [f.text for f in passes]
    texts = [r if r.strip() else (c.text or "describe the image") for r, c in zip(rewrites, case_list)]
    then = vlm.encode_batch(texts, layers=encoder.layers, system_prompt=encoder.system_prompt)
    return [f.image_tokens() for f in passes], then, rewrites


def evaluate(draw: Callable[[list[Features], int], list[np.ndarray]], case_list: Sequence[Case],
             features: Sequence[Features], seeds: Sequence[int]) -> dict:
    """Per split and kind: all-correct mean over seeds and best-of-N. draw(features, seed) returns
    one uint8 image per features."""
    right = np.array([[bool(score(c.target, detect(im))["all"]) for c, im in zip(case_list, draw(list(features), s))]
                      for s in seeds])  # (seeds, cases)
    report: dict = {"seeds": list(seeds), "cases": len(case_list)}
    for split in sorted({c.split for c in case_list}):
        section = {}
        for kind in sorted({c.kind for c in case_list}):
            idx = [i for i, c in enumerate(case_list) if c.split == split and c.kind == kind]
            if idx:
                sub = right[:, idx]
                section[kind] = {"n": len(idx), "avg": float(sub.mean()), f"best_of_{len(seeds)}":
                                 float(sub.any(0).mean())}
        idx = [i for i, c in enumerate(case_list) if c.split == split]
        section["all"] = {"n": len(idx), "avg": float(right[:, idx].mean()),
                          f"best_of_{len(seeds)}": float(right[:, idx].any(0).mean())}
        report[split] = section
    return report


def model_draw(model, steps: int | None = None, cfg: float | None = None, size: int | None = None,
               batch_size: int = 32, then: Sequence[Features] | None = None,
               switch_at: float = 0.2) -> Callable[[list[Features], int], list[np.ndarray]]:
    """draw(features, seed) for a pixel-space UniFusion model (see model_gen.model_generate_fn);
    with `then` (one per case, in the order draw is given the cases), the schedule of Sec. 5.2."""
    from ..generate import sample_features, to_rgb
    from .model_gen import check_pixel_space, image_size

    check_pixel_space(model)
    width, height = image_size(model, size)

    def draw(features: list[Features], seed: int) -> list[np.ndarray]:
        out = []
        for i in range(0, len(features), batch_size):
            part = features[i : i + batch_size]
            after = list(then[i : i + batch_size]) if then is not None else None
            out += to_rgb(sample_features(model, part, [seed] * len(part), steps=steps, cfg=cfg, width=width,
                                          height=height, next_features=after, switch_at=switch_at))
        return out

    return draw
