"""InternVL3 in transformers' native format (the '-hf' checkpoints): the paper's encoder."""

from __future__ import annotations

from PIL import Image

from ..tiling import TiledImage
from .base import VisionLanguage, first


class InternVL(VisionLanguage):
    """InternVL3 '-hf': 448-pixel tiles, ImageNet normalisation, <img><IMG_CONTEXT>*n</img>."""

    label = "InternVL3 '-hf'"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    resample = Image.Resampling.BICUBIC  # as InternVL's preprocessing

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        cfg = model.config
        self.tile_size = first(cfg.vision_config.image_size)
        patches = self.tile_size // first(cfg.vision_config.patch_size)
        self.tokens_per_tile = getattr(cfg, "image_seq_length", None) or int(patches**2 * cfg.downsample_ratio**2)
        self.context = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        self.start = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end = getattr(tokenizer, "end_image_token", None) or "</img>"

    def placeholder(self) -> str:
        return self.context

    def expand(self, tiled: TiledImage) -> str:
        return self.start + self.context * (self.tokens_per_tile * tiled.num_tiles) + self.end
