"""What every UniFusion node shares: the core, the socket types, small helpers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

# Inside ComfyUI this package is <pack>.nodes and the core is <pack>.unifusion_core; in tests and
# scripts both are top-level packages.
if __package__ and "." in __package__:
    uf = importlib.import_module(__package__.rsplit(".", 1)[0] + ".unifusion_core")
else:
    uf = importlib.import_module("unifusion_core")

CATEGORY = "UniFusion"

# Socket types, declared once.
VLM = "UNIFUSION_VLM"
IMAGES = "UNIFUSION_IMAGES"
FEATURES = "UNIFUSION_FEATURES"
MODEL = "UNIFUSION_MODEL"
COND = "UNIFUSION_COND"


@dataclass(frozen=True)
class ReferenceImage:
    """One reference image and how it is to be tiled (at the VLM's own tile size)."""

    image: torch.Tensor  # [1, H, W, 3] float 0..1 (ComfyUI IMAGE)
    max_tiles: int
    thumbnail: bool


def parse_layers(text: str) -> list[int]:
    """'0, 27' -> [0, 27]; empty -> []."""
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"layer_drop must be VLM layer indices separated by commas, e.g. '0, 27'; got {text!r}") from None
