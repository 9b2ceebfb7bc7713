"""Encoder families: one adapter per family (one file each), found by the checkpoint's model_type."""

from __future__ import annotations

from .base import TextOnly, VisionLanguage
from .gemma3 import Gemma3
from .internvl import InternVL
from .qwen25vl import Qwen25VL
from .qwen3vl import Qwen3VL

# Text-only decoders loaded through AutoModelForCausalLM (the paper's Llama ablation, SmolLM2).
CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text")
# model_type -> (transformers model class name, adapter)
VISION_LANGUAGE = {
    "internvl": ("InternVLForConditionalGeneration", InternVL),
    "gemma3": ("Gemma3ForConditionalGeneration", Gemma3),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", Qwen25VL),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", Qwen3VL),
}
SUPPORTED = (
    "InternVL3 in transformers' native format (model_type 'internvl', the '-hf' checkpoints), "
    "Gemma-3 ('gemma3'), Qwen2.5-VL ('qwen2_5_vl'), Qwen3-VL ('qwen3_vl'), text-only decoders (" + ", ".join(map(repr, CAUSAL_LM_TYPES)) + "), "
    "and .gguf files of those decoders"
)


def family(model_type: str):
    """(transformers model class, adapter class) for a model_type, or None when unsupported."""
    import transformers

    if model_type in VISION_LANGUAGE:
        name, adapter = VISION_LANGUAGE[model_type]
        return getattr(transformers, name), adapter
    if model_type in CAUSAL_LM_TYPES:
        return transformers.AutoModelForCausalLM, TextOnly
    return None


__all__ = ["CAUSAL_LM_TYPES", "SUPPORTED", "VISION_LANGUAGE", "Gemma3", "InternVL", "Qwen25VL", "Qwen3VL", "TextOnly",
           "VisionLanguage", "family"]
