"""Loading a frozen VLM / LLM offline: a Hugging Face folder, a .gguf file (through the
converted-weights cache), or one .safetensors file as ComfyUI keeps LLM text encoders."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import guard
from . import gguf_cache, registry, single_file
from .encoder import VLMEncoder

log = logging.getLogger(__name__)

# A folder needs one of these for AutoTokenizer (fast tokenizer, SentencePiece, or BPE vocab +
# merges.txt); without them transformers fails later with an unrelated error.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_vlm(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> VLMEncoder:
    """Load a VLM / LLM from a local Hugging Face folder (safetensors), a .gguf file, one
    .safetensors file as ComfyUI keeps LLM text encoders (`encoders/single_file.py`: `tokenizer`
    names its tokenizer folder), or the pack's own scene VLM file (`scene_vlm.py`, merged over
    its base GGUF in memory); never downloads.

    dtype defaults to float32 on the CPU and bfloat16 elsewhere. The model is frozen: eval mode,
    no gradients, never modified.

    A .gguf file is dequantised and its tokenizer converted by transformers, which takes about
    30 s for SmolLM2-135M on 2 CPU cores. With a cache folder (`cache_dir`, else
    `gguf_cache.GGUF_CACHE`) the result is kept there once as a plain Hugging Face folder
    (safetensors at `dtype`, the tokenizer and chat template), keyed by the file's path, size and
    modification time, the dtype and the transformers version, and later loads read that (under a
    second) after checking every file against the checksum recorded when it was written; a damaged
    entry is converted again and replaced. A changed GGUF gets a new entry and the old one is removed.
    Within guard.interruptible, Cancel reaches the conversion (gguf_cache.cancellable).
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if not path.exists():
        raise FileNotFoundError(f"VLM not found: {path}")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    converted = None  # the converted-weights cache entry of a .gguf file
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes): the download or copy did not finish; fetch it again")
    if path.is_file() and path.suffix == ".safetensors":
        from .. import scene_vlm

        if scene_vlm.is_scene_vlm(path):  # the pack's own small VLM over its base model
            model, tok = scene_vlm.load(path, dtype=dtype, cache=cache_dir if cache_dir is not None else
                                        gguf_cache.GGUF_CACHE)
            model = model.to(device).eval().requires_grad_(False)
            adapter = registry.family(model.config.model_type)
            return VLMEncoder(model, tok, adapter(model, tok), name=path.stem)
        return _load_single_file(path, dtype, device, tokenizer)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path}: a VLM is a Hugging Face model folder (with config.json), a .gguf file or one .safetensors "
                f"file, not a {path.suffix or 'bare'} file"
            )
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"loading {path.name} needs the '{module}' package: pip install gguf accelerate")
        folder, kw["gguf_file"] = path.parent, path.name
        cache = cache_dir if cache_dir is not None else gguf_cache.GGUF_CACHE
        converted = gguf_cache.cache_entry(path, dtype, Path(cache)) if cache is not None else None
        if converted is not None and converted.exists():
            problem = gguf_cache.damage(converted)
            if problem is None:
                try:
                    encoder = load_vlm(converted, dtype=dtype, device=device)
                    encoder.name = path.stem  # the GGUF's name: what checkpoints record as their encoder
                    return encoder
                except (ValueError, OSError) as e:
                    problem = str(e)
            log.warning("the converted weights of %s at %s cannot be read (%s); converting again to replace them",
                        path.name, converted, problem)
        try:
            with gguf_cache.cancellable():
                model_type = AutoConfig.from_pretrained(folder, **kw).model_type
        except (struct.error, ValueError, KeyError, IndexError, OSError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or "
                             "corrupt: fetch it again") from None
    else:
        try:  # read the type before transformers does: remote-code folders would only ask for trust
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        except FileNotFoundError:
            raise ValueError(
                f"{path} is not a model folder: it has no config.json. Point at a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files) or a .gguf file"
            ) from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}/config.json cannot be read ({e})") from None
        folder = path

    adapter = registry.family(model_type)
    if adapter is None:
        hint = ""
        if "internvl" in model_type:
            hint = " (the original remote-code InternVL format: use the '-hf' conversion)"
        raise ValueError(f"{path}: architecture {model_type!r} is not supported{hint}. Supported: {registry.SUPPORTED}")

    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files "
            "of the model's original repository into the folder beside config.json"
        )
    try:
        with gguf_cache.cancellable() if path.is_file() else nullcontext():  # Cancel reaches a GGUF's conversion
            tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
            weights = {} if path.is_file() else {"use_safetensors": True}
            placement = {} if device.type == "cpu" else {"device_map": {"": device}}  # straight to the GPU
            model = adapter.transformers_class().from_pretrained(folder, dtype=dtype, **kw, **weights, **placement)
    except OSError as e:
        raise ValueError(f"{path}: cannot load the model files ({e}); safetensors weights are required") from None
    except (SafetensorError, struct.error) as e:
        raise ValueError(f"{path}: a weights file cannot be read ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy or download it again") from None
    model = model.to(device).eval().requires_grad_(False)
    if path.is_file() and converted is not None:
        guard.check_cancel()  # Cancelled in the conversion's last steps: nothing is written
        gguf_cache.write_entry(converted, model, tokenizer, path)
    template = processor_template(folder) if adapter.takes_images else None
    return VLMEncoder(model, tokenizer, adapter(model, tokenizer), name=path.stem if path.is_file() else path.name,
                      chat_template=template)


def _load_single_file(path: Path, dtype: torch.dtype, device: torch.device, tokenizer) -> VLMEncoder:
    try:
        model, tok, layout = single_file.load(path, dtype, device, Path(tokenizer) if tokenizer else None)
    except (SafetensorError, struct.error) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy or download it again") from None
    model = model.eval().requires_grad_(False)
    encoder = VLMEncoder(model, tok, registry.family(layout.family)(model, tok), name=path.stem)
    encoder.no_lm_head = single_file.missing_head(path, layout)
    return encoder


def processor_template(folder: Path) -> str | None:
    """A VLM's processor may carry the chat template that writes image placeholders, in files
    AutoTokenizer does not read (InternVL3-hf's tokenizer comes from Qwen2.5-VL)."""
    for name, key in (("chat_template.json", "chat_template"), ("processor_config.json", "chat_template")):
        try:
            template = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if template:
            return template
    return None
