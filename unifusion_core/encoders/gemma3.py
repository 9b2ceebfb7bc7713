"""Gemma-3 (Gemma3ForConditionalGeneration): the paper's App. A.5 encoder."""

from __future__ import annotations

from torch import Tensor

from ..tiling import TiledImage
from .base import VisionLanguage, first


class Gemma3(VisionLanguage):
    """Gemma-3: each tile is one 896-pixel SigLIP image of 256 soft tokens, normalised to -1..1."""

    label = "Gemma-3"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        cfg = model.config
        self.tile_size = first(cfg.vision_config.image_size)
        self.tokens_per_tile = cfg.mm_tokens_per_image
        ids = tokenizer.convert_ids_to_tokens
        self.boi, self.eoi, self.soft = ids(cfg.boi_token_id), ids(cfg.eoi_token_id), ids(cfg.image_token_id)

    def placeholder(self) -> str:
        return self.boi

    def expand(self, tiled: TiledImage) -> str:
        # As Gemma 3's processor writes one image, once per tile.
        one = f"\n\n{self.boi}{self.soft * self.tokens_per_tile}{self.eoi}\n\n"
        return one * tiled.num_tiles

    def extra_inputs(self, ids: Tensor) -> dict:
        # Gemma 3 lets the tokens of one image attend to each other bidirectionally.
        return {"token_type_ids": (ids == self.image_token_id()).long()}
