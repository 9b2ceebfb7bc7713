"""Scaling of the trainer from 1 to N processes on this machine, and FSDP2's communication time.

    python -m bench distributed [--procs 2] [--steps 30] [--width 256 --depth 6 --patch 4]

Trains the same model on the same global batch (random stand-in features of SmolLM2's shape, the
synthetic scenes at 64 x 64) three ways: one process with one thread, one process with N threads,
N processes (torchrun, FSDP2, gloo) with one thread each, and reads samples/s from each run's
metrics (the median after the first log). Then, under torchrun, times what FSDP2 moves per step
for this model: an all-gather of the parameters (done twice: forward, and backward for resharded
blocks) and a reduce-scatter of the gradients, in fp32. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_features(path: Path) -> Path:
    from bench.common import random_feature_table
    from unifusion_core import scenes
    from unifusion_core.features import save_features_file
    from unifusion_core.presets import SMOLLM2_135M  # every third of its 30 layers

    save_features_file(path, random_feature_table([s.prompt for s in scenes.all_scenes()], SMOLLM2_135M), SMOLLM2_135M)
    return path


def train(out: Path, features: Path, args, procs: int, threads: int) -> float:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
              if procs > 1 else [sys.executable])
    cmd = [*launch, "-m", "unifusion_core.train", "--out", str(out), "--features", str(features),
           "--resolution", "64", "--preset", "tiny", "--dit-width", str(args.width), "--dit-depth", str(args.depth),
           "--dit-heads", "4", "--patch", str(args.patch), "--shift", "1.0", "--prompts-per-step", str(args.prompts),
           "--timesteps-per-prompt", str(args.k), "--steps", str(args.steps), "--log-every", "5",
           "--checkpoint-every", "100000", "--threads", str(threads), "--val-prompts", "2", "--sample-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # the first includes warm-up
    return statistics.median(rates)


def comm(numel: int, repeats: int = 5) -> None:
    """Under torchrun: seconds for FSDP2's per-step traffic of a model of `numel` parameters."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    shard = torch.randn((numel + world - 1) // world)
    whole = torch.empty(shard.numel() * world)
    times = {"all_gather": [], "reduce_scatter": []}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather_into_tensor(whole, shard)
        times["all_gather"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.reduce_scatter_tensor(shard, whole)
        times["reduce_scatter"].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"all_gather_s": med["all_gather"], "reduce_scatter_s": med["reduce_scatter"],
                          "per_step_s": 2 * med["all_gather"] + med["reduce_scatter"], "bytes": 4 * numel}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (global)")
    ap.add_argument("--k", type=int, default=2, help="timesteps per prompt")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--comm", type=int, help=argparse.SUPPRESS)  # internal: the communication probe
    args = ap.parse_args(argv)
    if args.comm:
        return comm(args.comm)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        features = write_features(tmp / "features.safetensors")
        one_1 = train(tmp / "p1t1", features, args, 1, 1)
        one_n = train(tmp / "p1tn", features, args, 1, args.procs)
        many = train(tmp / "pn", features, args, args.procs, 1)
        from safetensors.torch import load_file

        numel = sum(t.numel() for t in load_file(str(tmp / "pn" / "model.safetensors")).values())
    probe = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.procs}", __file__, "--comm", str(numel)],
                           cwd=ROOT, check=True, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    traffic = json.loads(probe.stdout.strip().splitlines()[-1])
    step_s = args.prompts * args.k / many
    print(json.dumps({
        "machine": f"{os.cpu_count()} CPU cores", "procs": args.procs, "parameters": numel,
        "global_batch": f"{args.prompts} prompts x {args.k} timesteps",
        "model": f"DiT width {args.width}, depth {args.depth}, patch {args.patch}, 64x64",
        "samples_per_s": {"1 process, 1 thread": round(one_1, 2), f"1 process, {args.procs} threads": round(one_n, 2),
                          f"{args.procs} processes, 1 thread each": round(many, 2)},
        "speedup_vs_1_thread": round(many / one_1, 3), f"speedup_vs_{args.procs}_threads": round(many / one_n, 3),
        "step_s_sharded": round(step_s, 4), "communication": traffic,
        "communication_share_of_step": round(traffic["per_step_s"] / step_s, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
