"""One-file LLM / VLM encoders: the .safetensors files ComfyUI users keep in models/text_encoders.

ComfyUI loads the LLM text encoders of Qwen-Image (Qwen2.5-VL-7B), Z-Image (Qwen3-4B), Lumina 2
and LTX-2 (Gemma) from ONE file: the weights under the original checkpoints' names
(`model.layers.N...`, and `visual...` for Qwen2.5-VL's vision tower), with no config and no
tokenizer (Gemma's files carry their SentencePiece model as a `spiece_model` tensor), sometimes in
fp8 with one scale per matrix (`scaled_fp8` marks them; `<name>.scale_weight` holds the scale).

Here the family and size are read from the tensor names and shapes, the rest of the config comes
from the family's published settings (`FAMILIES`), fp8 weights are dequantised, and the tokenizer
comes from a folder the caller names, or for Qwen from the folder ComfyUI ships
(`TOKENIZER_FOLDERS`, set by the nodes). Files without an LM head (ComfyUI's encoders do not need
one) still encode; a VERIFI rewrite needs the head. Needs transformers 5 (its config layout).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# family -> a tokenizer folder to use when the caller names none (the nodes point "qwen" at
# ComfyUI's comfy/text_encoders/qwen25_tokenizer). A setting, like vlm.GGUF_CACHE.
TOKENIZER_FOLDERS: dict[str, Path] = {}

LAYER0 = "model.layers.0."
HEAD_DIM = 128  # Qwen2 / Qwen2.5's head size (their files have no per-head norm to read it from)
VISION_HEAD_DIM = 80  # Qwen2.5-VL's vision tower: 1280 wide, 16 heads

# Qwen's ChatML with image items (Qwen2.5-VL writes <|vision_start|><|image_pad|><|vision_end|> for
# each), and for Qwen3 the empty reasoning block that asks for a direct answer (its non-thinking mode).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ THINK }}{% endif %}"
)
# Gemma's turns; a system prompt opens the first user turn (Gemma has no system role).
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Qwen3's tokens beyond Qwen2.5's 151665 (ids 151665-151668 in Qwen3's tokenizer). ComfyUI's
# qwen25_tokenizer holds other tokens there (Qwen-Image's <|img|>, <|endofimg|>, <|meta|>, <|endofmeta|>).
QWEN2_5_VOCAB = 151665
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")


@dataclass(frozen=True)
class Layout:
    """What a single file holds: its family, tensor shapes (prefix removed) and quantisation."""

    family: str  # qwen2_5_vl, qwen2, qwen3, gemma3_text
    shapes: dict[str, tuple[int, ...]]
    prefix: str  # what precedes "model.layers.0." in the file's names ("" for ComfyUI's own files)
    scaled_fp8: bool
    has_lm_head: bool


def read_layout(path: Path) -> Layout:
    """The family of a one-file LLM, from names and shapes alone; ValueError when it is none we know."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    anchor = next((k for k in shapes if k.endswith(LAYER0 + "self_attn.q_proj.weight")), None)
    if anchor is None:
        raise ValueError(f"{path.name}: not an LLM text encoder (no '{LAYER0}self_attn.q_proj.weight'): a CLIP, T5 "
                         "or diffusion model file cannot be a UniFusion encoder")
    prefix = anchor[: -len(LAYER0 + "self_attn.q_proj.weight")]
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)} | {
        k: v for k, v in shapes.items() if k in ("scaled_fp8", "spiece_model")}
    has = shapes.__contains__
    if has(LAYER0 + "self_attn.q_norm.weight") and has(LAYER0 + "post_feedforward_layernorm.weight"):
        family = "gemma3_text"
    elif has(LAYER0 + "self_attn.q_norm.weight"):
        family = "qwen3"
    elif has(LAYER0 + "self_attn.k_proj.bias"):
        family = "qwen2_5_vl" if has("visual.patch_embed.proj.weight") else "qwen2"
    elif has(LAYER0 + "post_attention_layernorm.weight"):
        raise ValueError(f"{path.name}: a Llama-style decoder in one file: its RoPE settings (Llama 3 or 3.1) cannot "
                         "be read from the weights; use the Hugging Face folder of the model instead")
    else:
        raise ValueError(f"{path.name}: an LLM layout this pack does not know; supported in one file: Qwen2.5-VL, "
                         "Qwen2.5, Qwen3, Gemma-3 (text)")
    return Layout(family, shapes, prefix, has("scaled_fp8"), has("lm_head.weight"))


