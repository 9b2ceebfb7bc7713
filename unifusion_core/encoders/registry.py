"""The encoder families, one line each, and what users read about them: every list of supported
models (errors, the VLM Load node's text) is made from the families' labels here, never written out."""

from __future__ import annotations

from .base import Layout, TextOnly, VisionLanguage
from .gemma3 import Gemma3
from .gemma3_text import Gemma3Text
from .internvl import InternVL
from .llama import Llama
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3vl import Qwen3VL
from .qwen25vl import Qwen25VL

FAMILIES: tuple[type[TextOnly], ...] = (InternVL, Gemma3, Qwen25VL, Qwen3VL, Llama, Qwen2, Qwen3, Gemma3Text)


def family(model_type: str) -> type[TextOnly] | None:
    """The family serving a config.json model_type, or None when unsupported."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def vision_families() -> list[type[TextOnly]]:
    return [f for f in FAMILIES if f.takes_images]


def native_resolution_families() -> list[type[TextOnly]]:
    """The VLMs that read each image whole at its own resolution instead of tiles."""
    return [f for f in vision_families() if f.prepare_images is not VisionLanguage.prepare_images]


def text_families() -> list[type[TextOnly]]:
    return [f for f in FAMILIES if not f.takes_images]


def one_file_families() -> list[type[TextOnly]]:
    return [f for f in FAMILIES if f.one_file_class]


def labels(families) -> str:
    """'A, B, C' of the families' labels."""
    return ", ".join(f.label for f in families)


def one_file_family(layout: Layout, name: str) -> str:
    """The model_type a one-file checkpoint loads as, from its tensor names; ValueError when no
    family knows them (or one knows them but cannot load the file)."""
    found = [(f, t) for f in FAMILIES if (t := f.detect(layout, name))]
    if len(found) > 1:
        raise RuntimeError(f"{name}: the families {[f.__name__ for f, _ in found]} all claim the file; "
                           "make their detect() exclusive")
    if not found:
        raise ValueError(f"{name}: an LLM layout this pack does not know; supported in one file: "
                         f"{labels(one_file_families())}")
    return found[0][1]


def _types(families) -> str:
    return ", ".join(f"{f.label} ({', '.join(map(repr, f.model_types))})" for f in families)


SUPPORTED = (f"{_types(vision_families())}, text-only decoders: {_types(text_families())}, and .gguf files of "
             "the text-only decoders")
