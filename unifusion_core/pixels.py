"""Pixel conventions in one place: uint8 images, 0..1 tensors (ComfyUI's IMAGE, tiles) and the
-1..1 range of pixel-space latents and VAE inputs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_8bit(im: Image.Image) -> Image.Image:
    """An image of more than 8 bits a pixel (modes I;16*, I, F: 16-bit grayscale PNGs and TIFFs,
    32-bit integer or float images) -> mode "L", scaled to 0..255; any other mode is returned as is.

    I;16*: v / 257 (an 8-bit value stored in 16 bits, v8 * 257, gives back v8). I and F by their
    range: the smallest full scale that holds the image's maximum, of 1.0 (F only: floats in 0..1),
    255, 65535 or else the maximum itself; negative and non-finite values are 0. Why: PIL's
    convert("RGB") and convert("L") clip these modes at 255 instead of scaling, so a 16-bit image
    came out nearly white."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None)
    if im.mode.startswith("I;16"):
        full = 65535.0
    else:
        top = float(a.max(initial=0.0))
        scales = (1.0, 255.0, 65535.0) if im.mode == "F" else (255.0, 65535.0)
        full = next((f for f in scales if top <= f), top)
    return Image.fromarray(np.rint(a * (255.0 / full)).clip(0, 255).astype(np.uint8))  # (H, W) uint8: "L"


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
