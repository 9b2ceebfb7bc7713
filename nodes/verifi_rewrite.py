"""UniFusion VERIFI Rewrite: the VLM rewrites the request in context; its features condition the DiT."""

from __future__ import annotations

import weakref

from . import host
from .common import CATEGORY, FEATURES, IMAGES, VLM, expect, expect_references, uf


class UniFusionVERIFIRewrite:
    DESCRIPTION = (
        "Encodes the prompt and reference images with the VLM. With rewrite on (VERIFI, paper Sec. 3.3) "
        "the VLM first writes a detailed description of the image to make, and the features of those "
        "words, captured while writing, plus every image token condition the image; with rewrite off, "
        "the prompt's own tokens do. The rewritten prompt comes out as text to read, edit or reuse."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (FEATURES, "STRING")
    RETURN_NAMES = ("features", "rewritten_prompt")
    OUTPUT_TOOLTIPS = ("VLM features for LAP Encode.",
                       "The VLM's rewritten prompt (the original prompt when rewrite is off).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm": (VLM, {"tooltip": "From UniFusion VLM Load."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "", "tooltip": (
                    "What to make, or how to change the reference images.")}),
                "rewrite": ("BOOLEAN", {"default": True, "tooltip": (
                    "VERIFI: let the VLM rewrite the request into a detailed prompt first (the paper's default).")}),
                "system_prompt": ("STRING", {"multiline": True, "default": uf.prompts.VERIFI_SYSTEM_PROMPT,
                                             "tooltip": (
                    "The instruction for the rewrite. Checkpoints are trained with this default; changing it steers "
                    "the rewrite.")}),
                "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 4096, "tooltip": (
                    "The longest rewrite, in tokens.")}),
                "sample": ("BOOLEAN", {"default": False, "tooltip": (
                    "Off: greedy decoding (always the same rewrite). On: sample with the seed.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": (
                    "Seed of the rewrite when sampling (sample on); unused otherwise, so a new node's control starts "
                    "at 'fixed': a changed seed would re-run every node after this one.")}),
            },
            "optional": {
                "images": (IMAGES, {"tooltip": "Reference images from UniFusion Tile Images."}),
            },
        }

    def __init__(self):
        self._last = None  # (inputs, weak references to vlm and images, result)

    def encode(self, vlm, prompt: str, rewrite: bool = True, system_prompt: str = "", max_new_tokens: int = 256,
               sample: bool = False, seed: int = 0, images=None):
        expect(vlm, host.Managed, "vlm", "UniFusion VLM Load", uf.VLMEncoder)
        expect_references(images)
        # The seed widget's control re-queues the node with a new seed, but a greedy rewrite (or
        # none) does not depend on it: reuse the last result instead of running the VLM again.
        key = (prompt, rewrite, system_prompt, max_new_tokens, sample, seed if sample and rewrite else None)
        objects = (vlm, *(images or ()))
        if self._last and self._last[0] == key and len(self._last[1]) == len(objects) and all(
            ref() is obj for ref, obj in zip(self._last[1], objects)
        ):
            return self._last[2]
        result = self._run(vlm, prompt, rewrite, system_prompt, max_new_tokens, sample, seed, images)
        self._last = (key, [weakref.ref(o) for o in objects], result)
        return result

    def _run(self, vlm, prompt, rewrite, system_prompt, max_new_tokens, sample, seed, images):
        encoder = vlm.obj
        tiled = [t for ref in images or () for t in encoder.tile(ref.image, ref.max_tiles, ref.thumbnail)]
        tokens = encoder.estimate_tokens(prompt, system_prompt, tiled, max_new_tokens if rewrite else 0)
        vlm.load(memory_required=encoder.memory_required(tokens))
        progress = host.Progress(max_new_tokens)
        features = encoder.encode(
            prompt, tiled, rewrite=rewrite, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
            seed=seed if sample else None, callback=lambda i, n: progress.update(i, n),
        )
        progress.update(max_new_tokens, max_new_tokens)  # the rewrite may end before max_new_tokens
        if rewrite and not features.text:  # the VLM wrote only whitespace: the prompt would not reach the image
            where = ("only the reference images would condition the image" if tiled else
                     "nothing would condition the image")
            raise ValueError(f"{encoder.name} wrote an empty rewrite (only whitespace): {where}; "
                             f"{uf.encoders.EMPTY_REWRITE_ADVICE}")
        return (features, features.text)
