"""Rectified-flow sampling over a UniFusion model (convention in flow.py): schedules, integrators,
classifier-free guidance and `denoise`, the loop as a free function (as flux's sampling.denoise)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from .flow import resolution_shift, time_shift  # noqa: F401  (re-exported: the sampler's schedule)

log = logging.getLogger(__name__)

# velocity(x, t, step) -> v, where t is a Python float and step the index of the current step.
Velocity = Callable[[Tensor, float, int], Tensor]
# callback(step, total, x, x0): after each step; x0 is the current estimate of the clean latent.
# It may raise (e.g. ComfyUI's interrupt) to stop sampling.
Callback = Callable[[int, int, Tensor, Tensor], None]


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


# Rows of different lengths (a prompt and the 1-token null, prompts of a batch) share one DiT call,
# the shorter ones padded and masked, while that padding stays within this many tokens; beyond it
# they run unpadded in calls of their own (Conditioning.by_length). Why 64: an extra call cost
# about 50-70 tokens' worth on this project's CPU (small preset, 256²: the prompt and the null
# apart were 3 % slower at T = 32, 2 % faster at T = 64, 7 % faster at T = 128), and the shipped
# 64-px model runs a 10-token prompt and the null 13 % faster as one call. Unpadded calls also
# skip the attention mask (on GPUs that allows the flash kernel, which takes none).
MAX_PADDING = 64


def guided_velocity(model, x: Tensor, t: float, groups, cfg: float) -> Tensor:
    """Classifier-free guidance: v_uncond + cfg * (v_cond - v_uncond), float32.

    groups is Conditioning.by_length() of [conditional ; unconditional] batched along the batch
    (2B rows) when guided, of the B conditional rows alone when cfg == 1: one model call per group
    of rows, each cut to its longest row (one call for the whole batch when it is one group).
    """
    guided = cfg != 1
    xin = torch.cat([x, x]) if guided else x
    if len(groups) == 1 and groups[0][0] is None:
        v = model(xin, torch.full((xin.shape[0],), t, device=x.device), groups[0][1]).float()
    else:
        v = xin.new_empty(xin.shape, dtype=torch.float32)
        for rows, c in groups:
            v[rows] = model(xin[rows], torch.full((len(rows),), t, device=x.device), c).float()
    if not guided:
        return v
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


def denoise(
    model,
    cond,
    noise: Tensor,
    steps: int,
    cfg: float,
    shift: float,
    sampler: str = "euler",
    uncond=None,
    callback: Callback | None = None,
    next_cond=None,
    switch_at: float = 0.2,
) -> Tensor:
    """Integrate from `noise` (B, C, H, W) at t=1 to model-space latents at t=0.

    model(x, t, cond) -> velocity; cond / uncond / next_cond are Conditioning with batch 1 or B.
    uncond is required when cfg != 1 (the model's null conditioning or a negative prompt).
    With next_cond, cond conditions the first round(switch_at * steps) steps (Sec. 5.2).
    """
    from .model import Conditioning  # the data type only; the loop needs no model internals

    step_fn = get_sampler(sampler)
    if not 0.0 <= switch_at <= 1.0:
        raise ValueError(f"switch_at must be in [0, 1], got {switch_at}")
    B, guided, device = noise.shape[0], cfg != 1, noise.device
    if guided and uncond is None:
        raise ValueError("cfg != 1 needs an unconditional input: pass uncond (e.g. model.null_conditioning())")
    schedule = [c.to(device) for c in ([cond] if next_cond is None else [cond, next_cond])]
    # Guided conditioning is batched and grouped by length once here, not at every step: [cond ; uncond].
    u = uncond.to(device).expand(B) if guided else None
    batched = [(Conditioning.cat([c.expand(B), u]) if guided else c.expand(B)).by_length(MAX_PADDING)
               for c in schedule]
    switch_step = steps
    if next_cond is not None:
        switch_step = int(switch_at * steps + 0.5)  # round half up
        if switch_step in (0, steps) and 0 < switch_at < 1:
            log.warning("switch_at=%g of %d steps rounds to %d steps on the first conditioning", switch_at, steps, switch_step)

    def velocity(x: Tensor, t: float, i: int) -> Tensor:
        return guided_velocity(model, x, t, batched[0] if i < switch_step else batched[-1], cfg)

    return step_fn(velocity, noise, get_schedule(steps, shift), callback)
