"""The frozen VLM encoder wing: loading (load.py, gguf_cache.py, single_file.py), one file per
encoder family (listed in registry.py, found by model_type), and VLMEncoder (encoder.py) over the
shared chat (chat.py), generation (decode.py) and layer capture (capture.py) pieces."""

from __future__ import annotations

from .base import Layout, TextOnly, VisionLanguage
from .chat import PreparedPrompt
from .decode import EMPTY_REWRITE_ADVICE, Rewrite
from .encoder import VLMEncoder
from .gemma3 import Gemma3
from .gemma3_text import Gemma3Text
from .internvl import InternVL
from .llama import Llama
from .load import load_vlm
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3vl import Qwen3VL
from .qwen25vl import Qwen25VL
from .registry import FAMILIES, SUPPORTED, family

__all__ = ["EMPTY_REWRITE_ADVICE", "FAMILIES", "SUPPORTED", "Gemma3",
           "Gemma3Text", "InternVL", "Layout", "Llama", "PreparedPrompt", "Qwen2", "Qwen3", "Qwen25VL", "Qwen3VL",
           "Rewrite", "TextOnly", "VLMEncoder", "VisionLanguage", "family", "load_vlm"]