# Published checkpoints whose LM head is its own matrix, not the embeddings (family, width >=):
# Qwen2.5(-VL) 7B and up, Qwen3 8B and up. Gemma-3 and the smaller Qwen tie them.
UNTIED_FROM = {"qwen2_5_vl": 3584, "qwen2": 3584, "qwen3": 4096}


def missing_head(path: Path, layout: Layout) -> str | None:
    """Why the file's model cannot write a rewrite: its own LM head is not in the file (None: it can)."""
    width = layout.shapes["model.embed_tokens.weight"][1]
    if layout.has_lm_head or width < UNTIED_FROM.get(layout.family, 1 << 30):
        return None
    return (f"{path.name} has no LM head (lm_head.weight; ComfyUI's text-encoder files leave it out): it encodes, "
            "but cannot write a VERIFI rewrite; turn rewrite off, or load the model's Hugging Face folder")


def _count(shapes, stem: str) -> int:
    return 1 + max(int(m[1]) for k in shapes if (m := re.match(re.escape(stem) + r"(\d+)\.", k)))


def build_config(layout: Layout, tokenizer):
    """The transformers config of the file's model: sizes from the shapes, the rest published."""
    import transformers

    s = layout.shapes
    vocab, hidden = s["model.embed_tokens.weight"]
    head_dim = s[LAYER0 + "self_attn.q_norm.weight"][0] if LAYER0 + "self_attn.q_norm.weight" in s else HEAD_DIM
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=s[LAYER0 + "mlp.gate_proj.weight"][0],
                num_hidden_layers=_count(s, "model.layers."), head_dim=head_dim,
                num_attention_heads=s[LAYER0 + "self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=s[LAYER0 + "self_attn.k_proj.weight"][0] // head_dim,
                tie_word_embeddings=not layout.has_lm_head, rms_norm_eps=1e-6,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if layout.family == "gemma3_text":
        heads = text["num_attention_heads"]
        return transformers.Gemma3TextConfig(
            **text, bos_token_id=tokenizer.bos_token_id, max_position_embeddings=131072, sliding_window=1024,
            # gemma-3 27B scales queries by 1/sqrt(hidden / heads) = 1/sqrt(168); the others by 1/sqrt(head_dim)
            query_pre_attn_scalar=hidden // heads if hidden == 5376 else head_dim,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})
    if layout.family == "qwen3":
        return transformers.Qwen3Config(**text, max_position_embeddings=40960,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    text.pop("head_dim")
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if layout.family == "qwen2":
        return transformers.Qwen2Config(**text, max_position_embeddings=32768, rope_parameters=rope)
    # Qwen2.5-VL: the vision tower's sizes from its weights
    hidden_v, channels, frames, patch, _ = s["visual.patch_embed.proj.weight"]
    depth = _count(s, "visual.blocks.")
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(depth=depth, hidden_size=hidden_v, num_heads=hidden_v // VISION_HEAD_DIM, in_channels=channels,
                  intermediate_size=s["visual.blocks.0.mlp.gate_proj.weight"][0], patch_size=patch,
                  temporal_patch_size=frames, spatial_merge_size=int((s["visual.merger.mlp.0.weight"][1] // hidden_v) ** 0.5),
                  out_hidden_size=s["visual.merger.mlp.2.weight"][0], window_size=112,
                  fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7])  # 7, 15, 23, 31 at depth 32
    rope["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # [16, 24, 24] for 128
    return transformers.Qwen2_5_VLConfig(
        text_config={**text, "max_position_embeddings": 128000, "rope_parameters": rope}, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=not layout.has_lm_head)


def read_weights(path: Path, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's names, at dtype; fp8 matrices times their scales."""
    from safetensors import safe_open

    out, scales = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(layout.prefix) or key in ("scaled_fp8", "spiece_model"):
                continue
            name = key[len(layout.prefix):]
            if name.endswith((".scale_weight", ".scale_input")):
                if name.endswith(".scale_weight"):
                    scales[name[: -len(".scale_weight")] + ".weight"] = f.get_tensor(key).float()
                continue
            out[name] = f.get_tensor(key)
    for name, t in out.items():
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name in scales:
            t = t.float() * scales.get(name, 1.0)
        out[name] = t.to(dtype)
    return out


def load_tokenizer(path: Path, layout: Layout, folder: Path | None):
    """A tokenizer for the file: the named folder, else the family's default folder; Qwen gets
    our ChatML (with image items, and Qwen3's empty reasoning block), Gemma its turns if it has none."""
    from transformers import AutoTokenizer

    family = "gemma" if layout.family == "gemma3_text" else "qwen"
    folder = folder or TOKENIZER_FOLDERS.get(family)
    if folder is not None and layout.family == "qwen3":
        tok = _qwen3_tokenizer(Path(folder))
    elif folder is not None:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        # Gemma's files carry their SentencePiece model, but transformers 5 reads no bare .model
        # file without tokenizer.json (its converter needs protobuf and a slow tokenizer)
        where = ("Gemma-3's tokenizer.json" if family == "gemma" else
                 "tokenizer.json, or vocab.json + merges.txt; inside ComfyUI its own Qwen tokenizer is used")
        raise ValueError(f"{path.name} is one .safetensors file without a tokenizer: name the folder of the model's "
                         f"tokenizer files ({where}), from the model's original repository")
    if family == "qwen":
        tok.chat_template = CHATML.replace("{{ THINK }}", "<think>\n\n</think>\n\n" if layout.family == "qwen3" else "")
    elif not tok.chat_template:
        tok.chat_template = GEMMA_TURNS
    return tok


def _qwen3_tokenizer(folder: Path):
    """A Qwen2.5 tokenizer folder made Qwen3's: the tokens after Qwen2.5's vocabulary replaced by
    Qwen3's four (<think> = 151667). A Qwen3 tokenizer folder is used as it is."""
    import json
    import shutil

    from transformers import AutoTokenizer

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
                config["additional_special_tokens"] = [t for t in config.get("additional_special_tokens", []) if t not in extra]
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


def load(path: Path, dtype: torch.dtype, device: torch.device, tokenizer_folder: Path | None = None):
    """(model, tokenizer, layout) of a one-file LLM / VLM encoder."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"{path.name}: one-file encoders need transformers 5 or newer (installed: "
                         f"{transformers.__version__}): pip install -U transformers")
    layout = read_layout(path)
    tok = load_tokenizer(path, layout, tokenizer_folder)
    config = build_config(layout, tok)
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "gemma3_text": transformers.Gemma3ForCausalLM}[layout.family]
    weights = read_weights(path, layout, dtype)
    if layout.family == "gemma3_text":  # a vision tower beside Gemma's decoder is not used: text only
        dropped = [k for k in weights if not k.startswith(("model.", "lm_head."))]
        for k in dropped:
            del weights[k]
        if dropped:
            log.info("%s: %d tensors outside the language model (a vision tower) are not used", path.name, len(dropped))
    misfit = f"{path.name}: the weights do not fit a {layout.family} model of the sizes its embeddings and first layer give"
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=weights, dtype=dtype, output_loading_info=True,
                                          ignore_mismatched_sizes=True)  # reported below, by name
    except RuntimeError as e:
        raise ValueError(f"{misfit} ({str(e).splitlines()[0][:200]})") from None
    missing = set(info["missing_keys"]) - {"lm_head.weight"}
    if missing or info["mismatched_keys"]:
        raise ValueError(f"{misfit} (missing {sorted(missing)[:4]}, mismatched {list(info['mismatched_keys'])[:4]})")
    if layout.scaled_fp8:
        log.info("%s: fp8 weights dequantised to %s with their per-matrix scales", path.name, dtype)
    return model.to(device), tok, layout
