"""UniFusion LoRA Loader: a UniFusion LoRA (the trainer's lora.safetensors) on a loaded UniFusion model."""

from __future__ import annotations

import math

from . import host
from .common import CATEGORY, MODEL, expect, uf


class UniFusionLoRALoader:
    DESCRIPTION = (
        "Applies a UniFusion LoRA (lora.safetensors from the UniFusion trainer's --lora-rank, in models/loras or "
        "models/unifusion) to a UniFusion model at a strength, through ComfyUI's own LoRA patching: the weights "
        "are patched when the model loads and restored when it unloads, and the model at the input is left as "
        "it is. Chain loaders to stack LoRAs. A LoRA trained for another model shape is refused, naming the "
        "layers that differ."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied, for LAP Encode, UniFusion Sample or another LoRA Loader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From UniFusion Model Load (or another UniFusion LoRA Loader)."}),
                "lora_name": (host.list_loras(), {
                    "tooltip": "UniFusion LoRAs (metadata format 'unifusion-lora') found in models/loras and "
                               "models/unifusion; other models' LoRAs are not listed."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "How much of the LoRA: 1 as trained, 0 the model without it (exactly), between "
                               "them a blend, negative values push away from what it learned, above 1 exaggerate."}),
            }
        }

    def load(self, model, lora_name: str, strength: float = 1.0):
        expect(model, host.Managed, "model", "UniFusion Model Load", uf.UniFusionModel)
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
        lora = uf.lora.read_lora(host.resolve("lora", lora_name))
        uf.lora.check_fits(model.obj, lora)  # a clear error before ComfyUI's patcher (which only logs a mismatch)
        return (host.with_lora(model, lora, strength),)
