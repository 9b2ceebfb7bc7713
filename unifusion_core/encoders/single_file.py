"""One-file LLM / VLM encoders: the .safetensors files ComfyUI users keep in models/text_encoders.

ComfyUI loads the LLM text encoders of Qwen-Image (Qwen2.5-VL-7B), Z-Image (Qwen3-4B), Lumina 2
and LTX-2 (Gemma) from ONE file: the weights under the original checkpoints' names
(`model.layers.N...`, and `visual...` for Qwen2.5-VL's vision tower), with no config and no
tokenizer (Gemma's files carry their SentencePiece model as a `spiece_model` tensor), sometimes in
fp8 with one scale per matrix (`scaled_fp8` marks them; `<name>.scale_weight` holds the scale).

Here the generic part: the tensor names and shapes are read, the family that knows them is asked
(registry.one_file_family; each family's file holds its detection, its published settings and
its tokenizer's template), fp8 weights are dequantised, the tokenizer comes from a folder the caller
names or the family's default folder (`TOKENIZER_FOLDERS`, set by the nodes), and the model is
assembled. Files without an LM head (ComfyUI's encoders do not need one) still encode; a VERIFI
rewrite needs the head. Needs transformers 5 (its config layout).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import registry
from .base import LAYER0, Layout

log = logging.getLogger(__name__)

# tokenizer_folder key of a family ("qwen", "gemma") -> a tokenizer folder to use when the caller
# names none (the nodes point "qwen" at ComfyUI's comfy/text_encoders/qwen25_tokenizer). A setting,
# like gguf_cache.GGUF_CACHE.
TOKENIZER_FOLDERS: dict[str, Path] = {}


class NotAnLLM(ValueError):
    """A readable .safetensors file that holds no LLM (CLIP, T5, a diffusion model): ComfyUI keeps its own
    text encoders in the same folder, so listings skip these quietly."""


def read_layout(path: Path) -> Layout:
    """The family of a one-file LLM, from names and shapes alone; ValueError when it is none we know
    (NotAnLLM when the file holds no LLM at all)."""
    from safetensors import SafetensorError, safe_open

    if path.stat().st_size == 0:
        raise ValueError(f"{path.name}: the file is empty (0 bytes): the download or copy did not finish; fetch it "
                         "again")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path.name}: not a readable safetensors file ({e}): it is truncated or corrupt; copy or "
                         "download it again") from None
    anchor = next((k for k in shapes if k.endswith(LAYER0 + "self_attn.q_proj.weight")), None)
    if anchor is None:
        raise NotAnLLM(f"{path.name}: not an LLM text encoder (no '{LAYER0}self_attn.q_proj.weight'): a CLIP, T5 "
                         "or diffusion model file cannot be a UniFusion encoder")
    prefix = anchor[: -len(LAYER0 + "self_attn.q_proj.weight")]
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)} | {
        k: v for k, v in shapes.items() if k in ("scaled_fp8", "spiece_model")}
    found = Layout("", shapes, prefix, "scaled_fp8" in shapes, "lm_head.weight" in shapes)
    return Layout(registry.one_file_family(found, path.name), shapes, prefix, found.scaled_fp8, found.has_lm_head)


def missing_head(path: Path, layout: Layout) -> str | None:
    """Why the file's model cannot write a rewrite: its own LM head is not in the file (None: it can)."""
    width = layout.shapes["model.embed_tokens.weight"][1]
    untied_from = registry.family(layout.family).untied_from
    if layout.has_lm_head or untied_from is None or width < untied_from:
        return None
    return (f"{path.name} has no LM head (lm_head.weight; ComfyUI's text-encoder files leave it out): it encodes, "
            "but cannot write a VERIFI rewrite; turn rewrite off, or load the model's Hugging Face folder")


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
    """A tokenizer for the file: the named folder, else the family's default folder, with the
    chat template the family gives it (Qwen: our ChatML; Gemma: its turns if it has none)."""
    fam = registry.family(layout.family)
    named, folder = folder is not None, folder or TOKENIZER_FOLDERS.get(fam.tokenizer_folder)
    if folder is None:
        raise ValueError(f"{path.name} is one .safetensors file without a tokenizer: name the folder of the model's "
                         f"tokenizer files ({fam.tokenizer_hint}), from the model's original repository")
    tok = fam.one_file_tokenizer(Path(folder))
    tok.chat_template = fam.one_file_chat_template(tok)
    which = f"the tokenizer in {folder}" + ("" if named else f" (the default for {fam.label} files)")
    check_vocabulary(path, layout, tok, which)
    return tok


def check_vocabulary(path: Path, layout: Layout, tokenizer, which: str) -> None:
    """ValueError when the tokenizer has ids beyond the file's embedding rows (another model's tokenizer:
    transformers would fail on it with 'Padding_idx must be within num_embeddings', or index past the table)."""
    rows = layout.shapes["model.embed_tokens.weight"][0]
    named = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    beyond = {k: i for k, i in named.items() if i is not None and i >= rows}
    if len(tokenizer) <= rows and not beyond:
        return
    ids = ", ".join(f"{k} id {i}" for k, i in beyond.items())
    raise ValueError(
        f"{path.name} has embeddings for {rows:,} tokens, but {which} has {len(tokenizer):,} tokens"
        f"{f' ({ids})' if ids else ''}: it is not this model's tokenizer; name the folder of the model's tokenizer "
        f"files ({registry.family(layout.family).tokenizer_hint}), from the model's original repository")


def require_transformers_5(path: Path, version: str) -> None:
    """ValueError when the installed transformers is older than 5 (the config layout the one-file
    families build). The one loader that needs 5: folders and .gguf files load with 4.56."""
    if int(version.split(".")[0]) >= 5:
        return
    raise ValueError(
        f"{path.name} is a one-file encoder, which needs transformers 5 or newer; this Python has transformers "
        f"{version} (ComfyUI-Manager does not upgrade an installed transformers). Upgrade it in the Python that "
        'runs ComfyUI: <ComfyUI\'s python> -m pip install -U "transformers>=5" (portable Windows build: '
        'python_embeded\\python.exe -m pip install -U "transformers>=5"), then restart ComfyUI')


def load(path: Path, dtype: torch.dtype, device: torch.device, tokenizer_folder: Path | None = None):
    """(model, tokenizer, layout) of a one-file LLM / VLM encoder."""
    import transformers

    require_transformers_5(path, transformers.__version__)
    layout = read_layout(path)
    fam = registry.family(layout.family)
    tok = load_tokenizer(path, layout, tokenizer_folder)
    config = fam.one_file_config(layout, tok)
    weights = fam.one_file_weights(read_weights(path, layout, dtype), path.name)
    misfit = (f"{path.name}: the weights do not fit a {layout.family} model of the sizes its embeddings and first "
              "layer give")
    try:
        model, info = getattr(transformers, fam.one_file_class).from_pretrained(
            None, config=config, state_dict=weights, dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported below, by name
    except RuntimeError as e:
        raise ValueError(f"{misfit} ({str(e).splitlines()[0][:200]})") from None
    missing = set(info["missing_keys"]) - {"lm_head.weight"}
    if missing or info["mismatched_keys"]:
        raise ValueError(f"{misfit} (missing {sorted(missing)[:4]}, mismatched {list(info['mismatched_keys'])[:4]})")
    if layout.scaled_fp8:
        log.info("%s: fp8 weights dequantised to %s with their per-matrix scales", path.name, dtype)
    return model.to(device), tok, layout
