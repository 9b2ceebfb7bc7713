"""LoRA against full training on the embedded model (`lora`): trainable parameters, optimizer and EMA
state and peak memory, each mode in its own process (a fresh peak RSS); step times of all modes in one
process, their steps alternated so that load from other work hits them alike; ratios in one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MODES = {"full": None, "lora-dit": "dit", "lora-all": "dit,modulation,lap,refiner"}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def make_trainer(mode: str, rank: int, P: int, K: int):
    """The embedded checkpoint, to be trained on its own scenes in `mode` (random stand-in features of
    SmolLM2's shapes: the VLM is not what is measured)."""
    from unifusion_core import bundled_model, load_model
    from unifusion_core.train.loop import TrainConfig, Trainer
    from unifusion_core.train.mixture import TaskMixture
    from unifusion_core.train.setup import PromptFeatures
    from unifusion_core.train.sources import SyntheticScenes

    from .common import random_feature_table

    path = bundled_model()
    if path is None:
        raise SystemExit("the embedded model (unifusion_core/assets/unifusion-scenes-64.safetensors) is missing")
    model = load_model(path, dtype=torch.float32)
    spec, R = model.config.encoder, model.config.sampling.size[0]
    src = SyntheticScenes("train", R, seed=0)
    table = random_feature_table(sorted({s.prompt for s in src.scenes}), spec)
    cfg = TrainConfig(out=tempfile.mkdtemp(prefix="unifusion-bench-lora-"), steps=10_000, prompts_per_step=P,
                      timesteps_per_prompt=K, warmup=10, lora_rank=rank if MODES[mode] else 0,
                      lora_targets=MODES[mode] or "dit")
    return Trainer(cfg, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src},
                   PromptFeatures(spec, spec.layers, table=table))


def measure(mode: str, rank: int, P: int, K: int, warmup: int) -> dict:
    """One mode's sizes and peak RSS after `warmup` steps, in this process."""
    trainer = make_trainer(mode, rank, P, K)
    for _ in range(warmup):
        trainer.train_step()
    model = trainer.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in params),
        "weights_bytes": _nbytes(params),
        "grad_bytes": _nbytes(p.grad for p in params if p.grad is not None),
        "optimizer_state_bytes": _nbytes(v for s in trainer.optimizer.state.values() for v in s.values()),
        "ema_bytes": _nbytes(trainer.ema.values()),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }


def step_times(rank: int, P: int, K: int, steps: int, warmup: int) -> dict[str, tuple[list[float], list[float]]]:
    """Every mode's step times (wall clock, and this process's CPU time), the modes' steps alternated."""
    trainers = {mode: make_trainer(mode, rank, P, K) for mode in MODES}
    for _ in range(warmup):
        for tr in trainers.values():
            tr.train_step()
    times: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in MODES}
    for _ in range(steps):
        for mode, tr in trainers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train_step()
            times[mode][0].append(time.perf_counter() - t0)
            times[mode][1].append(time.process_time() - c0)
    return times


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench lora", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--timesteps-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each mode (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the optimizer's state is made)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's current)")
    ap.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)  # the child process of one mode
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    P, K = args.prompts_per_step, args.timesteps_per_prompt
    if args.one:
        out = measure(args.one, args.rank, P, K, args.warmup)
        sys.stdout.write(json.dumps(out) + "\n")
        return out
    results = {}
    for mode in MODES:  # one process each: the peak RSS of one cannot hide in another's
        cmd = [sys.executable, "-m", "bench", "lora", "--one", mode, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode:
            raise SystemExit(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, (wall, cpu) in step_times(args.rank, P, K, args.steps, args.warmup).items():
        results[mode] |= {"step_s": round(statistics.median(wall), 4), "step_s_all": [round(t, 4) for t in wall],
                          "step_cpu_s": round(statistics.median(cpu), 4),
                          "samples_per_s": round(P * K / statistics.median(wall), 2)}
    full = results["full"]
    state = lambda r: r["weights_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] + r["ema_bytes"]
    for mode, r in results.items():
        r["training_state_bytes"] = state(r)
        if mode != "full":
            r["vs_full"] = {
                "trainable_params": round(r["trainable_params"] / full["trainable_params"], 5),
                "optimizer_state_bytes": round(r["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5),
                "training_state_bytes": round(state(r) / state(full), 3),
                "peak_rss": round(r["peak_rss_mib"] / full["peak_rss_mib"], 3),
                "speedup": round(full["step_s"] / r["step_s"], 2),
                "speedup_cpu_time": round(full["step_cpu_s"] / r["step_cpu_s"], 2),
            }
    lora = results["lora-dit"]
    result = {
        "benchmark": "lora",
        "model": "the embedded unifusion-scenes-64.safetensors (18.0 M parameters), fp32, 64x64 pixel",
        "rank": args.rank,
        "alpha": args.rank,
        "targets": {m: t or "every weight" for m, t in MODES.items()},
        "P": P, "K": K, "samples_per_step": P * K,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "modes": results,
        "notes": "training_state_bytes: weights + gradients + AdamW moments + EMA. peak_rss: the whole process "
                 "(Python, torch, data and activations included), each mode in its own process. With LoRA the "
                 "base is frozen: no weight gradients, moments or EMA for it, and with the DiT's blocks as the "
                 "only targets no backward through LAP and the refiner at all. step_cpu_s: this process's CPU "
                 "time (the work; the wall clock of a shared machine also holds other processes' load).",
        "summary": (f"LoRA rank {args.rank} on the DiT blocks vs full training of the embedded model, P={P} x K={K}: "
                    f"{lora['trainable_params']:,} vs {full['trainable_params']:,} trainable parameters "
                    f"({lora['vs_full']['trainable_params']:.2%}), optimizer state "
                    f"{lora['optimizer_state_bytes'] / 2**20:.2f} vs {full['optimizer_state_bytes'] / 2**20:.1f} MiB, "
                    f"peak RSS {lora['peak_rss_mib']:.0f} vs {full['peak_rss_mib']:.0f} MiB, step "
                    f"{lora['step_s']:.3f} vs {full['step_s']:.3f} s ({lora['vs_full']['speedup']}x; CPU time "
                    f"{lora['vs_full']['speedup_cpu_time']}x)"),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result
