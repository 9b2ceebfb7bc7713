"""Encode every synthetic-scene prompt with the embedded SmolLM2 once, for training and evaluation.

    python tools/encode_scene_prompts.py --out runs/scene_features.safetensors [--rewrite]

Batched (`VLMEncoder.encode_batch`): the chat template's shared prefix (system prompt) is computed
once and its KV cache reused. The file holds one fp16 tensor (T, L, D) per prompt, keyed "0", "1",
... in the order of the metadata's "prompts" list, and the encoder spec ("encoder"); the trainer
(--features) and the evaluation (--features) read it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vlm", help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--rewrite", action="store_true",
                    help="VERIFI rewrites (greedy, generated once) instead of the prompts' own tokens")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from unifusion_core import load_vlm, scenes
    from unifusion_core.assets import bundled_vlm
    from unifusion_core.features import save_features_file

    t0 = time.perf_counter()
    vlm = load_vlm(args.vlm or bundled_vlm())
    prompts = [s.prompt for s in scenes.all_scenes()]
    t1 = time.perf_counter()
    feats = vlm.encode_batch(prompts, rewrite=args.rewrite, batch_size=args.batch_size, max_new_tokens=64)
    t2 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_features_file(args.out, {p: f.hidden for p, f in zip(prompts, feats)}, feats[0].encoder,
                       rewrite=args.rewrite, texts=[f.text for f in feats])
    print(json.dumps({"prompts": len(prompts), "load_s": round(t1 - t0, 1), "encode_s": round(t2 - t1, 1),
                      "prompts_per_s": round(len(prompts) / (t2 - t1), 2), "out": str(args.out)}))


if __name__ == "__main__":
    main()
