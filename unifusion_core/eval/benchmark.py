"""The compositional benchmark: generate every prompt with several seeds, detect, score, summarise.

The report (JSON-able) has one section per split ("train", "heldout") and "overall":

    prompts      number of prompts
    avg          per category the mean over prompts and seeds (the paper's Tab. 1 "Avg" column)
    best_of_N    per category the mean over prompts of the best seed (N = number of seeds): a
                 prompt counts as right if any seed gets it right
    all_by_seed  the fraction of all-correct prompts for each seed
    by_kind      prompts, avg and best_of_N of the "single" and of the "pair" prompts

Each of avg / best_of_N holds the categories (color, shape, count, and position for single or
relation for pair prompts, each over the prompts that have it), "micro" (fraction of prompts
with everything right, the `all` flag of `detect.score`) and "macro" (mean of the category
scores present). The top level also holds "seeds", "prompts" and "per_prompt" (each prompt's
split, kind and all-correct flag per seed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import scenes as sc
from .detect import detect, score

log = logging.getLogger(__name__)

CATEGORIES = ("color", "shape", "count", "position", "relation")
GenerateFn = Callable[[list[sc.Scene], int], list[np.ndarray]]


@dataclass
class BenchmarkRun:
    """Scores (and optionally images) of every prompt for every seed."""

    scenes: list[sc.Scene]
    seeds: tuple[int, ...]
    scores: list[list[dict]]  # [seed][prompt] -> detect.score(...)
    images: list[list[np.ndarray]] = field(default_factory=list)  # [seed][prompt], when kept

    def report(self) -> dict:
        """The JSON-able summary described in the module docstring."""
        splits = {"overall": list(range(len(self.scenes)))}
        for split in ("train", "heldout"):
            idx = [i for i, s in enumerate(self.scenes) if s.split == split]
            if idx:
                splits[split] = idx
        out = {"seeds": list(self.seeds), "prompts": len(self.scenes)}
        for name, idx in splits.items():
            section = self._section(idx)
            section["all_by_seed"] = [float(np.mean([seed[i]["all"] for i in idx])) for seed in self.scores]
            section["by_kind"] = {}
            for kind in ("single", "pair"):
                sub = [i for i in idx if self.scenes[i].kind == kind]
                if sub:
                    section["by_kind"][kind] = self._section(sub)
            out[name] = section
        out["per_prompt"] = [
            {"prompt": s.prompt, "split": s.split, "kind": s.kind,
             "all": [bool(seed[i]["all"]) for seed in self.scores]}
            for i, s in enumerate(self.scenes)
        ]
        return out

    def _section(self, idx: list[int]) -> dict:
        best_key = f"best_of_{len(self.seeds)}"
        avg, best = {}, {}
        for cat in (*CATEGORIES, "all"):
            rows = [[float(seed[i][cat]) for seed in self.scores] for i in idx if cat in self.scores[0][i]]
            if not rows:
                continue
            values = np.array(rows)  # (prompts, seeds)
            key = "micro" if cat == "all" else cat
            avg[key] = float(values.mean())
            best[key] = float(values.max(axis=1).mean())
        for stats in (avg, best):
            stats["macro"] = float(np.mean([v for k, v in stats.items() if k in CATEGORIES]))
        return {"prompts": len(idx), "avg": avg, best_key: best}

    def correct(self, seed_index: int = 0) -> list[bool]:
        """Whether each prompt's image for one seed is all-correct."""
        return [bool(s["all"]) for s in self.scores[seed_index]]


def evaluate(generate_fn: GenerateFn, scenes: Sequence[sc.Scene], seeds: Sequence[int] = (0, 1, 2, 3),
             keep_images: bool = False, palette: dict[str, tuple[int, int, int]] | None = None) -> BenchmarkRun:
    """Generate every scene once per seed (one generate_fn call per seed) and score the images
    (palette: the colours the detector reads, default scenes.COLORS)."""
    scenes, seeds = list(scenes), tuple(int(s) for s in seeds)
    if not scenes or not seeds:
        raise ValueError(f"need at least one scene and one seed, got {len(scenes)} scenes and seeds {list(seeds)}")
    run = BenchmarkRun(scenes, seeds, [])
    for seed in seeds:
        images = list(generate_fn(scenes, seed))
        if len(images) != len(scenes):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(scenes)} scenes (seed {seed}); "
                             "it must return one (H, W, 3) uint8 image per scene, in order")
        run.scores.append([score(s, detect(img, palette=palette)) for s, img in zip(scenes, images)])
        if keep_images:
            run.images.append(images)
        log.info("seed %d: %d/%d prompts all-correct", seed, sum(s["all"] for s in run.scores[-1]), len(scenes))
    return run


def run_benchmark(generate_fn: GenerateFn, scenes: Sequence[sc.Scene], seeds: Sequence[int] = (0, 1, 2, 3)) -> dict:
    """Score generate_fn(scenes, seed) -> one uint8 (H, W, 3) image per scene; the JSON-able report."""
    return evaluate(generate_fn, scenes, seeds).report()


# --- pictures -----------------------------------------------------------------------------------


def write_grid(path: str | os.PathLike, images: Sequence[np.ndarray], labels: Sequence[str] | None = None,
               correct: Sequence[bool] | None = None, cols: int = 8, cell: int = 128) -> Path:
    """A PNG grid of images, each upscaled (NEAREST) to `cell` pixels, with an optional label
    under it and a border: green where `correct` is True, red where False, grey without it."""
    if not images:
        raise ValueError("write_grid needs at least one image")
    for name, seq in (("labels", labels), ("correct", correct)):
        if seq is not None and len(seq) != len(images):
            raise ValueError(f"{len(seq)} {name} for {len(images)} images; give one per image")
    if cols < 1 or cell < 8:
        raise ValueError(f"need cols >= 1 and cell >= 8, got cols={cols}, cell={cell}")
    font = ImageFont.load_default()
    line_h = 12
    chars = max(1, (cell - 4) // 6)  # the default bitmap font is about 6 pixels a character
    wrapped = [_wrap(str(t), chars) for t in labels] if labels is not None else None
    label_h = line_h * max(len(w) for w in wrapped) + 4 if wrapped else 0
    pad = 3
    cw, ch = cell + 2 * pad, cell + 2 * pad + label_h
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (min(cols, len(images)) * cw, rows * ch), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * ch
        colour = (128, 128, 128) if correct is None else (40, 200, 60) if correct[i] else (220, 40, 40)
        draw.rectangle([x + 1, y + 1, x + cell + 2 * pad - 2, y + cell + 2 * pad - 2], outline=colour, width=2)
        tile = Image.fromarray(np.ascontiguousarray(img)).convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x + pad, y + pad))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text((x + pad, y + cell + 2 * pad + 1 + j * line_h), line, fill=(230, 230, 230), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines or [""]
