"""UniFusionModel: LAP + refiner + DiT, encoding VLM features and sampling latents."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderSpec, UniFusionConfig
from .dit import UniFusionDiT
from .features import Features, require_finite_features
from .guard import ensure_memory, require_finite, require_finite_number
from .lap import LayerwiseAttentionPooling
from .presets import get_preset
from .refiner import Refiner
from .sampling import Callback, denoise, make_noise, resolution_shift

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """DiT-width conditioning tokens with a key-padding mask (True = real token)."""

    tokens: Tensor  # (B, T, D)
    mask: Tensor  # (B, T) bool

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def expand(self, batch_size: int) -> Conditioning:
        """Broadcast a batch of one to batch_size; a matching batch is returned as is."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"conditioning has batch {self.batch_size}; it must be 1 or the requested "
                f"batch size {batch_size}"
            )
        return Conditioning(self.tokens.expand(batch_size, -1, -1), self.mask.expand(batch_size, -1))

    def to(self, device) -> Conditioning:
        return Conditioning(self.tokens.to(device), self.mask.to(device))

    def by_length(self, max_padding: int = 0) -> list[tuple[Tensor | None, Conditioning]]:
        """The rows grouped into DiT calls by their length without trailing padding, each group cut
        to its longest row: [(row indices, or None for all rows; those rows)], longest first.

        Padding is masked out of every key, so a row computes the same without it (up to float
        rounding) in fewer FLOPs, and with no attention mask once none is left. Shorter rows join
        the group before them while the group's padding (rows x tokens short of its longest row)
        stays within `max_padding` tokens, since every extra call has a fixed cost too:
        max_padding 0 gives one group per length. Padding inside a row (not at its end) stays,
        masked, since cutting it would move the tokens after it.
        """
        T = self.mask.shape[1]
        lengths = (T - self.mask.flip(1).int().argmax(1)).tolist()  # last real token + 1 (T if none)
        groups: list[tuple[list[int], int]] = []  # (lengths, padding), the group's longest first
        for L in sorted(set(lengths), reverse=True):
            pad = lengths.count(L) * (groups[-1][0][0] - L) if groups else 0
            if groups and groups[-1][1] + pad <= max_padding:
                groups[-1] = (groups[-1][0] + [L], groups[-1][1] + pad)
            else:
                groups.append(([L], 0))
        if len(groups) == 1:
            L = groups[0][0][0]
            return [(None, self if L == T else Conditioning(self.tokens[:, :L], self.mask[:, :L]))]
        out = []
        for group, _ in groups:
            rows = torch.tensor([i for i, n in enumerate(lengths) if n in group], device=self.tokens.device)
            out.append((rows, Conditioning(self.tokens[rows, : group[0]], self.mask[rows, : group[0]])))
        return out

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Stack along the batch, right-padding shorter sequences (padding is masked out)."""
        T = max(c.tokens.shape[1] for c in conds)
        tokens = torch.cat([F.pad(c.tokens, (0, 0, 0, T - c.tokens.shape[1])) for c in conds])
        mask = torch.cat([F.pad(c.mask, (0, T - c.mask.shape[1]), value=False) for c in conds])
        return Conditioning(tokens, mask)


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

    def memory_required(self, batch: int, cond_tokens: int, width: int, height: int, guided: bool = True) -> int:
        """Rough peak bytes of activations for one sampler step (what a memory manager should keep
        free beside the weights): per token the qkv, attention output, MLP hidden and residuals."""
        space, p = self.config.latent, self.config.dit
        lh, lw = space.latent_size(height, width)
        tokens = cond_tokens + math.ceil(lh / p.patch_size) * math.ceil(lw / p.patch_size)
        per_token = p.hidden_size * (3 + 1 + p.mlp_ratio + 2) * self.dtype.itemsize
        return int(1.5 * batch * (2 if guided else 1) * tokens * per_token)  # 1.5: SDPA / allocator slack

    def encode_memory_required(self, batch: int, tokens: int) -> int:
        """Rough peak bytes of activations of encode(): LAP attends over L layers for every token."""
        L, D = self.config.num_layers, self.config.encoder.hidden_size
        return int(1.5 * batch * tokens * L * D * (4 + (3 + 1 + self.config.lap.mlp_ratio + 2) * self.dtype.itemsize))

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

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        width: int,
        height: int,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int = 0,
        shift: float | None = None,
        sampler: str = "euler",
        negative: Conditioning | None = None,
        batch_size: int | None = None,
        callback: Callback | None = None,
        next_cond: Conditioning | None = None,
        switch_at: float = 0.2,
        device: torch.device | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Generate latents; returns raw VAE latents (B, C, height/downscale, width/downscale), float32.

        A thin convenience over sampling.denoise: cfg guides against `negative`, or the learned
        null conditioning when none is given; cfg == 1 runs no unconditional pass. batch_size
        defaults to cond's batch. With `next_cond`, `cond` conditions the first `switch_at`
        fraction of the steps and `next_cond` the rest (Sec. 5.2). shift=None picks the
        checkpoint's shift for this size. callback(step, total, x, x0) runs after each step, in
        model space. noise: the starting noise on the patch-padded latent grid (default: drawn
        from `seed`). device: where to compute (default: where the parameters are).
        """
        device = device or self.device
        for name, c in (("conditioning", cond), ("negative", negative), ("second conditioning", next_cond)):
            if c is None and name != "conditioning":
                continue
            if not isinstance(c, Conditioning):
                raise ValueError(f"{name} must be a Conditioning (from LAP Encode / UniFusionModel.encode), "
                                 f"got {type(c).__name__}")
            if c.tokens.shape[-1] != self.config.dit.hidden_size:
                raise ValueError(f"{name} has {c.tokens.shape[-1]}-wide tokens but this model's DiT takes "
                                 f"{self.config.dit.hidden_size}: it was encoded by another UniFusion model; "
                                 "encode it with this one")
        steps = self.config.sampling.steps if steps is None else int(steps)
        cfg = require_finite_number("cfg", self.config.sampling.cfg if cfg is None else cfg)
        if shift is not None:
            shift = require_finite_number("shift", shift)
        switch_at = require_finite_number("switch_at", switch_at)
        batch_size = cond.batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens = max(c.tokens.shape[1] for c in (cond, negative, next_cond) if c is not None)
        ensure_memory(self.memory_required(batch_size, tokens, width, height, cfg != 1), device,
                      f"sampling {batch_size} image(s) of {width}x{height}",
                      "lower width/height or batch_size (or set cfg to 1, which halves it)")
        space, p = self.config.latent, self.config.dit.patch_size
        lh, lw = space.latent_size(height, width)
        if (lh * space.downscale, lw * space.downscale) != (height, width):
            log.warning(
                "%dx%d is not a multiple of the %s latent space's %d-pixel grid; the image will be %dx%d",
                width, height, space.name, space.downscale, lw * space.downscale, lh * space.downscale,
            )
        # Sample on the grid rounded up to whole patches, then crop: any size works.
        H, W = math.ceil(lh / p) * p, math.ceil(lw / p) * p
        if shift is None:
            shift = resolution_shift((H // p) * (W // p), self.config.sampling)
        shape = (batch_size, space.channels, H, W)
        if noise is None:
            noise = make_noise(shape, seed, device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {shape} (batch, channels, latent grid padded to whole patches), got {tuple(noise.shape)}")
        uncond = negative if negative is not None else self.null_conditioning(device=device)

        def model_fn(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            return self.dit(x.to(self.dtype), t, c.tokens, c.mask)

        x = denoise(model_fn, cond, noise.to(device, torch.float32), steps, cfg, shift, sampler, uncond, callback,
                    next_cond, switch_at)
        require_finite("the sampled latents", x, "the checkpoint's weights or the conditioning produce NaN/inf "
                       "(try weight_dtype fp32 or bf16 instead of fp16, or check the VLM's features)")
        return space.to_raw(x[:, :, :lh, :lw]).float()
