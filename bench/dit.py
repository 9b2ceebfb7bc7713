"""The DiT's forward time and achieved GFLOP/s beside a plain matmul's (`dit`)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

from unifusion_core import UniFusionModel
from unifusion_core.sampling import latent_grid

from .common import flops_of, matmul_gflops, timed


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
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

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
            _, _, H, W = latent_grid(cfg, size, size)  # the grid the sampler runs on
            x = torch.randn(1, cfg.latent.channels, H, W, dtype=dtype, device=device)
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
                "image_tokens": (H // p) * (W // p),
                "forward_ms": round(1e3 * statistics.median(t1), 2),
                "forward_gflop": round(flops / 1e9, 2),
                "achieved_gflops": round(flops / min(t1) / 1e9, 1),
                "cfg_step_ms": round(1e3 * statistics.median(t2), 2),
            })
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
