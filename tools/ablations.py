"""The paper's adapter ablations in miniature (Fig. 6: LAP vs last-layer features; Fig. 21: with
vs without the refiner), at equal training budget and several seeds, scored by the exact benchmark.

    python tools/ablations.py --out runs/ablations --features runs/scene_features.safetensors \
        [--seeds 0,1,2] [--steps 300] [--device cuda --precision bf16] [--jobs 9]

Each setting trains the same model from scratch with the trainer's CLI (the embedded model's
shape at patch 8: 64 x 64 single objects and pairs, SmolLM2 features from --features), then the
eval CLI scores 40 training and 40 held-out prompts with 2 sampling seeds. --jobs runs that many
trainings at once (on a GPU they share it). Prints a JSON table (mean and spread over seeds) and
writes it to OUT/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "lap+refiner": [],  # UniFusion's adapter: every third layer, LAP, 2-block refiner
    "last-layer+refiner": ["--layers", "last"],  # Fig. 6 baseline: the last layer's state only
    "lap, no refiner": ["--refiner-depth", "0"],  # Fig. 21: LAP straight into the DiT
}
COMMON = ["--data", "scenes", "--scene-kinds", "single,pair", "--resolution", "64", "--preset", "tiny",
          "--lap-heads", "8", "--refiner-heads", "8", "--dit-width", "256", "--dit-depth", "6", "--dit-heads", "4",
          "--patch", "8", "--shift", "1.0", "--sample-steps", "20", "--sample-cfg", "3.0",
          "--prompts-per-step", "32", "--timesteps-per-prompt", "8", "--lr", "1e-3", "--warmup", "50",
          "--adapter-lr", "0.3", "--t-mean", "1.0", "--ema-decay", "0.995", "--checkpoint-every", "100000",
          "--log-every", "50", "--val-prompts", "8", "--threads", "1"]
METRICS = ("color", "shape", "count", "position", "relation", "micro")


def run_one(args, name: str, extra: list[str], seed: int) -> dict:
    run = args.out / f"{name.replace(' ', '').replace(',', '-').replace('+', '-')}-seed{seed}"
    if not (run / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "unifusion_core.train", "--out", str(run), "--features", str(args.features),
               "--steps", str(args.steps), "--seed", str(seed), "--device", args.device, "--precision", args.precision,
               *COMMON, *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ev = run / "eval"
    if not (ev / "report.json").exists():
        subprocess.run([sys.executable, "-m", "unifusion_core.eval", "--model", str(run / "model.safetensors"),
                        "--features", str(args.features), "--seeds", str(args.eval_seeds), "--limit", "40",
                        "--device", args.device, "--out", str(ev)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((ev / "report.json").read_text())
    row = {"setting": name, "seed": seed, **{f"{split}_{k}": report[split]["avg"][k]
                                             for split in ("train", "heldout") for k in METRICS}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once")
    ap.add_argument("--eval-seeds", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    jobs = [(name, extra, int(s)) for s in args.seeds.split(",") for name, extra in SETTINGS.items()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda j: run_one(args, *j), jobs))
    summary = {}
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        summary[name] = {k: {"mean": round(statistics.mean(r[k] for r in mine), 4),
                             "stdev": round(statistics.pstdev(r[k] for r in mine), 4)}
                         for k in mine[0] if k not in ("setting", "seed")}
        summary[name]["runs"] = mine
    out = {"steps": args.steps, "seeds": args.seeds, "settings": summary,
           "command": " ".join(["python", "tools/ablations.py", *sys.argv[1:]])}
    (args.out / "ablations.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: {m: v[m]["mean"] for m in ("train_color", "heldout_color", "heldout_micro")}
                      for k, v in summary.items()}, indent=2))


if __name__ == "__main__":
    main()
