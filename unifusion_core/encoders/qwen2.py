"""Qwen2 and Qwen2.5 text decoders, and what every Qwen one-file checkpoint shares (the ChatML
template, the tokenizer ComfyUI ships for Qwen, the published head size and RoPE base)."""

from __future__ import annotations

from .base import LAYER0, Layout, TextOnly, text_settings
from .chat import chatml

HEAD_DIM = 128  # Qwen2 / Qwen2.5's head size (their files have no per-head norm to read it from)
ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}
TOKENIZER_HINT = "tokenizer.json, or vocab.json + merges.txt; inside ComfyUI its own Qwen tokenizer is used"


class Qwen2(TextOnly):
    """Qwen2 / Qwen2.5 (model_type 'qwen2'); one file as ComfyUI keeps Qwen2.5 text encoders."""

    label = "Qwen2.5"
    model_types = ("qwen2",)
    one_file_class = "Qwen2ForCausalLM"
    tokenizer_folder, tokenizer_hint = "qwen", TOKENIZER_HINT
    untied_from = 3584  # 7B and up

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        bias = layout.has(LAYER0 + "self_attn.k_proj.bias") and not layout.has(LAYER0 + "self_attn.q_norm.weight")
        return "qwen2" if bias and not layout.has("visual.patch_embed.proj.weight") else None

    @classmethod
    def one_file_config(cls, layout: Layout, tokenizer):
        import transformers

        text = text_settings(layout, tokenizer, HEAD_DIM)
        text.pop("head_dim")  # Qwen2's config derives it: hidden_size / heads
        return transformers.Qwen2Config(**text, max_position_embeddings=32768, rope_parameters=dict(ROPE))

    @classmethod
    def one_file_chat_template(cls, tokenizer) -> str:
        return chatml(think=False)
