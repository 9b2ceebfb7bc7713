"""Training throughput with aspect-ratio buckets against square crops at the same pixel count (`train-buckets`).

One folder of JPEGs of mixed aspect ratios (1:3 to 3:1, each larger than the tier, as photos
are); the same model, features and batch trained on it twice in one run: square crops at
--resolution R (TaskMixture), and `--buckets R` (each batch one bucket of about R^2 pixels). The
steps alternate between the two, so load from other work on the machine hits both alike. Each
step is the trainer's `train_step`: reading, decoding and resizing the images included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unifusion_core import UniFusionModel

from .common import random_feature_table


def _images(root: Path, n: int, side: int, seed: int = 0) -> list[tuple[int, int]]:
    """n JPEGs of aspect ratios log-uniform in [1/3, 3] and 1.2-2x the tier's area; smooth
    content with some noise (a photo's decode cost, not a noise image's)."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        ratio = float(np.exp(rng.uniform(-np.log(3), np.log(3))))
        area = side * side * rng.uniform(1.2, 2.0)
        w, h = max(8, round((area * ratio) ** 0.5)), max(8, round((area / ratio) ** 0.5))
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        c = rng.uniform(0, 1, 3)
        img = np.stack([255 * (c[k] * x + (1 - c[k]) * y) for k in range(3)], axis=2) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg", quality=90)
        (root / f"{i:04d}.txt").write_text(f"image {i}")
        sizes.append((w, h))
    return sizes


def main(argv: list[str]) -> None:
    from unifusion_core.presets import TINY_ENCODER, get_preset
    from unifusion_core.train.buckets import bucketize
    from unifusion_core.train.loop import TrainConfig, Trainer
    from unifusion_core.train.mixture import TaskMixture
    from unifusion_core.train.setup import PromptFeatures
    from unifusion_core.train.sources import ImageFolder

    ap = argparse.ArgumentParser(description="train steps with aspect-ratio buckets vs square crops, same pixels")
    ap.add_argument("--resolution", type=int, default=128, help="the square side and the one bucket tier")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--dit-width", type=int, default=192)
    ap.add_argument("--dit-depth", type=int, default=4)
    ap.add_argument("--dit-heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--timesteps-per-prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="timed steps of each (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's current)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    R, P, K = args.resolution, args.prompts_per_step, args.timesteps_per_prompt

    work = Path(tempfile.mkdtemp(prefix="unifusion-bench-buckets-"))
    try:
        data = work / "images"
        data.mkdir()
        t0 = time.perf_counter()
        _images(data, args.images, R)
        spec = TINY_ENCODER
        table = random_feature_table([f"image {i}" for i in range(args.images)], spec)
        config = get_preset("tiny").replace(
            encoder=spec, latent="pixel",
            dit={"hidden_size": args.dit_width, "depth": args.dit_depth, "heads": args.dit_heads,
                 "patch_size": args.patch, "axes_dim": None},
            sampling={"size": (R, R), "shift": 1.0})
        torch.manual_seed(0)
        model = UniFusionModel(config)
        src = ImageFolder(data, resolution=R)
        t_scan = time.perf_counter()
        bucketed, bsources = bucketize({"t2i": src}, {"t2i": 1.0}, 0, (R,), args.patch, P)
        scan_s = time.perf_counter() - t_scan

        def trainer(mixture, sources, out: str) -> Trainer:
            import copy

            cfg = TrainConfig(out=out, steps=10_000, prompts_per_step=P, timesteps_per_prompt=K, warmup=10)
            feats = PromptFeatures(spec, spec.layers, table=table)
            return Trainer(cfg, copy.deepcopy(model), mixture, sources, feats)

        loops = {"square": trainer(TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, str(work / "a")),
                 "buckets": trainer(bucketed, bsources, str(work / "b"))}
        load_before = os.getloadavg()[0]
        for _ in range(args.warmup):
            for tr in loops.values():
                tr.train_step()
        times: dict[str, list[float]] = {k: [] for k in loops}
        pixels: dict[str, list[int]] = {k: [] for k in loops}
        shapes: dict[str, set] = {k: set() for k in loops}
        draw_s: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.steps):
            for name, tr in loops.items():
                t = time.perf_counter()
                tr.train_step()
                times[name].append(time.perf_counter() - t)
                pixels[name].append(tr.image_tokens * args.patch ** 2)
                b = getattr(tr.mixture, "bucket", None)
                shapes[name].add(b.key if b else f"{R}x{R}")
        # reading + decoding + resizing alone, the same number of batches
        for name, tr in loops.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                tr.draw(P)
                draw_s[name].append(time.perf_counter() - t)
        step = {k: statistics.median(v) for k, v in times.items()}
        res = {k: {"step_s": round(step[k], 4), "step_s_all": [round(t, 4) for t in times[k]],
                   "samples_per_s": round(P * K / step[k], 2),
                   "mean_pixels_per_image": round(statistics.mean(pixels[k]), 1),
                   "load_batch_s": round(statistics.median(draw_s[k]), 4),
                   "sizes_seen": sorted(shapes[k])} for k in loops}
        ratio = res["buckets"]["samples_per_s"] / res["square"]["samples_per_s"]
        # each timed bucketed step against the square step just before it: the load of the moment cancels
        paired = statistics.median(a / b for a, b in zip(times["square"], times["buckets"]))
        px_ratio = res["buckets"]["mean_pixels_per_image"] / res["square"]["mean_pixels_per_image"]
        result = {
            "benchmark": "train-buckets",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "config": {"latent": "pixel", "tier": R, "dit": {"width": args.dit_width, "depth": args.dit_depth,
                                                            "heads": args.dit_heads, "patch": args.patch},
                       "P": P, "K": K, "images": args.images, "encoder": "tiny, random features"},
            "buckets_used": bucketed.histogram(),
            "scan_s": round(scan_s, 4),
            "scan_us_per_image": round(1e6 * scan_s / args.images, 1),
            "square": res["square"],
            "buckets": res["buckets"],
            "samples_per_s_ratio": round(ratio, 3),
            "samples_per_s_ratio_paired": round(paired, 3),
            "pixels_ratio": round(px_ratio, 3),
            "samples_per_s_ratio_per_pixel": round(ratio * px_ratio, 3),
            "setup_s": round(t_scan - t0, 2),
        }
        result["summary"] = (
            f"{R}^2 tier, pixel DiT {args.dit_width}x{args.dit_depth} patch {args.patch}, P={P} x K={K}: buckets "
            f"{res['buckets']['samples_per_s']} samples/s vs square {res['square']['samples_per_s']} "
            f"({ratio:.3f}x, paired steps {paired:.3f}x; pixels per image {px_ratio:.3f}x); "
            f"loading a batch {res['buckets']['load_batch_s']} s vs "
            f"{res['square']['load_batch_s']} s; sizes read at {result['scan_us_per_image']} us an image; "
            f"{result['threads']} thread(s)")
        result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
