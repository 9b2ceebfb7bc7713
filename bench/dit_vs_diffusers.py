"""Our DiT against diffusers' transformers of the same size, in one process: time, FLOPs, GFLOP/s.

    python -m bench dit-vs-diffusers [--preset small] [--sizes 256 512] [--cond-tokens 128]
        [--threads 2] [--repeats 5] [--device cpu] [--dtype float32] [--depth N] [--profile]
        [--peak-tflops T]

On a GPU, the issue's comparison (paper-5b width, 1024², bf16) is
    --device cuda --dtype bfloat16 --preset paper-5b --depth N --sizes 1024 --cond-tokens 512
    --peers flux --peak-tflops 989
which adds each model's MFU and peak memory (`peak_gib`: the weights of every model built, plus
that model's guided step).

diffusers is a benchmark-only dependency (requirements-train.txt); the pack never needs it. The
peers are built with random weights at the preset DiT's width, heads and depth:
- Flux single-stream: `FluxTransformer2DModel` with 0 double-stream and `depth` single-stream
  blocks (the same 12 D^2 per token and block as ours; Flux packs 2 x 2 patches outside the
  model, so its input is the already patchified latent);
- Lumina 2: `Lumina2Transformer2DModel` of the same width and depth (its two refiners of two
  blocks each come on top, so it does more work).
Each forward's FLOPs come from torch.utils.flop_counter; times are medians of `--repeats` after
a warm-up, for one forward (batch 1) and one guided sampling step (batch 2, both halves with the
same T tokens: how a true-CFG pipeline runs Flux, whose negative prompt is padded like the
positive). `ratio_vs_flux` is our time over Flux's at (nearly) equal FLOPs: below 1 is faster.
Ours also runs the guided step as our sampler does, against its 1-token null conditioning:
`sampler_step_ms` as now (the prompt and the null in calls of their own, unpadded, when the null
would need more than sampling.MAX_PADDING tokens of padding: T > 65) and
`padded_sampler_step_ms` (one batch, the null padded to T and masked, as before);
`sampler_ratio_vs_flux` is the first over Flux's guided step. `--profile` adds our forward's
op-level profile (self time per op on the device, top 15). One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from unifusion_core import UniFusionModel
from unifusion_core.conditioning import Conditioning
from unifusion_core.sampling import MAX_PADDING, guided_velocity, latent_grid

from .common import flops_of, matmul_gflops, timed


def ours(preset: str, depth: int | None, dtype, device):
    overrides = {"dit": {"depth": depth}} if depth else {}
    model = UniFusionModel.from_preset(preset, dtype=dtype, device=device, **overrides)
    return model.eval().dit, model.config


def flux(cfg, dtype, device):
    from diffusers import FluxTransformer2DModel

    d, p = cfg.dit, cfg.dit.patch_size
    head = d.hidden_size // d.heads
    m = FluxTransformer2DModel(patch_size=1, in_channels=cfg.latent.channels * p * p, num_layers=0,
                               num_single_layers=d.depth, attention_head_dim=head, num_attention_heads=d.heads,
                               joint_attention_dim=d.hidden_size, pooled_projection_dim=d.hidden_size,
                               axes_dims_rope=tuple(d.axes_dim))
    return m.to(device=device, dtype=dtype).eval()


def lumina2(cfg, dtype, device):
    from diffusers import Lumina2Transformer2DModel

    d = cfg.dit
    m = Lumina2Transformer2DModel(sample_size=128, patch_size=d.patch_size, in_channels=cfg.latent.channels,
                                  hidden_size=d.hidden_size, num_layers=d.depth, num_refiner_layers=2,
                                  num_attention_heads=d.heads, num_kv_heads=d.heads, axes_dim_rope=tuple(d.axes_dim),
                                  axes_lens=(1024, 1024, 1024), cap_feat_dim=d.hidden_size)
    return m.to(device=device, dtype=dtype).eval()


def calls(name: str, model, cfg, size: int, T: int, dtype, device):
    """A function of the batch size that runs one forward of `model` at `size`."""
    _, _, H, W = latent_grid(cfg, size, size)  # the grid the sampler runs on
    C, p, D = cfg.latent.channels, cfg.dit.patch_size, cfg.dit.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, H, W, generator=g).to(device, dtype)
    cond = torch.randn(1, T, D, generator=g).to(device, dtype)
    t = torch.full((1,), 0.5, device=device)
    h, w = H // p, W // p
    if name == "ours":
        return lambda b: model(x.expand(b, -1, -1, -1), t.expand(b), cond.expand(b, -1, -1))
    if name == "flux":
        packed = x.reshape(1, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, C * p * p)
        img_ids = torch.zeros(h, w, 3, device=device)
        img_ids[..., 1], img_ids[..., 2] = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None]
        img_ids, txt_ids = img_ids.reshape(h * w, 3), torch.zeros(T, 3, device=device)
        pooled = torch.randn(1, D, generator=g).to(device, dtype)
        return lambda b: model(hidden_states=packed.expand(b, -1, -1), encoder_hidden_states=cond.expand(b, -1, -1),
                               pooled_projections=pooled.expand(b, -1), timestep=t.expand(b), img_ids=img_ids,
                               txt_ids=txt_ids, return_dict=False)
    mask = torch.ones(1, T, dtype=torch.bool, device=device)
    return lambda b: model(x.expand(b, -1, -1, -1), t.expand(b), cond.expand(b, -1, -1), mask.expand(b, -1),
                           return_dict=False)


def sampler_steps(dit, cfg, size: int, T: int, dtype, device):
    """One guided step of our sampler against the learned 1-token null conditioning, as two
    functions: grouped as sampling.denoise groups the rows now (the prompt and the null apart and
    unpadded when T > MAX_PADDING + 1), and as it ran before (one batch, the null padded to T, masked)."""
    _, _, H, W = latent_grid(cfg, size, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.latent.channels, H, W, generator=g).to(device, dtype)
    ones = lambda n: torch.ones(1, n, dtype=torch.bool, device=device)
    cond = Conditioning(torch.randn(1, T, cfg.dit.hidden_size, generator=g).to(device, dtype), ones(T))
    both = Conditioning.cat([cond, Conditioning(dit.null_cond[None], ones(1))])
    fn = lambda x, t, c: dit(x, t, c.tokens, c.mask)
    return (lambda: guided_velocity(fn, x, 0.5, both.by_length(MAX_PADDING), 4.0),
            lambda: guided_velocity(fn, x, 0.5, [(None, both)], 4.0))


def profile(fn, device, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    cuda = device.type == "cuda"
    with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        fn()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    rows = sorted(p.key_averages(), key=own, reverse=True)
    total = sum(own(e) for e in rows)
    return [{"op": e.key, "self_ms": round(own(e) / 1e3, 2), "share_pct": round(100 * own(e) / total, 1),
             "calls": e.count} for e in rows[:top]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--depth", type=int, help="DiT blocks (default: the preset's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--cond-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peers", nargs="*", default=["flux", "lumina2"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's dense peak for --dtype (989 for an H100's bf16): adds each model's MFU")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    dit, cfg = ours(args.preset, args.depth, dtype, device)
    models = {"ours": dit}
    for name, build in (("flux", flux), ("lumina2", lumina2)):
        if name in args.peers:
            models[name] = build(cfg, dtype, device)
    result = {"preset": args.preset, "depth": cfg.dit.depth, "width": cfg.dit.hidden_size, "heads": cfg.dit.heads,
              "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "cond_tokens": args.cond_tokens,
              "matmul_2048_gflops": round(matmul_gflops(2048, dtype, str(device), args.repeats, sync), 1),
              "parameters_m": {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for k, m in models.items()},
              "sizes": []}
    with torch.inference_mode():
        for size in args.sizes:
            row = {"size": size}
            for name, model in models.items():
                fn = calls(name, model, cfg, size, args.cond_tokens, dtype, device)
                flops = flops_of(lambda: fn(1))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                one = timed(lambda: (fn(1), sync()), args.repeats)
                two = timed(lambda: (fn(2), sync()), args.repeats)
                row[name] = {"forward_ms": round(1e3 * statistics.median(one), 1), "gflop": round(flops / 1e9, 4),
                             "gflops": round(flops / statistics.median(one) / 1e9, 1),
                             "guided_step_ms": round(1e3 * statistics.median(two), 1)}
                if args.peak_tflops:
                    row[name]["mfu_pct"] = round(100 * row[name]["gflops"] / (1e3 * args.peak_tflops), 1)
                if device.type == "cuda":  # weights of every model built plus this one's guided step
                    row[name]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            unpadded, padded = sampler_steps(dit, cfg, size, args.cond_tokens, dtype, device)
            for key, step in (("sampler_step_ms", unpadded), ("padded_sampler_step_ms", padded)):
                row["ours"][key] = round(1e3 * statistics.median(timed(lambda: (step(), sync()), args.repeats)), 1)
            row["ours"]["sampler_step_gflop"] = round(flops_of(unpadded) / 1e9, 4)
            row["unpadded_vs_padded"] = round(row["ours"]["sampler_step_ms"] / row["ours"]["padded_sampler_step_ms"], 3)
            if "flux" in row:
                row["ratio_vs_flux"] = round(row["ours"]["forward_ms"] / row["flux"]["forward_ms"], 3)
                row["guided_ratio_vs_flux"] = round(row["ours"]["guided_step_ms"] / row["flux"]["guided_step_ms"], 3)
                row["flop_ratio_vs_flux"] = round(row["ours"]["gflop"] / row["flux"]["gflop"], 3)
                row["sampler_ratio_vs_flux"] = round(row["ours"]["sampler_step_ms"] / row["flux"]["guided_step_ms"], 3)
            if args.profile:
                fn = calls("ours", dit, cfg, size, args.cond_tokens, dtype, device)
                row["profile_ours"] = profile(lambda: (fn(1), sync()), device)
            result["sizes"].append(row)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
