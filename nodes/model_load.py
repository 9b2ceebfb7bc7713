"""UniFusion Model Load: a UniFusion checkpoint (LAP + refiner + DiT) from models/unifusion."""

from __future__ import annotations

import torch

from . import host
from .common import CATEGORY, MODEL, uf

WEIGHT_DTYPES = {
    "default": None,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class UniFusionModelLoad:
    DESCRIPTION = (
        "Loads a UniFusion checkpoint (one .safetensors holding LAP, refiner and DiT, with its config and "
        "the VLM it was trained against in the file) from models/unifusion or models/diffusion_models. "
        "The pack's own unifusion-scenes-64.safetensors (flat coloured shapes at 64x64, with SmolLM2) is "
        "listed too, read from the pack's folder."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The UniFusion model, for LAP Encode and UniFusion Sample.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.list_models(), {
                    "tooltip": "UniFusion checkpoints found in models/unifusion and models/diffusion_models, and the "
                               "one bundled with the pack (unifusion-scenes-64.safetensors)."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "How the weights are stored in memory. default: the dtype ComfyUI picks for diffusion "
                               "models (bf16 on most GPUs, fp32 on CPUs); fp8 halves the memory of bf16 and computes "
                               "in that dtype."}),
            }
        }

    def load(self, model_name: str, weight_dtype: str = "default"):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
        device = host.load_device()
        storage = WEIGHT_DTYPES[weight_dtype]
        fp8 = storage in (torch.float8_e4m3fn, torch.float8_e5m2)
        compute = host.compute_dtype(device) if storage is None or fp8 else storage
        model = uf.load_model(
            host.resolve("model", model_name), dtype=compute, device=host.offload_device(),
            operations=host.operations(storage if fp8 else None, compute),
            weight_dtype=storage if fp8 else None,
        )
        return (host.Managed(model, model, device, host.offload_device(), partial=True),)
