"""RoPE in bf16 against RoPE in fp32, on images the embedded model samples (`rope-precision`).

The DiT rotates q and k in fp32 and rounds once (layers.apply_rope). Rotating in bf16 (cos and sin
rounded to bf16, the products and sums in bf16, as a kernel in the compute dtype would) moves less
memory; this measures what it costs in pictures. Three ways to sample the same held-out prompts
and seeds with the shipped 64-px model:
- `fp32`: fp32 weights, fp32 RoPE (the reference);
- `bf16`: bf16 weights, fp32 RoPE (what the pack runs in bf16);
- `bf16-rope-bf16`: bf16 weights, RoPE in bf16.
It reports, per pair, the mean and largest pixel difference (0-255), the share of pixels more than
32 levels apart (a shape's edge moved), and how many images the exact
detector's all-correct verdict differs for, and each variant's all-correct rate. bf16 RoPE is acceptable where its
difference from `bf16` is small beside `bf16`'s own difference from `fp32`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from unifusion_core import layers
from unifusion_core.assets import bundled_model
from unifusion_core.checkpoint import load_model
from unifusion_core.eval import benchmark
from unifusion_core.eval.__main__ import pick_scenes, vlm_features
from unifusion_core.eval.model_gen import model_generate_fn


def rope_in_dtype(x: Tensor, rope: Tensor) -> Tensor:
    """apply_rope computed in x's dtype (bf16): the candidate."""
    B, S, half, _ = rope.shape
    cos, sin = rope.view(B, S, *[1] * (x.ndim - 3), half, 2).to(x.dtype).unbind(-1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description="bf16 RoPE vs fp32 RoPE on sampled images of the embedded model")
    ap.add_argument("--limit", type=int, default=24, help="held-out prompts (a fixed subset, as eval's --limit)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = bundled_model()
    if path is None:
        raise SystemExit("the embedded model is missing (unifusion_core/assets)")
    scenes = pick_scenes("heldout", args.limit)
    seeds = tuple(range(args.seeds))
    reference = load_model(path, dtype=torch.float32).eval()
    features = vlm_features(None, reference, [s.prompt for s in scenes], rewrite=reference.config.sampling.rewrite)
    variants = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
                "bf16-rope-bf16": (torch.bfloat16, rope_in_dtype)}
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "prompts": len(scenes), "seeds": list(seeds), "variants": {}}
    images, verdicts = {}, {}
    for name, (dtype, rope) in variants.items():
        model = load_model(path, dtype=dtype).eval()
        t0 = time.perf_counter()
        with mock.patch.object(layers, "apply_rope", rope or layers.apply_rope):
            draw = model_generate_fn(model, features, steps=args.steps)
            run = benchmark.evaluate(draw, scenes, seeds, keep_images=True)
        images[name] = [im for per_seed in run.images for im in per_seed]
        verdicts[name] = [s["all"] for per_seed in run.scores for s in per_seed]
        report["variants"][name] = {"all_correct": round(float(np.mean(verdicts[name])), 4),
                                    "seconds": round(time.perf_counter() - t0, 1)}
    pairs = {}
    for a, b in (("bf16", "fp32"), ("bf16-rope-bf16", "fp32"), ("bf16-rope-bf16", "bf16")):
        diffs = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(images[a], images[b])]
        read = [x != y for x, y in zip(verdicts[a], verdicts[b])]
        pairs[f"{a} vs {b}"] = {"mean_abs_level": round(float(np.mean([d.mean() for d in diffs])), 4),
                                "max_abs_level": int(max(d.max() for d in diffs)),
                                "pixels_over_32_levels": round(float(np.mean([(d.max(-1) > 32).mean()
                                                                              for d in diffs])), 5),
                                "verdicts_differ": int(sum(read)), "images": len(diffs)}
    report["differences"] = pairs
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return report
