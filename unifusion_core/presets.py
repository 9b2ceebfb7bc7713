"""Named model configurations."""

from __future__ import annotations

from .config import DiTParams, EncoderSpec, LAPParams, RefinerParams, UniFusionConfig, every_nth_layer
from .latents import LATENT_SPACES

# Encoders the presets assume when no VLM is given (from_preset(vlm=...) replaces them).
TINY_ENCODER = EncoderSpec("tiny", "tiny-random", hidden_size=32, num_layers=6, layers=every_nth_layer(6))
SMOLLM2_135M = EncoderSpec("llama", "SmolLM2-135M-Instruct", hidden_size=576, num_layers=30, layers=every_nth_layer(30))
INTERNVL3_8B = EncoderSpec("internvl", "InternVL3-8B", hidden_size=3584, num_layers=28, layers=every_nth_layer(28))

PRESETS: dict[str, UniFusionConfig] = {
    # Unit tests: a forward pass in milliseconds on a CPU.
    "tiny": UniFusionConfig(
        encoder=TINY_ENCODER,
        lap=LAPParams(heads=2),
        refiner=RefinerParams(heads=2),
        dit=DiTParams(hidden_size=64, depth=2, heads=4),
        latent=LATENT_SPACES["pixel"],
    ),
    # Quick local runs on a CPU at 256x256 (16x16 = 256 image tokens in the Flux latent space).
    "small": UniFusionConfig(
        encoder=SMOLLM2_135M,
        lap=LAPParams(heads=8),
        refiner=RefinerParams(heads=8),
        dit=DiTParams(hidden_size=512, depth=12, heads=8),
        latent=LATENT_SPACES["flux"],
    ),
    # The paper's ablation DiT (Sec. 2.2): 32 layers, 32 heads, width 4096, 2x2 patches, ~5B.
    # The paper does not give the MLP width; ratio 2.75 with the shared modulation brings the
    # DiT to the stated 5B (ratio 4 would give 6.6B).
    "paper-5b": UniFusionConfig(
        encoder=INTERNVL3_8B,
        lap=LAPParams(heads=32),
        refiner=RefinerParams(heads=32),
        dit=DiTParams(hidden_size=4096, depth=32, heads=32, mlp_ratio=2.75),
        latent=LATENT_SPACES["flux"],
    ),
}


def get_preset(name: str) -> UniFusionConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
