"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): the VLM behind Qwen-Image; also in one file
as ComfyUI keeps Qwen-Image's text encoder (qwen_2.5_vl_7b.safetensors)."""

from __future__ import annotations

import math

import torch
from PIL import Image

from ..pixels import pil_to_tensor
from ..tiling import TiledImage, to_pils
from .base import LAYER0, Layout, VisionLanguage, first, text_settings
from .chat import chatml
from .qwen2 import HEAD_DIM, ROPE, TOKENIZER_HINT

VISION_HEAD_DIM = 80  # Qwen2.5-VL's vision tower: 1280 wide, 16 heads


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
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    resample = Image.Resampling.BICUBIC  # as Qwen's processor
    # generate() computes the 3-axis RoPE positions in a prefill that starts at position 0: a
    # prefill after a cached prefix would number the rest from 0 again (measured: features differ)
    reuses_prefix = False
    min_pixels = 56 * 56
    budget_tile = 448

    one_file_class = "Qwen2_5_VLForConditionalGeneration"
    tokenizer_folder, tokenizer_hint = "qwen", TOKENIZER_HINT
    untied_from = 3584  # 7B and up

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        v = model.config.vision_config
        self.patch, self.merge, self.frames = first(v.patch_size), v.spatial_merge_size, first(v.temporal_patch_size)
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
        x = pil_to_tensor(image.convert("RGB").resize((w, h), self.resample))
        return TiledImage(x[None], (1, 1), False, (image.width, image.height))

    def prepare_images(self, items: list, max_tiles: int, thumbnail: bool) -> list[TiledImage]:
        """One image at its own resolution each (thumbnail does not apply); TiledImages pass through."""
        if not isinstance(max_tiles, int) or max_tiles < 1:
            raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
        out = []
        for item in items:
            out += [item] if isinstance(item, TiledImage) else [self.prepare(im, max_tiles) for im in to_pils(item)]
        return out

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

    # --- one file: Qwen-Image's text encoder -------------------------------------------------

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        bias = layout.has(LAYER0 + "self_attn.k_proj.bias") and not layout.has(LAYER0 + "self_attn.q_norm.weight")
        return "qwen2_5_vl" if bias and layout.has("visual.patch_embed.proj.weight") else None

    @classmethod
    def one_file_config(cls, layout: Layout, tokenizer):
        """The Qwen2.5 decoder's settings, and the vision tower's sizes from its weights."""
        import transformers

        s, text = layout.shapes, text_settings(layout, tokenizer, HEAD_DIM)
        head_dim = text.pop("head_dim")
        hidden_v, channels, frames, patch, _ = s["visual.patch_embed.proj.weight"]
        depth = layout.count("visual.blocks.")
        merge = int((s["visual.merger.mlp.0.weight"][1] // hidden_v) ** 0.5)
        vision = dict(depth=depth, hidden_size=hidden_v, num_heads=hidden_v // VISION_HEAD_DIM, in_channels=channels,
                      intermediate_size=s["visual.blocks.0.mlp.gate_proj.weight"][0], patch_size=patch,
                      temporal_patch_size=frames, spatial_merge_size=merge,
                      out_hidden_size=s["visual.merger.mlp.2.weight"][0], window_size=112,
                      fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7])  # 7, 15, 23, 31 at depth 32
        rope = {**ROPE, "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}  # [16, 24, 24]
        ids = tokenizer.convert_tokens_to_ids
        return transformers.Qwen2_5_VLConfig(
            text_config={**text, "max_position_embeddings": 128000, "rope_parameters": rope}, vision_config=vision,
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=not layout.has_lm_head)

    @classmethod
    def one_file_chat_template(cls, tokenizer) -> str:
        return chatml(think=False)
