"""Latent spaces: how a checkpoint's model space relates to a VAE's raw latents."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatentSpace:
    """Channels, spatial downscale and the affine map raw VAE latent -> model space."""

    name: str
    channels: int
    downscale: int
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if self.channels < 1 or self.downscale < 1:
            raise ValueError(
                f"latent space {self.name!r}: channels and downscale must be >= 1, "
                f"got channels={self.channels}, downscale={self.downscale}"
            )
        if self.scale == 0:
            raise ValueError(f"latent space {self.name!r}: scale must be non-zero")

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> model space (what the DiT denoises)."""
        return (raw - self.shift) * self.scale

    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> raw VAE latent (what ComfyUI's VAE Decode takes)."""
        return z / self.scale + self.shift

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Image size in pixels -> latent size, floored like ComfyUI's EmptyLatentImage."""
        if height < self.downscale or width < self.downscale:
            raise ValueError(
                f"image size {width}x{height} is smaller than one latent pixel of the "
                f"{self.name!r} latent space ({self.downscale}x{self.downscale} pixels)"
            )
        return height // self.downscale, width // self.downscale

    def to_dict(self) -> dict:
        return asdict(self)


# Scale/shift as the VAEs' own configs and ComfyUI's latent formats define them.
LATENT_SPACES: dict[str, LatentSpace] = {
    "flux": LatentSpace("flux", channels=16, downscale=8, scale=0.3611, shift=0.1159),
    "sd3": LatentSpace("sd3", channels=16, downscale=8, scale=1.5305, shift=0.0609),
    "sdxl": LatentSpace("sdxl", channels=4, downscale=8, scale=0.13025, shift=0.0),
    # ComfyUI's `pixel_space` VAE: RGB in -1..1, decoded with no weights.
    "pixel": LatentSpace("pixel", channels=3, downscale=1, scale=1.0, shift=0.0),
}


def get_latent_space(space: str | LatentSpace | dict) -> LatentSpace:
    """Look up a latent space by name, or validate one given as a dict."""
    if isinstance(space, LatentSpace):
        return space
    if isinstance(space, dict):
        try:
            return LatentSpace(**space)
        except TypeError as e:
            raise ValueError(f"bad latent space description {space!r}: {e}") from None
    if space not in LATENT_SPACES:
        raise ValueError(f"unknown latent space {space!r}; expected one of {sorted(LATENT_SPACES)}")
    return LATENT_SPACES[space]
