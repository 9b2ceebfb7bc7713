"""Qwen3 text decoders (model_type 'qwen3'), e.g. Z-Image's Qwen3-4B text encoder in one file."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .base import LAYER0, Layout, text_settings
from .chat import chatml
from .qwen2 import ROPE, Qwen2

# Qwen3's tokens beyond Qwen2.5's 151665 (ids 151665-151668 in Qwen3's tokenizer). ComfyUI's
# qwen25_tokenizer holds other tokens there (Qwen-Image's <|img|>, <|endofimg|>, <|meta|>, <|endofmeta|>).
QWEN2_5_VOCAB = 151665
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")


class Qwen3(Qwen2):
    """Qwen3: Qwen2's tokenizer folder and RoPE base, per-head query/key norms; its one-file
    template asks for a direct answer (an empty reasoning block, its non-thinking mode)."""

    label = "Qwen3"
    model_types = ("qwen3",)
    one_file_class = "Qwen3ForCausalLM"
    untied_from = 4096  # 8B and up

    @classmethod
    def detect(cls, layout: Layout, name: str) -> str | None:
        q_norm = layout.has(LAYER0 + "self_attn.q_norm.weight")
        return "qwen3" if q_norm and not layout.has(LAYER0 + "post_feedforward_layernorm.weight") else None

    @classmethod
    def one_file_config(cls, layout: Layout, tokenizer):
        import transformers

        return transformers.Qwen3Config(**text_settings(layout, tokenizer), max_position_embeddings=40960,
                                        rope_parameters=dict(ROPE))

    @classmethod
    def one_file_tokenizer(cls, folder: Path):
        return qwen3_tokenizer(folder)

    @classmethod
    def one_file_chat_template(cls, tokenizer) -> str:
        return chatml(think=True)


def qwen3_tokenizer(folder: Path):
    """A Qwen2.5 tokenizer folder made Qwen3's: the tokens after Qwen2.5's vocabulary replaced by
    Qwen3's four (<think> = 151667). A Qwen3 tokenizer folder is used as it is."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        for f in folder.iterdir():
            if f.is_file():
                shutil.copy(f, tmp)
        config_file = Path(tmp) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            added = config.get("added_tokens_decoder", {})
            extra = {added[k]["content"] for k in added if int(k) >= QWEN2_5_VOCAB}
            if extra and extra != set(QWEN3_EXTRA_TOKENS):
                config["added_tokens_decoder"] = {k: v for k, v in added.items() if int(k) < QWEN2_5_VOCAB}
                config["additional_special_tokens"] = [t for t in config.get("additional_special_tokens", [])
                                                       if t not in extra]
                config_file.write_text(json.dumps(config))
                if (Path(tmp) / "vocab.json").is_file():  # rebuilt from vocab.json + merges.txt and the config
                    (Path(tmp) / "tokenizer.json").unlink(missing_ok=True)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    missing = [t for t in QWEN3_EXTRA_TOKENS if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN3_EXTRA_TOKENS]
    if ids != list(range(ids[0], ids[0] + 4)) or (len(tok) > QWEN2_5_VOCAB and ids[0] != QWEN2_5_VOCAB):
        raise ValueError(f"{folder}: not a Qwen2.5 or Qwen3 tokenizer (Qwen3's {QWEN3_EXTRA_TOKENS} land on ids {ids})")
    return tok
