"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): the VLM behind Qwen-Image."""

from __future__ import annotations

import math

import torch
from PIL import Image

from ..tiling import TiledImage
from .base import VisionLanguage, _first, _pil_to_tensor


class Qwen25VL(VisionLanguage):
    """Qwen2.5-VL: each image at its own resolution instead of tiles. Resized (aspect kept) to
    multiples of 28 pixels with between `min_pixels` and max_tiles x 448^2 pixels (the pixel budget
    of that many InternVL tiles: the Tile Images node's max_tiles means the same for every family),
    cut into 14-pixel patches, each patch given twice along time (a still image as a two-frame
    clip, as Qwen's processor does), one token per 2x2 merged patches; CLIP normalisation. The
    model computes its 3-axis RoPE positions from `image_grid_thw` and `mm_token_type_ids` (which
    tokens are image tokens; without it transformers falls back to 1-D positions).
    Qwen3VL (qwen3vl.py) reuses all of this with its own constants."""

    label = "Qwen2.5-VL"

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    resample = Image.Resampling.BICUBIC  # as Qwen's processor
    native = True  # images keep their resolution: not tiled
    # generate() computes the 3-axis RoPE positions in a prefill that starts at position 0: a
    # prefill after a cached prefix would number the rest from 0 again (measured: features differ)
    reuses_prefix = False
    min_pixels = 56 * 56
    budget_tile = 448

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        v = model.config.vision_config
        self.patch, self.merge, self.frames = _first(v.patch_size), v.spatial_merge_size, _first(v.temporal_patch_size)
        self.pad = tokenizer.convert_ids_to_tokens(model.config.image_token_id)

    def placeholder(self) -> str:
        return self.pad  # the template writes <|vision_start|><|image_pad|><|vision_end|>

    def expand(self, tiled: TiledImage) -> str:
        return self.pad * self.tokens(tiled)

    def tokens(self, tiled: TiledImage) -> int:
        h, w = tiled.tiles.shape[-2:]
        return (h // (self.patch * self.merge)) * (w // (self.patch * self.merge))

    def size(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        """(width, height) for an image: the nearest multiples of patch x merge (28 px) keeping the
        aspect ratio, scaled down or up into [min_pixels, max_tiles * 448^2]."""
        f, most = self.patch * self.merge, max_tiles * self.budget_tile**2
        if max(width, height) > 200 * min(width, height):
            raise ValueError(f"an image of {width}x{height} is too elongated for {self.label} (aspect ratio over 200)")
        w, h = round(width / f) * f, round(height / f) * f
        if w * h > most:
            scale = math.sqrt(width * height / most)
            w, h = max(f, math.floor(width / scale / f) * f), max(f, math.floor(height / scale / f) * f)
        elif w * h < self.min_pixels:
            scale = math.sqrt(self.min_pixels / (width * height))
            w, h = math.ceil(width * scale / f) * f, math.ceil(height * scale / f) * f
        return w, h

    def prepare(self, image: Image.Image, max_tiles: int) -> TiledImage:
        w, h = self.size(image.width, image.height, max_tiles)
        x = _pil_to_tensor(image.convert("RGB").resize((w, h), self.resample))
        return TiledImage(x[None], (1, 1), False, (image.width, image.height))

    def pixel_inputs(self, tiled: list[TiledImage], dtype, device) -> dict:
        p, m, flat, grids = self.patch, self.merge, [], []
        for t in tiled:
            x = (t.tiles[0] - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
            c, h, w = x.shape
            gh, gw = h // p, w // p
            # patches in merge-group order (2x2 neighbours adjacent), each (C, frames, p, p) flattened
            x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
            x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, self.frames, -1, -1)
            flat.append(x.reshape(gh * gw, c * self.frames * p * p))
            grids.append([1, gh, gw])
        return {"pixel_values": torch.cat(flat).to(device=device, dtype=dtype),
                "image_grid_thw": torch.tensor(grids, device=device)}

    def extra_inputs(self, ids: torch.Tensor) -> dict:
        # 1 marks the image tokens: the model's get_rope_index gives them (t, h, w) positions from image_grid_thw
        return {"mm_token_type_ids": (ids == self.image_token_id()).int()}
