"""Gemma-3's text decoder alone (model_type 'gemma3_text'), e.g. the Lumina 2 / LTX-2 text encoders
ComfyUI keeps in one file."""

from __future__ import annotations

import logging

from torch import Tensor

from .base import LAYER0, Layout, TextOnly, text_settings

log = logging.getLogger(__name__)

# Gemma's turns; a system prompt opens the first user turn (Gemma has no system role).
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3Text(TextOnly):
    """Gemma-3 text: query/key norms and a norm after each MLP; its LM head is always the embeddings."""

    label = "Gemma-3 (text)"
    model_types = ("gemma3_text",)
    one_file_class = "Gemma3ForCausalLM"
    # Gemma's files carry their SentencePiece model, but transformers 5 reads no bare .model file
    # without tokenizer.json (its converter needs protobuf and a slow tokenizer)
    tokenizer_folder, tokenizer_hint = "gemma", "Gemma-3's tokenizer.json"

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        q_norm = layout.has(LAYER0 + "self_attn.q_norm.weight")
        return "gemma3_text" if q_norm and layout.has(LAYER0 + "post_feedforward_layernorm.weight") else None

    @classmethod
    def one_file_config(cls, layout: Layout, tokenizer):
        import transformers

        text = text_settings(layout, tokenizer)
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        return transformers.Gemma3TextConfig(
            **text, bos_token_id=tokenizer.bos_token_id, max_position_embeddings=131072, sliding_window=1024,
            # gemma-3 27B scales queries by 1/sqrt(hidden / heads) = 1/sqrt(168); the others by 1/sqrt(head_dim)
            query_pre_attn_scalar=hidden // heads if hidden == 5376 else text["head_dim"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})

    @classmethod
    def one_file_chat_template(cls, tokenizer) -> str:
        return tokenizer.chat_template or GEMMA_TURNS

    @classmethod
    def one_file_weights(cls, weights: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        # a vision tower beside Gemma's decoder is not used: text only
        kept = {k: v for k, v in weights.items() if k.startswith(("model.", "lm_head."))}
        if len(kept) < len(weights):
            log.info("%s: %d tensors outside the language model (a vision tower) are not used", name,
                     len(weights) - len(kept))
        return kept
