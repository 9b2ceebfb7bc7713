"""ComfyUI nodes of the UniFusion pack: thin wrappers over unifusion_core (one node per file)."""

from . import host
from .lap_encode import UniFusionLAPEncode
from .lora_load import UniFusionLoRALoader
from .model_load import UniFusionModelLoad
from .sample import UniFusionSample
from .scene_render import UniFusionSceneRender
from .tile_images import UniFusionTileImages
from .verifi_rewrite import UniFusionVERIFIRewrite
from .vlm_load import UniFusionVLMLoad

host.register_folders()

# Node ids and input names are public API: saved workflows depend on them.
NODE_CLASS_MAPPINGS = {
    "UniFusionVLMLoad": UniFusionVLMLoad,
    "UniFusionTileImages": UniFusionTileImages,
    "UniFusionVERIFIRewrite": UniFusionVERIFIRewrite,
    "UniFusionModelLoad": UniFusionModelLoad,
    "UniFusionLoRALoader": UniFusionLoRALoader,
    "UniFusionLAPEncode": UniFusionLAPEncode,
    "UniFusionSample": UniFusionSample,
    "UniFusionSceneRender": UniFusionSceneRender,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UniFusionVLMLoad": "UniFusion VLM Load",
    "UniFusionTileImages": "UniFusion Tile Images",
    "UniFusionVERIFIRewrite": "UniFusion VERIFI Rewrite",
    "UniFusionModelLoad": "UniFusion Model Load",
    "UniFusionLoRALoader": "UniFusion LoRA Loader",
    "UniFusionLAPEncode": "UniFusion LAP Encode",
    "UniFusionSample": "UniFusion Sample",
    "UniFusionSceneRender": "UniFusion Scene Render",
}
