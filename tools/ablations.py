"""The paper's adapter ablations in miniature (Fig. 6: LAP vs last-layer features; Fig. 21: with
vs without the refiner), at equal training budget and several seeds, scored by the exact benchmark.

    python tools/ablations.py --out runs/ablations [--seeds 0,1,2] [--steps 300]

Each setting trains the same small model with the trainer's CLI on the single-object synthetic
scenes (32x32, SmolLM2 features from --features), then scores every single-object prompt (train
and held-out splits) with 2 sampling seeds. Prints a JSON table (mean and spread over seeds) and
writes it to OUT/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "lap+refiner": [],  # UniFusion's adapter: every third layer, LAP, 2-block refiner
    "last-layer+refiner": ["--layers", "last"],  # Fig. 6 baseline: the last layer's state only
    "lap, no refiner": ["--refiner-depth", "0"],  # Fig. 21: LAP straight into the DiT
}
COMMON = ["--data", "scenes", "--scene-kinds", "single", "--resolution", "32", "--preset", "tiny",
          "--lap-heads", "8", "--refiner-heads", "8", "--dit-width", "128", "--dit-depth", "4", "--dit-heads", "4",
          "--patch", "4", "--shift", "1.0", "--t-mean", "1.0", "--lr", "2e-3", "--warmup", "30", "--ema-decay", "0.99",
          "--prompts-per-step", "8", "--timesteps-per-prompt", "8", "--checkpoint-every", "100000",
          "--threads", "1", "--sample-steps", "12", "--sample-cfg", "3.0", "--log-every", "50"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from unifusion_core import load_model, scenes
    from unifusion_core.eval import run_benchmark
    from unifusion_core.eval.model_gen import model_generate_fn
    from unifusion_core.train.setup import load_features_file

    table, stored = load_features_file(args.features)
    chosen = scenes.scenes(kind="single")
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, extra in SETTINGS.items():
            run = args.out / f"{name.replace(' ', '').replace(',', '-').replace('+', '-')}-seed{seed}"
            if not (run / "model.safetensors").exists():
                cmd = [sys.executable, "-m", "unifusion_core.train", "--out", str(run), "--features", str(args.features),
                       "--steps", str(args.steps), "--seed", str(seed), *COMMON, *extra]
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            model = load_model(run / "model.safetensors")
            from unifusion_core.features import Features

            pick = [stored.layers.index(i) for i in model.config.encoder.layers]
            feats = {s.prompt: Features(table[s.prompt][:, pick].float(), model.config.encoder.layers, model.config.encoder)
                     for s in chosen}
            report = run_benchmark(model_generate_fn(model, feats), chosen, seeds=(0, 1))
            row = {"seed": seed, **{k: report["overall"]["avg"][k] for k in ("color", "shape", "position", "micro")},
                   "heldout_micro": report["heldout"]["avg"]["micro"]}
            results[name].append(row)
            print(json.dumps({"setting": name, **row}), flush=True)
    summary = {}
    for name, rows in results.items():
        summary[name] = {k: {"mean": round(statistics.mean(r[k] for r in rows), 4),
                             "stdev": round(statistics.pstdev(r[k] for r in rows), 4)}
                         for k in ("color", "shape", "position", "micro", "heldout_micro")}
        summary[name]["runs"] = rows
    out = {"steps": args.steps, "seeds": args.seeds, "prompts": len(chosen), "settings": summary,
           "command": " ".join(["python", "tools/ablations.py", *sys.argv[1:]])}
    (args.out / "ablations.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: {m: v[m]["mean"] for m in ("color", "shape", "position", "micro")} for k, v in summary.items()}, indent=2))


if __name__ == "__main__":
    main()
