"""The rectified-flow convention, owned in one place for sampling and training (Sec. 2.2).

    x_t = (1 - t) x_0 + t * noise,   t in [0, 1] (1 = pure noise)
    v   = dx_t/dt = noise - x_0      (what the DiT predicts)

Training draws t from a logit-normal (SD3) and bends it with the same timestep shift the sampler
uses for that checkpoint, so both see the same noise levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import SamplingParams


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t for clean x0 (B, ...) and times t (B,)."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity the model is trained to predict."""
    return noise - x0


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3/Flux shift: spends more of the schedule at high noise when shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, p: SamplingParams) -> float:
    """The timestep shift for `num_tokens` image tokens under a checkpoint's sampling params.

    A fixed `p.shift` wins. Otherwise Flux's rule (log-shift linear in the token count), clamped
    to `p.shift_range`: extrapolated far beyond its 256-4096 token range the rule overflows
    (a pixel-space model at 1024x1024 would get e^45).
    """
    if p.shift is not None:
        return float(p.shift)
    slope = (p.max_shift - p.base_shift) / (p.max_tokens - p.base_tokens)
    log_shift = p.base_shift + slope * (num_tokens - p.base_tokens)
    lo, hi = p.shift_range
    return min(max(math.exp(min(log_shift, 50.0)), lo), hi)


def sample_timesteps(n: int, shift: float, generator: torch.Generator | None = None,
                     mean: float = 0.0, std: float = 1.0) -> Tensor:
    """n training times (float32): logit-normal (SD3), then the checkpoint's timestep shift."""
    u = torch.randn(n, generator=generator) * std + mean
    return time_shift(torch.sigmoid(u), shift)


def flow_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-sample mean squared error of the predicted velocity, (B,) in float32."""
    err = v_pred.float() - velocity_target(x0.float(), noise.float())
    return err.pow(2).flatten(1).mean(1)
