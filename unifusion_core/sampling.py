"""Rectified-flow sampling: x_t = (1 - t) x_0 + t * noise, the model predicts v = noise - x_0."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .config import SamplingParams

# velocity(x, t, step) -> v, where t is a Python float and step the index of the current step.
Velocity = Callable[[Tensor, float, int], Tensor]
# callback(step, total, x, x0): after each step; x0 is the current estimate of the clean latent.
# It may raise (e.g. ComfyUI's interrupt) to stop sampling.
Callback = Callable[[int, int, Tensor, Tensor], None]


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3/Flux shift: spends more steps at high noise when shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, p: SamplingParams) -> float:
    """Flux's resolution-dependent shift: log-shift linear in the number of image tokens."""
    slope = (p.max_shift - p.base_shift) / (p.max_tokens - p.base_tokens)
    return math.exp(p.base_shift + slope * (num_tokens - p.base_tokens))


def get_schedule(steps: int, shift: float) -> Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def sample_euler(velocity: Velocity, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """First-order Euler integration of dx/dt = v from ts[0] to ts[-1]."""
    return _integrate(velocity, x, ts, callback, heun=False)


def sample_heun(velocity: Velocity, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Heun's second-order method (two model calls per step).

    Unlike k-diffusion's heun there is no Euler fallback at the last step: a rectified-flow
    velocity is well defined at t = 0, so every step keeps second order.
    """
    return _integrate(velocity, x, ts, callback, heun=True)


def _integrate(velocity: Velocity, x: Tensor, ts: Tensor, callback: Callback | None, heun: bool) -> Tensor:
    total = len(ts) - 1
    for i in range(total):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = velocity(x, t, i)
        if callback is not None:
            callback(i, total, x, x - t * v)
        dt = t_next - t
        if heun:
            v = 0.5 * (v + velocity(x + dt * v, t_next, i))
        x = x + dt * v
    return x


SAMPLERS: dict[str, Callable[[Velocity, Tensor, Tensor, Callback | None], Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def make_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Float32 Gaussian noise drawn on the CPU from `seed`: identical on every device.

    Like ComfyUI, the whole batch comes from one generator, so image 0 of a batch equals the
    single image for the same seed.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)
