"""Qwen3-VL (Qwen3VLForConditionalGeneration)."""

from __future__ import annotations

from .base import Layout
from .qwen25vl import Qwen25VL


class Qwen3VL(Qwen25VL):
    """Qwen3-VL: images prepared as for Qwen2.5-VL (see Qwen25VL: own resolution within the same
    pixel budget, patches in merge order, two frames, image_grid_thw + mm_token_type_ids for the
    3-axis RoPE), with the released processor's settings: 16-pixel patches (so sides are multiples
    of 32 px, one token per 32x32 pixels), mean = std = 0.5, and at least 256^2 pixels per image
    (shortest_edge 65536). The same ChatML template and <|vision_start|><|image_pad|><|vision_end|>.

    DeepStack: the decoder adds visual features from intermediate vision layers to the image tokens'
    residual stream after each of its first blocks (one per entry of vision_config's
    deepstack_visual_indexes); the captured layer i is the stream block i reads, additions included."""

    label = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    mean = std = (0.5, 0.5, 0.5)
    min_pixels = 256 * 256
    one_file_class = None  # no one-file checkpoints: Qwen2.5-VL's are not Qwen3-VL's

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        return None
