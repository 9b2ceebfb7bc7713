"""UniFusion core: LAP, refiner, DiT and rectified-flow sampling, independent of ComfyUI."""

from . import advice, dit, guard, lora, paraphrase, scene_edits, scene_vlm, scenes
from .assets import bundled_model, bundled_vlm
from .checkpoint import load_model, read_config, save_model
from .conditioning import Conditioning
from .config import (
    DiTParams,
    EncoderSpec,
    LAPParams,
    RefinerParams,
    SamplingParams,
    UniFusionConfig,
    every_nth_layer,
)
from .dit import UniFusionDiT
from .encoders import VLMEncoder, load_vlm
from .features import Features
from .lap import LayerwiseAttentionPooling
from .latents import LATENT_SPACES, LatentSpace, get_latent_space
from .model import UniFusionModel
from .presets import PRESETS, get_preset
from .refiner import Refiner
from .sampling import SAMPLERS
from .tiling import TiledImage, tile_images

__all__ = [
    "Conditioning",
    "DiTParams",
    "EncoderSpec",
    "Features",
    "LAPParams",
    "LATENT_SPACES",
    "LatentSpace",
    "LayerwiseAttentionPooling",
    "PRESETS",
    "RefinerParams",
    "Refiner",
    "SAMPLERS",
    "SamplingParams",
    "TiledImage",
    "UniFusionConfig",
    "UniFusionDiT",
    "UniFusionModel",
    "VLMEncoder",
    "bundled_model",
    "bundled_vlm",
    "every_nth_layer",
    "get_latent_space",
    "get_preset",
    "advice",
    "dit",
    "guard",
    "lora",
    "paraphrase",
    "scene_edits",
    "scene_vlm",
    "scenes",
    "load_model",
    "load_vlm",
    "read_config",
    "save_model",
    "tile_images",
]
