"""UniFusion Scene Render: a scene of the pack's synthetic grammar, drawn exactly, as an IMAGE."""

from __future__ import annotations

import numpy as np
import torch

from .common import CATEGORY, uf

EXAMPLE = uf.scenes.EXAMPLE


class UniFusionSceneRender:
    DESCRIPTION = (
        "Draws a scene of the bundled models' synthetic grammar (flat coloured shapes on black, e.g. "
        f"'{EXAMPLE}') exactly, as an IMAGE: an input picture that needs no file, known exactly (the scene VLM "
        "workflow reads it). Any paraphrase of the grammar is read too. "
        "Swap in Load Image for a picture of your own."
    )
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The scene: one size x size image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"default": EXAMPLE, "tooltip": (
                    "A scene of the grammar, or a paraphrase of one ('A blue square below a red circle.'): "
                    f"{uf.scenes.describe_vocabulary()}.")}),
                "size": ("INT", {"default": 64, "min": 16, "max": 1024, "step": 8, "tooltip": (
                    "Width and height in pixels (the bundled models know 64).")}),
                # No control_after_generate: the frontend would add one set to randomize for an input named seed,
                # and the picture would change at every run.
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": (
                                     "0: each object exactly at its nominal place. Any other seed moves each object "
                                     f"by up to {uf.scenes.JITTER:.0%} of the canvas (the jitter the bundled models "
                                     "were trained with), the same way for the same seed.")}),
            },
        }

    def render(self, prompt: str, size: int = 64, seed: int = 0):
        scene = uf.paraphrase.canonical(prompt)  # ValueError naming what the grammar accepts
        pixels = uf.scenes.render(scene, size, np.random.default_rng(seed) if seed else None)
        return (torch.from_numpy(pixels).float().div(255).unsqueeze(0),)
