"""Pixel conventions in one place: uint8 images, 0..1 tensors (ComfyUI's IMAGE, tiles) and the
-1..1 range of pixel-space latents and VAE inputs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def pil_to_tensor(im: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in 0..1."""
    return uint8_to_unit(np.asarray(im, dtype=np.uint8))


def uint8_to_unit(arr: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> (3, H, W) float32 in 0..1 (a copy: PIL's arrays are read-only)."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def unit_to_signed(x: Tensor) -> Tensor:
    """0..1 -> -1..1."""
    return x * 2 - 1


def signed_to_uint8(x: Tensor) -> Tensor:
    """-1..1 (..., 3, H, W) -> uint8 (..., H, W, 3), clamped and rounded (ComfyUI's pixel VAE decode)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1)
