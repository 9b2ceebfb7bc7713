"""One training step, LAP + refiner once per prompt vs once per sample (`train`)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from unifusion_core import UniFusionModel

from .common import flop_counter, matmul_gflops, random_feature_table, timed


class _EachKTimes:
    """A task mixture that hands out each of its draws K times in a row: the plain loop's P*K
    samples are then the amortised loop's P samples, each at K timesteps."""

    def __init__(self, mixture, k: int):
        self.mixture, self.k = mixture, k

    def draw(self, n: int) -> list[tuple[str, int]]:
        if n % self.k:
            raise ValueError(f"draws of {n} samples cannot repeat each sample {self.k} times")
        return [d for d in self.mixture.draw(n // self.k) for _ in range(self.k)]

    def state_dict(self) -> dict:
        return self.mixture.state_dict()


def bench_train(argv: list[str]) -> None:
    from unifusion_core.config import every_nth_layer
    from unifusion_core.presets import SMOLLM2_135M, TINY_ENCODER, get_preset
    from unifusion_core.train.loop import TrainConfig, Trainer, conditioning
    from unifusion_core.train.mixture import TaskMixture
    from unifusion_core.train.setup import PromptFeatures, load_features_file
    from unifusion_core.train.sources import SyntheticScenes

    ap = argparse.ArgumentParser(description="training step: LAP + refiner once per prompt vs once per sample")
    ap.add_argument("--features", type=Path, help="features file (default: random features of SmolLM2's shapes)")
    ap.add_argument("--encoder", default="smollm2", choices=["smollm2", "tiny"],
                    help="encoder of the random features (tiny: the unit tests' 32-wide, 6-layer one)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--dit-width", type=int, default=256)
    ap.add_argument("--dit-depth", type=int, default=6)
    ap.add_argument("--dit-heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--lap-heads", type=int, default=8)
    ap.add_argument("--refiner-heads", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--timesteps-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each loop (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop, after the FLOP-counted one")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square fp32 matmul (the peak)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's current)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    P, K, R = args.prompts_per_step, args.timesteps_per_prompt, args.resolution

    src = SyntheticScenes("train", R, seed=0)
    prompts = sorted({s.prompt for s in src.scenes})
    if args.features:
        table, stored = load_features_file(args.features)
        spec = dataclasses.replace(stored, layers=every_nth_layer(stored.num_layers))  # the CLI's --layers 3
        missing = [p for p in prompts if p not in table]
        if missing:
            raise SystemExit(f"--features {args.features}: no features for {len(missing)} of the scene prompts, "
                             f"e.g. {missing[0]!r} (it must hold every train-split scene prompt)")
        features_desc = str(args.features)
    else:
        base = SMOLLM2_135M if args.encoder == "smollm2" else TINY_ENCODER
        stored = spec = base
        table = random_feature_table(prompts, spec)
        features_desc = f"random, {base.name} shapes, one token per word"
    tokens = [table[p].shape[0] for p in prompts]

    config = get_preset("tiny").replace(
        encoder=spec, latent="pixel", lap={"heads": args.lap_heads}, refiner={"heads": args.refiner_heads},
        dit={"hidden_size": args.dit_width, "depth": args.dit_depth, "heads": args.dit_heads, "patch_size": args.patch,
             "axes_dim": None},
        sampling={"size": (R, R), "shift": 1.0},
    )
    torch.manual_seed(0)
    model = UniFusionModel(config)
    out = tempfile.mkdtemp(prefix="unifusion-bench-train-")  # train_step writes nothing; the Trainer wants a folder

    def trainer(m: UniFusionModel, prompts_per_step: int, k: int, mixture) -> Trainer:
        feats = PromptFeatures(spec, stored.layers, table=table)
        cfg = TrainConfig(out=out, steps=10_000, prompts_per_step=prompts_per_step, timesteps_per_prompt=k, warmup=10)
        return Trainer(cfg, m, mixture, {"t2i": src}, feats)

    mix = lambda: TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0)
    amortised = trainer(model, P, K, mix())
    plain = trainer(copy.deepcopy(model), P * K, 1, _EachKTimes(mix(), K))
    loops = {"amortised": amortised, "plain": plain}
    load_before = os.getloadavg()[0]

    # the matmul ceilings: a square one, and the DiT's MLP up-projection at this batch's token count
    p = args.patch
    rows = P * K * ((R // p) ** 2 + round(statistics.mean(tokens)))
    peak = matmul_gflops(args.matmul, torch.float32, "cpu", 3, lambda: None)
    dit_mm = matmul_gflops(4 * args.dit_width, torch.float32, "cpu", 3, lambda: None, m=rows, k=args.dit_width)

    # one FLOP-counted step each (it also warms up), then alternate the timed steps so that load
    # from other work on the machine hits both loops alike
    flops, parts = {}, {}
    for name, tr in loops.items():
        counter = flop_counter()
        with counter:
            tr.train_step()
        flops[name] = counter.get_total_flops()
        by_module = counter.get_flop_counts()
        # the step runs as TrainStep(model): FLOPs are keyed by module path (TrainStep.model.lap, ...)
        parts[name] = {part: sum(by_module.get(f"TrainStep.model.{part}", {}).values())
                       for part in ("lap", "refiner", "dit")}
    for _ in range(args.warmup):
        for tr in loops.values():
            tr.train_step()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.steps):
        for name, tr in loops.items():
            t0 = time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
    step_s = {name: statistics.median(t) for name, t in times.items()}

    # LAP + refiner alone, forward + backward, for one step's prompts (P) and samples (P*K)
    samples = amortised.draw(P)
    feats = amortised.features(samples)

    def cond_fwd_bwd(n: int):
        fs = [feats[i % P] for i in range(n)]
        c = conditioning(model, fs, torch.zeros(n, dtype=torch.bool), amortised.device)
        c.tokens.backward(torch.ones_like(c.tokens))
        model.zero_grad(set_to_none=True)

    cond_s = {"amortised": statistics.median(timed(lambda: cond_fwd_bwd(P), args.steps)),
              "plain": statistics.median(timed(lambda: cond_fwd_bwd(P * K), args.steps))}

    def loop_result(name: str) -> dict:
        f, s = flops[name], step_s[name]
        lap_ref = parts[name]["lap"] + parts[name]["refiner"]
        return {
            "prompts_per_step": P if name == "amortised" else P * K,
            "timesteps_per_prompt": K if name == "amortised" else 1,
            "step_s": round(s, 5),
            "step_s_all": [round(t, 5) for t in times[name]],
            "samples_per_s": round(P * K / s, 2),
            "step_gflop": round(f / 1e9, 2),
            "achieved_gflops": float(f"{f / s / 1e9:.3g}"),  # 3 significant digits: tiny runs are not 0.0
            "fraction_of_matmul_peak": float(f"{f / s / 1e9 / peak:.3g}"),
            "lap_refiner_flop_share": round(lap_ref / f, 3),
            "lap_refiner_fwd_bwd_s": round(cond_s[name], 3),
            "lap_refiner_time_share": round(cond_s[name] / s, 3),
        }

    a, b = loop_result("amortised"), loop_result("plain")
    speedup = step_s["plain"] / step_s["amortised"]
    n = model.num_parameters()
    result = {
        "benchmark": "train",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "config": {"latent": f"pixel {R}x{R}", "dit": {"width": args.dit_width, "depth": args.dit_depth,
                   "heads": args.dit_heads, "patch": p, "image_tokens": (R // p) ** 2},
                   "lap_heads": args.lap_heads, "refiner_heads": args.refiner_heads,
                   "encoder": {"name": spec.name, "hidden_size": spec.hidden_size, "layers": len(spec.layers)}},
        "features": features_desc,
        "mean_prompt_tokens": round(statistics.mean(tokens), 2),
        "params": n,
        "P": P,
        "K": K,
        "samples_per_step": P * K,
        "matmul_peak": {"shape": f"{args.matmul}x{args.matmul} @ {args.matmul}x{args.matmul} fp32",
                        "gflops": float(f"{peak:.3g}")},  # 3 significant digits: a loaded machine is not 0.0
        "matmul_dit_mlp": {"shape": f"{rows}x{args.dit_width} @ {args.dit_width}x{4 * args.dit_width} fp32",
                           "gflops": float(f"{dit_mm:.3g}")},
        "amortised": a,
        "plain": b,
        "speedup": round(speedup, 2),
        "notes": "FLOPs: FlopCounterMode, forward + backward of one step (attention included); the optimizer "
                 "and EMA are in the time, not the FLOPs. LAP + refiner time: forward + backward alone "
                 "on P (amortised) or P*K (plain) prompts without caption dropout.",
    }
    result["summary"] = (
        f"train step, {R}x{R} pixel DiT {args.dit_width}x{args.dit_depth} patch {p} ({n['total'] / 1e6:.1f}M params), "
        f"P={P} x K={K}: {a['samples_per_s']} samples/s vs {b['samples_per_s']} for a plain loop "
        f"({speedup:.2f}x); {a['achieved_gflops']} GFLOP/s = {a['fraction_of_matmul_peak']:.0%} of a "
        f"{args.matmul}^2 fp32 matmul; LAP+refiner {a['lap_refiner_time_share']:.0%} of the step "
        f"(plain loop: {b['lap_refiner_time_share']:.0%}); {result['threads']} thread(s)"
    )
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # other work on this machine
    shutil.rmtree(out, ignore_errors=True)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
