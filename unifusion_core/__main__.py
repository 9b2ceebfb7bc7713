"""Run the whole UniFusion path once: features -> LAP -> refiner -> DiT sampling -> checkpoint -> image.

    python -m unifusion_core [--preset tiny] [--width 64] [--height 64] [--steps 8] [--out out]

Until the VLM encoder and trained weights land, the features are random stand-ins for a VLM's
hidden states and the model is freshly initialised, so the picture is noise: this checks that
the pipeline runs end to end on this machine and shows the files it makes.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model, save_model
from .model import UniFusionModel

log = logging.getLogger("unifusion_core")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=16, help="conditioning tokens of the stand-in features")
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = UniFusionModel.from_preset(args.preset, latent="pixel").eval()
    ckpt = args.out / f"unifusion-{args.preset}.safetensors"
    save_model(model, ckpt)
    model = load_model(ckpt)

    enc = model.config.encoder
    hidden = torch.randn(1, args.tokens, len(enc.layers), enc.hidden_size)  # (B, T, L, D)
    t0 = time.perf_counter()
    cond = model.encode(hidden)
    latent = model.sample(
        cond, args.width, args.height, steps=args.steps, cfg=args.cfg, seed=args.seed,
        callback=lambda i, n, x, x0: log.info("step %d/%d", i + 1, n),
    )
    seconds = time.perf_counter() - t0
    # pixel latent space: RGB in -1..1, as ComfyUI's pixel_space VAE decodes it
    rgb = ((latent[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    png = args.out / "sample.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(png)
    summary = {
        "preset": args.preset,
        "params": model.num_parameters()["total"],
        "checkpoint": str(ckpt),
        "image": str(png),
        "latent_shape": list(latent.shape),
        "seconds": round(seconds, 3),
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
