"""The paper's layer figures for a trained model: LAP weight per VLM layer (Fig. 8/11) and the
effect of dropping a third of the layers (Fig. 12), drawn with PIL."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import scenes as sc
from ..features import Features
from ..model import UniFusionModel
from .benchmark import evaluate, write_grid
from .model_gen import model_generate_fn

log = logging.getLogger(__name__)


def layer_weights_png(model: UniFusionModel, path: str | os.PathLike, width: int = 640, height: int = 320) -> Path:
    """A bar chart of `model.lap.layer_weight_magnitude()` (sums to 1) over the VLM layer indices."""
    values = model.lap.layer_weight_magnitude().cpu().numpy()  # (L,)
    layers = model.config.encoder.layers
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, 12, 28, 36  # margins
    draw.text((left, 8), f"LAP weight magnitude per VLM layer ({model.config.encoder.name})", fill=(0, 0, 0), font=font)
    vmax = float(values.max()) * 1.15 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):  # value axis ticks
        y = top + plot_h - frac * plot_h
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{frac * vmax:.2f}", fill=(0, 0, 0), font=font)
    slot = plot_w / len(values)
    for i, (layer, v) in enumerate(zip(layers, values)):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        y0 = top + plot_h - v / vmax * plot_h
        draw.rectangle([x0, y0, x1, top + plot_h], fill=(60, 110, 200))
        draw.text(((x0 + x1) / 2 - 6, top + plot_h + 4), str(layer), fill=(0, 0, 0), font=font)
    draw.text((left + plot_w / 2 - 30, height - 14), "VLM layer", fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def layer_thirds(layers: Sequence[int]) -> dict[str, list[int]]:
    """Settings of Fig. 12: drop nothing, or the first / middle / last third of the selected layers
    (np.array_split sizes; a third with no layer is left out)."""
    parts = np.array_split(np.asarray(layers), 3)
    out = {"none": []}
    for name, part in zip(("first third", "middle third", "last third"), parts):
        if len(part):
            out[name] = [int(i) for i in part]
    return out


def layer_drop_study(
    model: UniFusionModel,
    features: Mapping[str, Features],
    scenes: Sequence[sc.Scene],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    steps: int | None = None,
    cfg: float | None = None,
    size: int | None = None,
    batch_size: int = 32,
    grid_prompts: int = 8,
) -> dict:
    """Benchmark scores with each third of the layers dropped (`layer_thirds`); writes
    out_dir/layer_drop.png (rows: settings, columns: the first grid_prompts prompts, first seed).

    Returns {setting: {"dropped_layers": [...], "prompts", "avg", "best_of_N"}} (the overall section
    of the benchmark report).
    """
    out_dir = Path(out_dir)
    scenes = list(scenes)
    shown = scenes[:grid_prompts]
    results, images, labels, correct = {}, [], [], []
    for name, drop in layer_thirds(model.config.encoder.layers).items():
        gen = model_generate_fn(model, features, steps, cfg, batch_size, layer_drop=drop, size=size)
        run = evaluate(gen, scenes, seeds, keep_images=True)
        overall = run.report()["overall"]
        results[name] = {"dropped_layers": drop, **{k: v for k, v in overall.items() if k != "by_kind"}}
        images += run.images[0][: len(shown)]
        labels += [f"[{name}] {s.prompt}" for s in shown]
        correct += run.correct(0)[: len(shown)]
        log.info("layer drop %s %s: all-correct %.3f", name, drop, overall["avg"]["micro"])
    write_grid(out_dir / "layer_drop.png", images, labels, correct, cols=len(shown))
    return results
