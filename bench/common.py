"""What every benchmark shares: timing, FLOP counting, a matmul's GFLOP/s, stand-in features."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


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


def random_feature_table(prompts: list[str], spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in for a features file: fp16 (T, L, D) per prompt with one token per word (the
    synthetic scene prompts average 8.2 words; SmolLM2 gives them 8.2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(len(p.split()), len(spec.layers), spec.hidden_size, generator=g).half() for p in prompts}
