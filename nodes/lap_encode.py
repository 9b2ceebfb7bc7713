"""UniFusion LAP Encode: VLM features -> DiT conditioning through LAP and the refiner."""

from __future__ import annotations

from . import host
from .common import CATEGORY, COND, FEATURES, MODEL, advise, expect, parse_layers, uf, with_notes

TOKENS = ("all", "image", "text")


class UniFusionLAPEncode:
    DESCRIPTION = (
        "Pools the VLM layers of every token with Layerwise Attention Pooling and refines the sequence "
        "(paper Sec. 2-3), giving the conditioning for UniFusion Sample. Refuses features from a VLM the "
        "checkpoint was not trained against, and warns (in the log and on the node) when rewrite is on for a "
        "checkpoint trained without it, or off for one trained with it, and when the prompt is outside the "
        "scene grammar of the pack's own scenes model."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (COND,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Conditioning for UniFusion Sample.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From UniFusion Model Load."}),
                "features": (FEATURES, {"tooltip": "From VERIFI Rewrite."}),
                "tokens": (list(TOKENS), {"default": "all", "tooltip": (
                    "Which tokens condition: all, only the image tokens, or only the text tokens (e.g. images for the "
                    "first steps, text after: paper Sec. 5.2).")}),
            },
            "optional": {
                "layer_drop": ("STRING", {"default": "", "tooltip": (
                    "VLM layers to leave out of the pooling, e.g. '0, 27' (paper Fig. 12). Empty: none.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def encode(self, model, features, tokens: str = "all", layer_drop: str = "", unique_id=None):
        expect(model, host.Managed, "model", "UniFusion Model Load", uf.UniFusionModel)
        expect(features, uf.Features, "features", "UniFusion VERIFI Rewrite")
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {list(TOKENS)}, got {tokens!r}")
        notes = advise("UniFusion LAP Encode", uf.advice.advice(model.obj.config, features=features,
                                                                lora=bool(model.loras)))
        host.show_text(unique_id, notes)
        if tokens == "image":
            features = features.image_tokens()
        elif tokens == "text":
            features = features.text_tokens()
        net = model.load(memory_required=model.obj.encode_memory_required(1, features.num_tokens))
        cond = net.encode(features, layer_drop=parse_layers(layer_drop), device=model.device)
        return with_notes((cond.to(host.intermediate_device()),), notes)  # conditioning waits off the GPU
