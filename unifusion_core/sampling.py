"""Rectified-flow sampling over a UniFusion model (convention in flow.py): schedules, integrators,
classifier-free guidance, `denoise` (the loop as a free function, as flux's sampling.denoise) and
`sample` (a model, a size and a conditioning -> raw VAE latents)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .conditioning import Conditioning
from .config import UniFusionConfig
from .flow import resolution_shift, time_shift
from .guard import ensure_memory, require_finite, require_finite_number

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
# Model calls per step of each sampler (for estimates of a run's time).
MODEL_CALLS = {"euler": 1, "heun": 2}


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
            log.warning("switch_at=%g of %d steps rounds to %d steps on the first conditioning",
                        switch_at, steps, switch_step)

    def velocity(x: Tensor, t: float, i: int) -> Tensor:
        return guided_velocity(model, x, t, batched[0] if i < switch_step else batched[-1], cfg)

    return step_fn(velocity, noise, get_schedule(steps, shift), callback)


# --- a model, a size, a conditioning -> latents ------------------------------------------------


def latent_grid(config: UniFusionConfig, width: int, height: int) -> tuple[int, int, int, int]:
    """(lh, lw, H, W): the latent size of a width x height image (floored like ComfyUI's
    EmptyLatentImage) and the grid the sampler runs on, rounded up to whole DiT patches (the
    result is cropped back to lh x lw, so any size works)."""
    p = config.dit.patch_size
    lh, lw = config.latent.latent_size(height, width)
    return lh, lw, math.ceil(lh / p) * p, math.ceil(lw / p) * p


def memory_required(model, batch: int, cond_tokens: int, width: int, height: int, guided: bool = True) -> int:
    """Rough peak bytes of activations for one sampler step (what a memory manager should keep
    free beside the weights): per token the qkv, attention output, MLP hidden and residuals."""
    p = model.config.dit
    _, _, H, W = latent_grid(model.config, width, height)
    tokens = cond_tokens + (H // p.patch_size) * (W // p.patch_size)
    per_token = p.hidden_size * (3 + 1 + p.mlp_ratio + 2) * model.dtype.itemsize
    return int(1.5 * batch * (2 if guided else 1) * tokens * per_token)  # 1.5: SDPA / allocator slack


@torch.no_grad()
def sample(
    model,
    cond: Conditioning,
    width: int,
    height: int,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    shift: float | None = None,
    sampler: str = "euler",
    negative: Conditioning | None = None,
    batch_size: int | None = None,
    callback: Callback | None = None,
    next_cond: Conditioning | None = None,
    switch_at: float = 0.2,
    device: torch.device | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Generate latents with a UniFusionModel; returns raw VAE latents (B, C, height/downscale,
    width/downscale), float32. `model.sample(...)` is the same function.

    A thin convenience over denoise: cfg guides against `negative`, or the learned null
    conditioning when none is given; cfg == 1 runs no unconditional pass. batch_size defaults to
    cond's batch. With `next_cond`, `cond` conditions the first `switch_at` fraction of the steps
    and `next_cond` the rest (Sec. 5.2). steps / cfg None: the checkpoint's; shift=None picks the
    checkpoint's shift for this size. callback(step, total, x, x0) runs after each step, in model
    space. noise: the starting noise on the patch-padded latent grid (latent_grid; default: drawn
    from `seed`). device: where to compute (default: where the parameters are).
    """
    config = model.config
    device = device or model.device
    for name, c in (("conditioning", cond), ("negative", negative), ("second conditioning", next_cond)):
        if c is None and name != "conditioning":
            continue
        if not isinstance(c, Conditioning):
            raise ValueError(f"{name} must be a Conditioning (from LAP Encode / UniFusionModel.encode), "
                             f"got {type(c).__name__}")
        if c.tokens.shape[-1] != config.dit.hidden_size:
            raise ValueError(f"{name} has {c.tokens.shape[-1]}-wide tokens but this model's DiT takes "
                             f"{config.dit.hidden_size}: it was encoded by another UniFusion model; "
                             "encode it with this one")
    steps = config.sampling.steps if steps is None else int(steps)
    cfg = require_finite_number("cfg", config.sampling.cfg if cfg is None else cfg)
    if shift is not None:
        shift = require_finite_number("shift", shift)
    switch_at = require_finite_number("switch_at", switch_at)
    batch_size = cond.batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = max(c.tokens.shape[1] for c in (cond, negative, next_cond) if c is not None)
    ensure_memory(memory_required(model, batch_size, tokens, width, height, cfg != 1), device,
                  f"sampling {batch_size} image(s) of {width}x{height}",
                  "lower width/height or batch_size (or set cfg to 1, which halves it)")
    space, p = config.latent, config.dit.patch_size
    lh, lw, H, W = latent_grid(config, width, height)
    if (lh * space.downscale, lw * space.downscale) != (height, width):
        log.warning(
            "%dx%d is not a multiple of the %s latent space's %d-pixel grid; the image will be %dx%d",
            width, height, space.name, space.downscale, lw * space.downscale, lh * space.downscale,
        )
    if shift is None:
        shift = resolution_shift((H // p) * (W // p), config.sampling)
    shape = (batch_size, space.channels, H, W)
    if noise is None:
        noise = make_noise(shape, seed, device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape} (batch, channels, latent grid padded to whole patches), "
                         f"got {tuple(noise.shape)}")
    uncond = negative if negative is not None else model.null_conditioning(device=device)
    x = denoise(model, cond, noise.to(device, torch.float32), steps, cfg, shift, sampler, uncond, callback,
                next_cond, switch_at)
    require_finite("the sampled latents", x, "the checkpoint's weights or the conditioning produce NaN/inf "
                   "(try weight_dtype fp32 or bf16 instead of fp16, or check the VLM's features)")
    return space.to_raw(x[:, :, :lh, :lw]).float()
