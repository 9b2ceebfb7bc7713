"""What an encoder family adapter provides: its decoder layers, its image token and placeholder,
how one image becomes pixels and image tokens. VLMEncoder (vlm.py) does the rest for every family:
chat templating and finding the prompt's span, capturing layers, generating the rewrite.

Adding a family is one file in this package with a subclass of VisionLanguage (or TextOnly), one
line in the registry (__init__.py), and a tiny test model in tests/tiny_vlms.py.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor, nn

from ..tiling import TiledImage


class TextOnly:
    """A text-only decoder: no image support."""

    takes_images = False  # and so its chat messages carry plain-string content
    # a rewrite may start from a KV cache of the template's system part (VLMEncoder.encode)
    reuses_prefix = True

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def image_token_id(self) -> int | None:
        return None


class VisionLanguage(TextOnly):
    """A VLM whose decoder sits at model.model.language_model and whose config names its image token."""

    takes_images = True  # chat content is a list of {"type": "image"} / {"type": "text"} items
    mean = std = (0.5, 0.5, 0.5)
    resample = Image.Resampling.BILINEAR
    tile_size = tokens_per_tile = 0

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def placeholder(self) -> str:
        """What the chat template writes for one image."""
        raise NotImplementedError

    def expand(self, tiled: TiledImage) -> str:
        """The image tokens that replace one placeholder."""
        raise NotImplementedError

    def tokens(self, tiled: TiledImage) -> int:
        """How many image tokens one prepared image becomes."""
        return tiled.num_tiles * self.tokens_per_tile

    def pixel_inputs(self, tiled: list[TiledImage], dtype, device) -> dict:
        x = torch.cat([t.tiles for t in tiled])  # (N, 3, S, S) in 0..1
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return {"pixel_values": x.to(device=device, dtype=dtype)}

    def extra_inputs(self, ids: Tensor) -> dict:
        return {}


def _pil_to_tensor(im: Image.Image) -> Tensor:
    """(3, H, W) float32 in 0..1."""
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
