"""The LoRA demo: teach the embedded model a colour its vocabulary lacks, scored exactly.

The embedded model knows six colours (scenes.COLORS). NEW_COLOR ("cyan", far from all six: its
nearest, blue, is 25 degrees away) is drawn by nothing it was trained on. `make_data` writes an
image folder (PNG + .txt caption) of scenes of the grammar with one object in the new colour, the
grammar's own held-out split (scenes.split_of, by a hash of the prompt) left out, mixed with
scenes of the grammar (replay, so that the LoRA does not forget the six colours). `score` draws
the held-out new-colour prompts and held-out grammar prompts and scores them with the exact
detector reading the six colours plus the new one.

python -m unifusion_core.eval.lora_demo data --out DIR [--n 1600] [--replay 0.5]
python -m unifusion_core.eval.lora_demo score --model M [--lora L] [--seeds 4] [--limit 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .. import scenes as sc

log = logging.getLogger(__name__)

NEW_COLOR = ("cyan", (40, 200, 210))
PALETTE = {**sc.COLORS, NEW_COLOR[0]: NEW_COLOR[1]}
DATA_SEED = 0x10BA


def new_color_scenes(split: str | None = None) -> list[sc.Scene]:
    """Every scene of the grammar's shapes, positions and relations with exactly one object in the
    new colour (the other, in pairs, of the grammar's colours): 15 single and 216 pair scenes;
    split 'train' / 'heldout' by the grammar's hash of the prompt."""
    name = NEW_COLOR[0]
    objs = [sc.SceneObject(c, s) for c in sc.COLORS for s in sc.SHAPES]
    new = [sc.SceneObject(name, s) for s in sc.SHAPES]
    out = [sc.Scene((o,), position=p) for o in new for p in sc.POSITIONS]
    out += [sc.Scene(pair, relation=r) for r in sc.RELATIONS for a in new for b in objs for pair in ((a, b), (b, a))]
    return [s for s in out if split is None or s.split == split]


def make_data(out: str | Path, n: int = 1600, replay: float = 0.5, size: int = 64, seed: int = DATA_SEED) -> dict:
    """n training images (PNG + caption) in `out`: a fraction `replay` of training scenes of the
    grammar, the rest training scenes with the new colour; every image jittered by (seed, i)."""
    if n < 1 or not 0 <= replay < 1:
        raise ValueError(f"n must be >= 1 and replay in [0, 1), got {n}, {replay}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    new, base = new_color_scenes("train"), sc.scenes("train")
    rng = np.random.default_rng(seed)
    counts = {"new": 0, "replay": 0}
    for i in range(n):
        use_base = rng.random() < replay
        pool = base if use_base else new
        scene = pool[int(rng.integers(len(pool)))]
        img = sc.render(scene, size, np.random.default_rng([seed, i]), palette=PALETTE)
        Image.fromarray(img).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(scene.prompt)
        counts["replay" if use_base else "new"] += 1
    return {"images": n, **counts, "new_color": NEW_COLOR[0], "train_prompts": len(new),
            "heldout_prompts": len(new_color_scenes("heldout"))}


def _pick(scenes: list[sc.Scene], limit: int | None) -> list[sc.Scene]:
    if limit is None or limit >= len(scenes):
        return scenes
    step = len(scenes) / limit  # evenly over the grammar's order: singles and pairs in proportion
    return [scenes[int(i * step)] for i in range(limit)]


def score(model, features: dict, seeds=(0, 1, 2, 3), limit: int | None = None, out: str | Path | None = None,
          steps: int | None = None) -> dict:
    """Held-out prompts with the new colour and held-out prompts of the grammar, drawn with `model`
    at each seed and scored by the detector reading PALETTE: {"new_color": report, "grammar": report}
    (benchmark.BenchmarkRun.report's 'heldout' sections)."""
    from .benchmark import evaluate, write_grid
    from .model_gen import model_generate_fn

    gen = model_generate_fn(model, features, steps=steps)
    result = {}
    for name, pool in (("new_color", new_color_scenes("heldout")), ("grammar", sc.scenes("heldout"))):
        chosen = _pick(pool, limit)
        run = evaluate(gen, chosen, seeds, keep_images=out is not None, palette=PALETTE)
        report = run.report()
        result[name] = {k: report["heldout"][k] for k in ("avg", "all_by_seed") if k in report["heldout"]}
        result[name]["best"] = report["heldout"].get(f"best_of_{len(seeds)}")
        result[name]["prompts"] = len(chosen)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            write_grid(Path(out) / f"{name}.png", run.images[0][:16], labels=[s.prompt for s in chosen[:16]],
                       correct=[bool(run.scores[0][i]["all"]) for i in range(min(16, len(chosen)))])
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m unifusion_core.eval.lora_demo", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the training image folder")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=1600)
    d.add_argument("--replay", type=float, default=0.5)
    s = sub.add_parser("score", help="score a model (and a LoRA on it) on held-out prompts")
    s.add_argument("--model", required=True, help="a UniFusion checkpoint (.safetensors)")
    s.add_argument("--lora", help="a LoRA file for it (lora.safetensors)")
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--vlm", help="default: the embedded SmolLM2")
    s.add_argument("--seeds", type=int, default=4)
    s.add_argument("--limit", type=int, help="prompts per set (default: all held-out ones)")
    s.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's)")
    s.add_argument("--out", help="folder for grids and the JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "data":
        result = make_data(args.out, args.n, args.replay)
    else:
        from ..checkpoint import load_model
        from .__main__ import vlm_features

        model = load_model(args.model)
        if args.lora:
            from .. import lora

            lora.merge_file(model, args.lora, strength=args.strength)
        prompts = [s.prompt for s in new_color_scenes("heldout") + sc.scenes("heldout")]
        feats = vlm_features(args.vlm, model, prompts, rewrite=False)
        result = score(model, feats, tuple(range(args.seeds)), args.limit, args.out, args.steps)
        result |= {"model": args.model, "lora": args.lora, "strength": args.strength}
        if args.out:
            (Path(args.out) / "score.json").write_text(json.dumps(result, indent=2))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
