"""One path from a prompt (and reference images) to an image: VLM -> LAP -> refiner -> DiT sampler.

The demo CLI, the benchmarks, the evaluation and the tests all call `generate`, so the chain is
written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .advice import timed
from .config import UniFusionConfig
from .features import Features
from .model import UniFusionModel
from .pixels import signed_to_uint8
from .sampling import Callback, latent_grid, make_noise, sample


@dataclass
class Generation:
    """What generate() made: raw VAE latents, the features used, and RGB images in pixel space."""

    latent: Tensor  # (B, C, h, w) raw VAE latents, float32
    features: Features
    images: list[np.ndarray] | None  # (H, W, 3) uint8 each, for the `pixel` latent space only


def generate(
    vlm,
    model: UniFusionModel,
    prompt: str,
    images=None,
    *,
    features: Features | None = None,
    rewrite: bool | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    sampler: str = "euler",
    batch_size: int = 1,
    callback: Callback | None = None,
) -> Generation:
    """Generate from a prompt with a frozen VLM and a UniFusion model.

    rewrite=None encodes as the model was trained (its config's sampling.rewrite) and
    system_prompt=None with the system prompt it was trained with (its encoder spec's; "" = none);
    pass `features` to skip the VLM. width/height default to the checkpoint's training size, else 1024.
    A long run logs its estimated time after its first step (advice.timed).
    """
    s = model.config.sampling
    if features is None:
        if vlm is None:
            raise ValueError("generate needs a VLM encoder or precomputed features")
        rewrite = s.rewrite if rewrite is None else rewrite
        # "" is a checkpoint trained with no system prompt, and must stay "": the encoder reads None
        # as VERIFI's default, a system turn that checkpoint never saw (the trainer and the eval
        # pass the spec's string unchanged too).
        system = model.config.encoder.system_prompt if system_prompt is None else system_prompt
        features = vlm.encode(prompt, images=images, rewrite=rewrite, system_prompt=system,
                              max_new_tokens=max_new_tokens, layers=model.config.encoder.layers)
    width, height = image_size(model.config, width, height)
    cond = model.encode(features)
    latent = sample(model, cond, width, height, steps=steps, cfg=cfg, seed=seed, sampler=sampler,
                    batch_size=batch_size, callback=timed(callback, model.config, width, height, sampler))
    return Generation(latent, features, to_rgb(latent) if model.config.latent.name == "pixel" else None)


def image_size(config: UniFusionConfig, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height): those given, else the checkpoint's training size, else 1024."""
    w, h = config.sampling.size if config.sampling.size is not None else (1024, 1024)
    return width or w, height or h


def to_rgb(latent: Tensor) -> list[np.ndarray]:
    """Pixel-space latents (B, 3, H, W) in -1..1 -> uint8 (H, W, 3) images, as ComfyUI's pixel VAE."""
    return [np.ascontiguousarray(im) for im in signed_to_uint8(latent).cpu().numpy()]


@torch.no_grad()
def sample_features(model: UniFusionModel, features: list[Features], seeds: list[int], steps: int | None = None,
                    cfg: float | None = None, width: int | None = None, height: int | None = None,
                    layer_drop=(), next_features: list[Features] | None = None, switch_at: float = 0.2) -> Tensor:
    """A batch of raw latents, one per (features, seed) pair, each equal to what that pair gives alone
    (the noise of item i is drawn from seeds[i] only, whatever else shares the batch). With
    next_features, those condition the steps after `switch_at` (paper Sec. 5.2)."""
    width, height = image_size(model.config, width, height)
    _, _, H, W = latent_grid(model.config, width, height)
    noise = torch.cat([make_noise((1, model.config.latent.channels, H, W), seed) for seed in seeds])
    cond = model.encode(features, layer_drop=layer_drop)
    after = model.encode(next_features, layer_drop=layer_drop) if next_features else None
    return sample(model, cond, width, height, steps=steps, cfg=cfg, noise=noise.to(model.device), next_cond=after,
                  switch_at=switch_at)
