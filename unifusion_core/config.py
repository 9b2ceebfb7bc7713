"""Typed parameters of a UniFusion model; the JSON form travels inside each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .latents import LatentSpace, get_latent_space


def every_nth_layer(num_layers: int, stride: int = 3) -> tuple[int, ...]:
    """Indices 0, stride, 2*stride, ... <= num_layers (0 = embedding output; Sec. 3.1)."""
    if num_layers < 1 or stride < 1:
        raise ValueError(f"need num_layers >= 1 and stride >= 1, got {num_layers} and {stride}")
    return tuple(range(0, num_layers + 1, stride))


def check_layers(layers: Sequence[int], num_layers: int, name: str) -> tuple[int, ...]:
    """The VLM layers LAP reads, as a tuple, or ValueError: at least one, increasing, unique, within
    0..num_layers (0 = embedding output, i = after block i). The one check of a layer selection."""
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise ValueError(f"encoder {name!r}: at least one layer must be selected")
    if list(layers) != sorted(set(layers)) or not (0 <= layers[0] and layers[-1] <= num_layers):
        raise ValueError(
            f"encoder {name!r}: layers must be increasing and unique, and must lie in 0..{num_layers} "
            f"(0 = embedding output, i = after block i), got {list(layers)}"
        )
    return layers


def select_layers(layers: Sequence[int] | int | None, num_layers: int, name: str) -> tuple[int, ...]:
    """A layer selection: None every third layer (Sec. 3.1); an int that stride; a list those
    indices (in any order, repeats dropped)."""
    if layers is None or isinstance(layers, int):
        return every_nth_layer(num_layers, 3 if layers is None else layers)
    return check_layers(sorted(set(int(i) for i in layers)), num_layers, name)


@dataclass(frozen=True)
class EncoderSpec:
    """The frozen VLM a checkpoint was trained against, and the layers LAP reads from it."""

    family: str
    name: str
    hidden_size: int
    num_layers: int
    layers: tuple[int, ...]
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(
                f"encoder {self.name!r}: hidden_size and num_layers must be >= 1, "
                f"got {self.hidden_size} and {self.num_layers}"
            )
        object.__setattr__(self, "layers", check_layers(self.layers, self.num_layers, self.name))

    def same_encoder(self, other: EncoderSpec) -> bool:
        """Whether features from `other` are what a model trained on `self` expects."""
        return (
            self.family == other.family
            and self.hidden_size == other.hidden_size
            and self.num_layers == other.num_layers
            and self.layers == other.layers
        )


def _check_blocks(part: str, heads: int, depth: int, mlp_ratio: float) -> None:
    if heads < 1 or depth < 0 or mlp_ratio <= 0:
        raise ValueError(
            f"{part}: need heads >= 1, depth >= 0 and mlp_ratio > 0, got heads={heads}, "
            f"depth={depth}, mlp_ratio={mlp_ratio}"
        )


@dataclass(frozen=True)
class LAPParams:
    """Layerwise Attention Pooling (App. A.1): blocks across the layers of each token, then an FC."""

    heads: int = 32
    depth: int = 2
    mlp_ratio: float = 1.3

    def __post_init__(self) -> None:
        _check_blocks("lap", self.heads, self.depth, self.mlp_ratio)


@dataclass(frozen=True)
class RefinerParams:
    """Bidirectional refiner over the pooled token sequence (Sec. 3.2)."""

    heads: int = 32
    depth: int = 2
    mlp_ratio: float = 1.3
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        _check_blocks("refiner", self.heads, self.depth, self.mlp_ratio)


@dataclass(frozen=True)
class DiTParams:
    """Single-stream DiT over [conditioning ; noisy latent] tokens (Sec. 2.2)."""

    hidden_size: int
    depth: int
    heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10_000.0
    # Head-dim split of the rotary axes: (conditioning index, image row, image column).
    axes_dim: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        _check_blocks("dit", self.heads, self.depth, self.mlp_ratio)
        if self.hidden_size % self.heads:
            raise ValueError(
                f"DiT hidden_size {self.hidden_size} must be divisible by heads {self.heads}"
            )
        head_dim = self.hidden_size // self.heads
        if self.axes_dim is None:
            # A quarter of the head for the 1-D conditioning axis, the rest split between rows
            # and columns; every part even so that it rotates in pairs.
            a0 = 2 * max(1, head_dim // 8)
            rest = head_dim - a0
            a1 = 2 * (rest // 4)
            object.__setattr__(self, "axes_dim", (a0, a1, rest - a1))
        axes = tuple(int(a) for a in self.axes_dim)
        object.__setattr__(self, "axes_dim", axes)
        if len(axes) != 3 or sum(axes) != head_dim or any(a <= 0 or a % 2 for a in axes):
            raise ValueError(
                f"DiT axes_dim {list(axes)} must be three positive even numbers summing to the "
                f"head dim {head_dim}"
            )
        if self.patch_size < 1 or self.depth < 1:
            raise ValueError(
                f"DiT patch_size and depth must be >= 1, got {self.patch_size} and {self.depth}"
            )


@dataclass(frozen=True)
class SamplingParams:
    """Defaults the model was trained for: resolution-dependent timestep shift (SD3/Flux)."""

    base_shift: float = 0.5  # log-shift at base_tokens image tokens
    max_shift: float = 1.15  # log-shift at max_tokens image tokens
    base_tokens: int = 256
    max_tokens: int = 4096
    steps: int = 28
    cfg: float = 4.0
    # A fixed shift for this checkpoint (training and sampling use it at every size), or None
    # for the rule above, clamped to shift_range (see flow.resolution_shift).
    shift: float | None = None
    shift_range: tuple[float, float] = (0.5, 10.0)
    # The (width, height) the model was trained at, when it has one (the default for generate).
    size: tuple[int, int] | None = None
    # Whether the model was trained on VERIFI rewrites (features of the rewritten prompt) or on
    # the user's own prompt tokens; generate() encodes the same way by default.
    rewrite: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift_range", tuple(float(v) for v in self.shift_range))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        lo, hi = self.shift_range
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise ValueError(f"sampling: shift_range must be 0 < low <= high < inf, got {list(self.shift_range)}")
        if self.shift is not None and not (0 < self.shift < math.inf):
            raise ValueError(f"sampling: shift must be a finite number > 0 or None, got {self.shift}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"sampling: size must be (width, height) >= 1, got {self.size}")
        if not 0 < self.base_tokens < self.max_tokens:
            raise ValueError(
                f"sampling: need 0 < base_tokens < max_tokens, got {self.base_tokens} and {self.max_tokens}"
            )


@dataclass(frozen=True)
class UniFusionConfig:
    """Everything needed to rebuild a UniFusion model; serialised into checkpoint metadata."""

    encoder: EncoderSpec
    dit: DiTParams
    latent: LatentSpace
    lap: LAPParams = field(default_factory=LAPParams)
    refiner: RefinerParams = field(default_factory=RefinerParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        d = self.encoder.hidden_size
        if d % self.lap.heads:
            raise ValueError(
                f"lap.heads={self.lap.heads} must divide the encoder hidden size {d} "
                f"(encoder {self.encoder.name!r})"
            )
        if d % self.refiner.heads or (d // self.refiner.heads) % 2:
            raise ValueError(
                f"refiner.heads={self.refiner.heads} must divide the encoder hidden size {d} into an "
                f"even head dim for RoPE (encoder {self.encoder.name!r})"
            )

    @property
    def num_layers(self) -> int:
        """How many VLM layers LAP pools."""
        return len(self.encoder.layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UniFusionConfig:
        """Inverse of to_dict; unknown or missing keys raise ValueError naming them."""
        return _build(cls, d, "config")

    def replace(self, **overrides) -> UniFusionConfig:
        """Copy with parts replaced: `dit={"depth": 4}`, `latent="pixel"`, `encoder=spec`, ..."""
        kwargs = {}
        for name, value in overrides.items():
            if name not in _PARTS:
                raise ValueError(
                    f"unknown override {name!r}; expected one of {sorted(_PARTS)} "
                    f"(e.g. dit={{'depth': 4}} or latent='pixel')"
                )
            current = getattr(self, name)
            if name == "latent" and not isinstance(value, dict):
                kwargs[name] = get_latent_space(value)
            elif isinstance(value, dict):
                merged = {**dataclasses.asdict(current), **value}
                kwargs[name] = _build(type(current), merged, name)
            elif isinstance(value, type(current)):
                kwargs[name] = value
            else:
                raise ValueError(
                    f"override {name!r} must be a dict or a {type(current).__name__}, "
                    f"got {type(value).__name__}"
                )
        return dataclasses.replace(self, **kwargs)


_PARTS = {
    "encoder": EncoderSpec,
    "dit": DiTParams,
    "latent": LatentSpace,
    "lap": LAPParams,
    "refiner": RefinerParams,
    "sampling": SamplingParams,
}


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        sub = _PARTS.get(name) if cls is UniFusionConfig else None
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{where}: {e}") from None
