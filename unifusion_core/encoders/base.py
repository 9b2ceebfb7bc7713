"""What an encoder family is: one class per family, one file each, listed in registry.py.

A family says which config.json model_types it serves and with which transformers class, its
user-facing label, where its decoder layers are, its image token and placeholder, how reference
images become pixels and image tokens, and how a one-file checkpoint of it (single_file.py) is
recognised from its tensor names and configured. Everything else is shared by every family:
chat templating and the prompt's span (chat.py), generation (decode.py), layer capture
(capture.py), behind VLMEncoder (encoder.py).

Adding a family is one file in this package with a subclass of VisionLanguage (or TextOnly), one
line in registry.py, and a tiny test model in tests/tiny_vlms.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from ..tiling import TiledImage, tile_images

LAYER0 = "model.layers.0."  # the first decoder block's names in a one-file checkpoint


@dataclass(frozen=True)
class Layout:
    """What a one-file checkpoint holds: its model_type, tensor shapes (prefix removed) and quantisation."""

    family: str  # the model_type it loads as: qwen2_5_vl, qwen2, qwen3, gemma3_text
    shapes: dict[str, tuple[int, ...]]
    prefix: str  # what precedes "model.layers.0." in the file's names ("" for ComfyUI's own files)
    scaled_fp8: bool
    has_lm_head: bool

    def has(self, name: str) -> bool:
        return name in self.shapes

    def count(self, stem: str) -> int:
        """How many numbered blocks `stem` holds ("model.layers." -> the decoder's depth)."""
        return 1 + max(int(m[1]) for k in self.shapes if (m := re.match(re.escape(stem) + r"(\d+)\.", k)))


class TextOnly:
    """A text-only decoder: no image support."""

    label = ""  # what users read in the lists of supported models
    model_types: tuple[str, ...] = ()  # the config.json model_types this family serves
    model_class = "AutoModelForCausalLM"  # the transformers class a model folder loads with
    takes_images = False  # and so its chat messages carry plain-string content
    # a rewrite may start from a KV cache of the template's system part (VLMEncoder.encode)
    reuses_prefix = True

    # One-file checkpoints (single_file.py); families without them keep these defaults.
    one_file_class: str | None = None  # the transformers class of its one-file checkpoints
    tokenizer_folder: str | None = None  # the single_file.TOKENIZER_FOLDERS entry its files default to
    tokenizer_hint = "tokenizer.json"  # what a tokenizer folder for its files holds (for the error)
    untied_from: int | None = None  # published models this wide and wider keep an LM head of their own

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def transformers_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.model_class)

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        """The model_type a one-file checkpoint loads as when its tensor names are this family's,
        else None; ValueError when they are but the file cannot be loaded."""
        return None

    @classmethod
    def one_file_config(cls, layout: Layout, tokenizer):
        """The transformers config of a one-file checkpoint: sizes from the shapes, the rest published."""
        raise NotImplementedError

    @classmethod
    def one_file_tokenizer(cls, folder: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    @classmethod
    def one_file_chat_template(cls, tokenizer) -> str | None:
        """The chat template a one-file checkpoint's tokenizer gets."""
        return tokenizer.chat_template

    @classmethod
    def one_file_weights(cls, weights: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        """The tensors of a one-file checkpoint the model takes."""
        return weights

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def image_token_id(self) -> int | None:
        return None


class VisionLanguage(TextOnly):
    """A VLM whose decoder sits at model.model.language_model and whose config names its image token.

    Reference images are tiled (InternVL style) at the family's tile size unless the family
    overrides prepare_images."""

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

    def prepare_images(self, items: list, max_tiles: int, thumbnail: bool) -> list[TiledImage]:
        """Reference images (anything tile_images takes, or TiledImages) as this family reads them:
        tiles of tile_size pixels (+ a thumbnail); TiledImages of that size pass through."""
        out = []
        for item in items:
            if isinstance(item, TiledImage) and item.tiles.shape[-1] == self.tile_size:
                out.append(item)
            elif isinstance(item, TiledImage):
                raise ValueError(
                    f"images were tiled at {item.tiles.shape[-1]} pixels, but {self.label} takes "
                    f"{self.tile_size}-pixel tiles; tile with tile_size={self.tile_size}"
                )
            else:
                out += tile_images(item, max_tiles, self.tile_size, thumbnail, self.resample)
        return out

    def pixel_inputs(self, tiled: list[TiledImage], dtype, device) -> dict:
        x = torch.cat([t.tiles for t in tiled])  # (N, 3, S, S) in 0..1
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return {"pixel_values": x.to(device=device, dtype=dtype)}

    def extra_inputs(self, ids: Tensor) -> dict:
        return {}


def text_settings(layout: Layout, tokenizer, head_dim: int | None = None) -> dict:
    """A one-file decoder's sizes read from its shapes, as transformers config arguments. head_dim:
    the family's published head size where the file has no per-head norm to read it from."""
    s = layout.shapes
    vocab, hidden = s["model.embed_tokens.weight"]
    if layout.has(LAYER0 + "self_attn.q_norm.weight"):
        head_dim = s[LAYER0 + "self_attn.q_norm.weight"][0]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=s[LAYER0 + "mlp.gate_proj.weight"][0],
                num_hidden_layers=layout.count("model.layers."), head_dim=head_dim,
                num_attention_heads=s[LAYER0 + "self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=s[LAYER0 + "self_attn.k_proj.weight"][0] // head_dim,
                tie_word_embeddings=not layout.has_lm_head, rms_norm_eps=1e-6,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def first(x):
    """The first of a per-axis pair, or x itself (configs write sizes both ways)."""
    return x[0] if isinstance(x, (list, tuple)) else x
