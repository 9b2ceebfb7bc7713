"""UniFusionModel: LAP + refiner + DiT, VLM features -> conditioning -> velocity (its sampler: sampling.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sampling
from .conditioning import Conditioning
from .config import EncoderSpec, UniFusionConfig
from .dit import UniFusionDiT
from .features import Features, require_finite_features
from .lap import LayerwiseAttentionPooling
from .presets import get_preset
from .refiner import Refiner


def encoder_spec_of(vlm) -> EncoderSpec:
    """The EncoderSpec of an encoder, of its Features, or the spec itself."""
    if isinstance(vlm, EncoderSpec):
        return vlm
    for attr in ("encoder_spec", "encoder"):  # VLMEncoder.encoder_spec(), Features.encoder
        spec = getattr(vlm, attr, None)
        spec = spec() if callable(spec) else spec
        if isinstance(spec, EncoderSpec):
            return spec
    raise ValueError(f"cannot tell which encoder {type(vlm).__name__} is: expected an EncoderSpec, "
                     "a VLM encoder or its Features")


class UniFusionModel(nn.Module):
    """The trainable part of UniFusion: LAP -> refiner -> DiT (Fig. 4)."""

    def __init__(self, config: UniFusionConfig, dtype: torch.dtype | None = None, device=None, operations=None):
        super().__init__()
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32, torch.bfloat16), "
                             f"got {dtype!r}")
        operations = operations or nn
        self.config = config
        kw = dict(dtype=dtype or torch.float32, device=device, operations=operations)
        D = config.encoder.hidden_size
        self.lap = LayerwiseAttentionPooling(D, config.num_layers, **asdict(config.lap), **kw)
        self.refiner = Refiner(D, config.dit.hidden_size, **asdict(config.refiner), **kw)
        self.dit = UniFusionDiT(config.dit, config.latent.channels, **kw)
        if torch.device(device or "cpu").type != "meta":
            self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, vlm=None, dtype=None, device=None, operations=None, **overrides) -> UniFusionModel:
        """A freshly initialised model from a preset; `vlm` (an encoder, its Features or an
        EncoderSpec) sets the LAP input to that encoder's width and selected layers."""
        config = get_preset(name)
        if vlm is not None:
            overrides = {"encoder": encoder_spec_of(vlm), **overrides}
        return cls(config.replace(**overrides), dtype=dtype, device=device, operations=operations)

    def initialize_weights(self) -> None:
        self.lap.initialize_weights()
        self.refiner.initialize_weights()
        self.dit.initialize_weights()

    @property
    def device(self) -> torch.device:
        return self.dit.null_cond.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the plain parameters (comfy.ops may store Linear weights
        in another dtype and cast them on the fly)."""
        return self.dit.null_cond.dtype

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per part and in total (works on the meta device)."""
        counts = {n: sum(p.numel() for p in m.parameters()) for n, m in self.named_children()}
        return {**counts, "total": sum(counts.values())}

    # --- conditioning -------------------------------------------------------------------------

    def encode(
        self, features, mask: Tensor | None = None, layer_drop: Sequence[int] = (), device: torch.device | None = None
    ) -> Conditioning:
        """VLM features -> DiT conditioning.

        features: a Features, a list of them (one per batch item), or a tensor (B, T, L, D) or
        (T, L, D) with an optional mask (B, T). layer_drop: VLM layer indices (as in
        config.encoder.layers) whose contribution to the pooling is zeroed (Fig. 12). device: where
        to compute (default: where the parameters are; ComfyUI passes its load device).
        """
        device = device or self.device
        hidden, mask = self._collate(features, mask)
        mask = mask.to(device)
        layers = self.config.encoder.layers
        bad = [i for i in layer_drop if i not in layers]
        if bad:
            raise ValueError(f"layer_drop {bad} not among the model's VLM layers {list(layers)}")
        drop = [layers.index(i) for i in layer_drop]
        pooled = self.lap(hidden.to(device), drop)  # (B, T, D_vlm); LAP normalises in fp32
        tokens = self.refiner(pooled, None if bool(mask.all()) else mask)  # (B, T, D_dit)
        return Conditioning(tokens, mask)

    def encode_memory_required(self, batch: int, tokens: int) -> int:
        """Rough peak bytes of activations of encode() (what LAP Encode asks the host to keep free):
        LAP attends over L layers for every token."""
        L, D = self.config.num_layers, self.config.encoder.hidden_size
        per_value = 4 + (3 + 1 + self.config.lap.mlp_ratio + 2) * self.dtype.itemsize
        return int(1.5 * batch * tokens * L * D * per_value)

    def null_conditioning(self, batch_size: int = 1, device: torch.device | None = None) -> Conditioning:
        """The learned unconditional input used for classifier-free guidance."""
        tokens = self.dit.null_cond.to(device or self.device)[None].expand(batch_size, -1, -1)  # (B, 1, D)
        return Conditioning(tokens, torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device))

    def _collate(self, features, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        enc = self.config.encoder
        if isinstance(features, Features):
            features = [features]
        if isinstance(features, (list, tuple)):
            if mask is not None:
                raise ValueError("pass a mask only with a tensor; Features carry their own length")
            for i, f in enumerate(features):
                if not isinstance(f, Features):
                    raise ValueError(f"features[{i}] is a {type(f).__name__}; a list holds Features only "
                                     "(pass tensors as one (B, T, L, D) tensor)")
                self._check_encoder(f)
            hs = [f.hidden for f in features]
            T = max(h.shape[0] for h in hs)
            mask = torch.stack([torch.arange(T) < h.shape[0] for h in hs])
            features = torch.stack([F.pad(h, (0, 0, 0, 0, 0, T - h.shape[0])) for h in hs])
        elif isinstance(features, Tensor):  # Features were checked when made; a plain tensor here
            require_finite_features(features)
        else:
            raise ValueError(f"features must be Features or a tensor, got {type(features).__name__}")
        hidden = features[None] if features.ndim == 3 else features
        if hidden.ndim != 4 or hidden.shape[2:] != (len(enc.layers), enc.hidden_size):
            raise ValueError(
                f"features must be (B, T, {len(enc.layers)}, {enc.hidden_size}) for encoder "
                f"{enc.name!r} (layers {list(enc.layers)}), got {tuple(features.shape)}"
            )
        B, T = hidden.shape[:2]
        if T == 0:
            raise ValueError("features hold no tokens: give a prompt or an image")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool)
        if mask.shape != (B, T):
            raise ValueError(f"mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every batch item needs at least one unmasked conditioning token")
        return hidden, mask

    def _check_encoder(self, f: Features) -> None:
        enc = self.config.encoder
        if tuple(f.layers) != enc.layers or (f.encoder is not None and not enc.same_encoder(f.encoder)):
            got = f.encoder.name if f.encoder is not None else "unknown encoder"
            raise ValueError(
                f"features come from {got!r} (layers {list(f.layers)}), but this model was trained "
                f"against {enc.name!r} ({enc.family}, hidden {enc.hidden_size}, "
                f"{enc.num_layers} layers, layers {list(enc.layers)}); load that encoder"
            )

    # --- generation ---------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Velocity (in the model's dtype) for model-space latents x (B, C, H, W) at times t (B,)."""
        return self.dit(x.to(self.dtype), t, cond.tokens, cond.mask)

    # The loop knows the model, not the other way round (flux's denoise(model, ...)): these are
    # sampling.sample / sampling.memory_required, called as methods.
    sample = sampling.sample
    memory_required = sampling.memory_required
