"""Llama-style text decoders: Llama (the paper's Llama ablation; SmolLM2 is one), Mistral, SmolLM3."""

from __future__ import annotations

from .base import LAYER0, Layout, TextOnly


class Llama(TextOnly):
    """Llama, Mistral and SmolLM chat models, from a model folder or a .gguf file."""

    label = "Llama / Mistral / SmolLM"
    model_types = ("llama", "mistral", "smollm3")

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        plain = not layout.has(LAYER0 + "self_attn.q_norm.weight") and not layout.has(LAYER0 + "self_attn.k_proj.bias")
        if plain and layout.has(LAYER0 + "post_attention_layernorm.weight"):
            raise ValueError(f"{name}: a Llama-style decoder in one file: its RoPE settings (Llama 3 or 3.1) cannot "
                             "be read from the weights; use the Hugging Face folder of the model instead")
        return None
