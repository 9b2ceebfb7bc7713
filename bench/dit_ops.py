"""The DiT's eager elementwise work and its compiled path, against the ops before them (`dit-ops`).

Three ways to run the same DiT, weights and inputs, timed in one run:
- `previous`: the eager ops as they were before (RoPE as cos/sin in fp32 on (B, H, S, Dh) copies of
  q and k, modulation and gated residuals as separate multiplies and adds), kept here as the baseline;
- `fused`: the eager ops now (RoPE one complex multiply on views, addcmul for modulation and gates);
- `compiled`: the blocks under torch.compile (UniFusionDiT.compile_blocks), with what its first call
  cost (compiling) and whether a second call compiled anything.
Each reports the median forward time of a guided step (batch 2), the ratio to `previous`, the largest
difference from `previous`, and (--profile) the share of time outside matrix multiplies and attention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import torch
from einops import rearrange
from torch import Tensor

from unifusion_core import UniFusionModel
from unifusion_core.dit import DiTBlock, graphs_compiled
from unifusion_core.layers import SelfAttention, attention
from unifusion_core.presets import get_preset
from unifusion_core.sampling import latent_grid

from .common import flops_of, timed

# --- the previous eager ops (the baseline) -------------------------------------------------------


def _previous_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x (B, H, S, Dh); rope (B, S, Dh/2, 2): the cos/sin form in fp32 with its copies."""
    cos, sin = rope[:, None].unbind(-1)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def _previous_attention(self: SelfAttention, x: Tensor, mask=None, rope=None) -> Tensor:
    q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
    if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        q, k = _previous_rope(q, rope), _previous_rope(k, rope)
    return self.proj(rearrange(attention(q, k, v, mask), "b h s d -> b s (h d)"))


def _previous_block(self: DiTBlock, x: Tensor, mod: Tensor, mask, rope) -> Tensor:
    def modulate(y, shift, scale):
        return y * (1 + scale[:, None]) + shift[:, None]

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod + self.modulation.to(mod)).unbind(1)
    x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), mask, rope)
    return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class previous_ops:
    """Within this context SelfAttention and DiTBlock run the previous eager ops."""

    def __enter__(self):
        self.saved = SelfAttention.forward, DiTBlock.forward
        SelfAttention.forward, DiTBlock.forward = _previous_attention, _previous_block

    def __exit__(self, *exc):
        SelfAttention.forward, DiTBlock.forward = self.saved


# --- measuring -----------------------------------------------------------------------------------

# Kernel or op names of matrix multiplies and attention (cuBLAS / CUTLASS / cuDNN / flash / oneDNN / aten).
_MATMUL_OPS = ("gemm", "xmma", "cutlass", "cublas", "flash", "fmha", "cudnn", "attention", "aten::mm", "aten::addmm",
               "aten::bmm", "aten::linear", "aten::matmul", "mkldnn")


def _elementwise_share(fn, device: str) -> float:
    """The share of time outside matrix multiplies and attention: of the kernels' device time on
    CUDA, of the ops' own CPU time on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
    total = other = 0.0
    for e in prof.key_averages():
        if cuda and e.device_type.name != "CUDA":
            continue  # host records; their kernels are counted as their own entries
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        total += t
        if not any(m in e.key.lower() for m in _MATMUL_OPS):
            other += t
    return other / total if total else 0.0


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description="DiT forward: previous eager ops vs fused eager vs compiled")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--depth", type=int, help="DiT blocks (default: the preset's)")
    ap.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    ap.add_argument("--cond-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="+", default=["previous", "fused", "compiled"],
                    choices=["previous", "fused", "compiled"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also the share of time outside GEMMs and attention")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak, for MFU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    result = {"preset": args.preset, "size": args.size, "cond_tokens": args.cond_tokens, "device": device,
              "machine": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": []}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        cfg = get_preset(args.preset)
        if args.depth:
            cfg = cfg.replace(dit={"depth": args.depth})
        model = UniFusionModel(cfg, dtype=dtype, device=device).eval().requires_grad_(False)
        g = torch.Generator(device="cpu").manual_seed(0)
        for p in model.dit.parameters():  # adaLN-Zero starts every block as the identity: give it work
            p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p))
        cfg = model.config
        _, _, H, W = latent_grid(cfg, args.size, args.size)
        x = torch.randn(2, cfg.latent.channels, H, W, generator=g).to(device, dtype)
        t = torch.tensor([0.5, 0.5], device=device)
        cond = torch.randn(2, args.cond_tokens, cfg.dit.hidden_size, generator=g).to(device, dtype)

        def step():
            out = model.dit(x, t, cond)
            sync()
            return out

        with torch.inference_mode():
            flops = flops_of(step)
            base = None
            for variant in args.variants:
                model.dit.compile_blocks(variant == "compiled")
                row = {"dtype": dtype_name, "variant": variant}
                if variant == "compiled":
                    graphs = graphs_compiled()
                    t0 = time.perf_counter()
                    step()
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)
                    row["graphs_compiled_first_call"] = graphs_compiled() - graphs
                    graphs = graphs_compiled()
                    step()
                    row["graphs_compiled_second_call"] = graphs_compiled() - graphs
                with previous_ops() if variant == "previous" else contextlib.nullcontext():
                    out, times = step(), timed(step, args.repeats)
                    share = _elementwise_share(step, device) if args.profile else None
                if base is None:
                    base = (out.float(), statistics.median(times))
                ms = statistics.median(times)
                row.update(forward_ms=round(1e3 * ms, 3), best_ms=round(1e3 * min(times), 3),  # µs: tiny runs' ratios
                           speedup_vs_first=round(base[1] / ms, 3),
                           max_abs_diff_vs_first=float((out.float() - base[0]).abs().max()),
                           tflop=round(flops / 1e12, 4), image_28_guided_steps_s=round(28 * ms, 2))
                if args.peak_tflops:
                    row["mfu"] = round(flops / min(times) / 1e12 / args.peak_tflops, 4)
                if share is not None:
                    row["share_outside_gemm_attention"] = round(share, 3)
                result["runs"].append(row)
            model.dit.compile_blocks(False)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result
