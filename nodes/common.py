"""What every UniFusion node shares: the core, the socket types, small helpers."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

# Inside ComfyUI this package is <pack>.nodes and the core is <pack>.unifusion_core; in tests and
# scripts both are top-level packages.
if __package__ and "." in __package__:
    uf = importlib.import_module(__package__.rsplit(".", 1)[0] + ".unifusion_core")
else:
    uf = importlib.import_module("unifusion_core")

log = logging.getLogger(__name__)

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
        raise ValueError(f"layer_drop must be VLM layer indices separated by commas, e.g. '0, 27'; "
                         f"got {text!r}") from None


# --- advice: what the checkpoint was not trained for ---------------------------------------------


def advise(node: str, notes: list[str]) -> list[str]:
    """notes (uf.advice's sentences), each logged as a warning of `node` (ComfyUI's log)."""
    for note in notes:
        log.warning("%s: %s", node, note)
    return notes


def with_notes(result: tuple, notes: list[str]):
    """A node's return value, with its notes as UI text (kept in ComfyUI's history) when there are any."""
    return {"ui": {"text": notes}, "result": result} if notes else result


# --- inputs as they arrive ------------------------------------------------------------------------
# ComfyUI refuses a link of the wrong socket type, but an API graph may put a plain value (a number,
# a string) where a socket belongs, and other packs' IMAGE tensors vary: check once, at node entry.


def expect(value, kind: type, name: str, source: str, holds: type | None = None):
    """`value` as its socket carries it (`holds`: the object inside a loaded model), or TypeError."""
    inner = value.obj if holds is not None and isinstance(value, kind) else value
    if not isinstance(value, kind) or not isinstance(inner, holds or kind):
        raise TypeError(f"{name} must be the output of {source}, got a {type(inner).__name__}; "
                        f"connect {name} to a {source} node")
    return value


def expect_references(images):
    """The optional `images` input: reference images from UniFusion Tile Images (a tuple), or None."""
    if images is not None and not (isinstance(images, tuple) and all(isinstance(r, ReferenceImage) for r in images)):
        raise TypeError(f"images must be the output of UniFusion Tile Images, got a {type(images).__name__}; "
                        "connect images to a UniFusion Tile Images node")
    return images


def expect_image(image, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE: float [B, H, W, 3] in 0..1, at least 1x1, finite."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a ComfyUI IMAGE [batch, height, width, 3 (RGB)], got {shape}; "
                         "convert it to RGB first (e.g. drop the alpha channel)")
    if not image.is_floating_point() or min(image.shape[:3]) == 0:
        raise ValueError(f"{name} must hold float pixels and at least one 1x1 image, "
                         f"got {image.dtype} {tuple(image.shape)}")
    uf.guard.require_finite(name, image, "fix the node that made it")
    return image
