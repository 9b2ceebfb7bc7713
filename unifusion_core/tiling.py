"""Dynamic image tiling (InternVL style): the VLM sees a reference image as up to `max_tiles` tiles.

Paper Sec. 2.2 / Fig. 7: detail preservation scales with the number of VLM tiles; UniFusion trains
with up to 10 tiles, hence the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .pixels import pil_to_tensor, to_8bit

ACCEPTED = "a ComfyUI IMAGE tensor [B, H, W, 3], an [H, W, 3] tensor, a PIL.Image, a file path, or a list of these"


@dataclass
class TiledImage:
    """One reference image cut into tiles (row-major), with its thumbnail last when there is one."""

    tiles: torch.Tensor  # (N, 3, tile_size, tile_size) float32 in 0..1, RGB
    grid: tuple[int, int]  # (rows, cols); N = rows * cols (+1 with thumbnail)
    has_thumbnail: bool
    source_size: tuple[int, int]  # (width, height) of the original image

    @property
    def num_tiles(self) -> int:
        """Number of tiles including the thumbnail."""
        return self.tiles.shape[0]


def _tensor_to_pils(x: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, 3] or [H, W, 3] float 0..1 -> RGB PIL images."""
    shape = tuple(x.shape)
    if x.ndim == 3:
        x = x.unsqueeze(0)  # (1, H, W, 3)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"image tensor has shape {shape}; expected the ComfyUI IMAGE convention [B, H, W, 3] "
            f"(or [H, W, 3]) float 0..1 - move channels last and drop any alpha channel"
        )
    if not x.is_floating_point():
        raise ValueError(f"image tensor has dtype {x.dtype}; expected float 0..1 (divide uint8 pixels by 255)")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"image tensor of shape {shape} is empty; pass at least one image of non-zero size")
    x = x.detach().cpu().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"image tensor of shape {shape} contains NaN or inf values; pass finite values in 0..1")
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def _upright(im: Image.Image) -> Image.Image:
    """8-bit RGB as the image is displayed."""
    # A phone photo's pixels are stored sideways with an EXIF orientation tag; ComfyUI's Load Image
    # and the trainer (train/sources.py) turn it upright, so the VLM must see (and tile) it so too.
    # 16-bit images are scaled by to_8bit: convert("RGB") would clip them at 255.
    return to_8bit(ImageOps.exif_transpose(im)).convert("RGB")


def _open(path: Path) -> Image.Image:
    """Load an image file as RGB, with an error that names the path."""
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist; check the path")
    try:
        with Image.open(path) as im:
            return _upright(im)  # loads the pixels, so truncated files fail here
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode {str(path)!r} as an image ({e}); pass a PNG/JPEG/WebP file") from e


def to_pils(images: Any) -> list[Image.Image]:
    """Any accepted input -> flat list of RGB PIL images, in order."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("got an empty list of images; pass at least one image")
        return [im for item in images for im in to_pils(item)]
    if isinstance(images, torch.Tensor):
        return _tensor_to_pils(images)
    if isinstance(images, Image.Image):
        if images.width == 0 or images.height == 0:
            raise ValueError(f"PIL image has size {images.size}; pass an image of non-zero size")
        return [_upright(images)]
    if isinstance(images, (str, Path)):
        return [_open(Path(images))]
    raise TypeError(f"cannot tile an object of type {type(images).__name__}; expected {ACCEPTED}")


def closest_grid(width: int, height: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to width/height, InternVL's tie-break included."""
    # Visited by increasing tile count; among equal counts by cols (InternVL leaves that order to a set).
    candidates = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)),
        key=lambda g: (g[0] * g[1], g[0]),
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in candidates:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * c * r:
            best = (c, r)  # a larger grid wins a tie only if the image fills more than half of it
    return best


def tile_images(
    images: Any,
    max_tiles: int = 10,
    tile_size: int = 448,
    thumbnail: bool = True,
    resample: int = Image.Resampling.BICUBIC,
) -> list[TiledImage]:
    """Cut each image into an aspect-matched grid of tile_size tiles (+ a thumbnail), one TiledImage each."""
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be an integer >= 1 (448 for InternVL), got {tile_size!r}")
    out = []
    for im in to_pils(images):
        cols, rows = closest_grid(im.width, im.height, max_tiles, tile_size)
        big = pil_to_tensor(im.resize((cols * tile_size, rows * tile_size), resample))  # (3, rows*T, cols*T)
        tiles = big.unflatten(1, (rows, tile_size)).unflatten(3, (cols, tile_size))  # (3, rows, T, cols, T)
        tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)  # (rows*cols, 3, T, T)
        has_thumb = thumbnail and rows * cols > 1
        if has_thumb:
            thumb = pil_to_tensor(im.resize((tile_size, tile_size), resample))  # (3, T, T)
            tiles = torch.cat([tiles, thumb[None]])  # (rows*cols + 1, 3, T, T)
        out.append(TiledImage(tiles, (rows, cols), has_thumb, (im.width, im.height)))
    return out
