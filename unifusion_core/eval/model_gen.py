"""A benchmark `generate_fn` from a trained pixel-space UniFusion model, and per-prompt features."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .. import scenes as sc
from ..config import EncoderSpec
from ..features import Features, read_features_file, save_features_file
from ..generate import sample_features, to_rgb
from ..model import UniFusionModel
from .benchmark import GenerateFn

DEFAULT_SIZE = 64  # what the synthetic scenes are rendered at for training, when the checkpoint does not say


def image_size(model: UniFusionModel, size: int | None = None) -> tuple[int, int]:
    """(width, height): `size` square, else the checkpoint's training size, else DEFAULT_SIZE."""
    if size is not None:
        return int(size), int(size)
    trained = model.config.sampling.size
    return (trained[0], trained[1]) if trained else (DEFAULT_SIZE, DEFAULT_SIZE)


def check_pixel_space(model: UniFusionModel) -> None:
    """ValueError unless the model samples RGB directly (the `pixel` latent space)."""
    name = model.config.latent.name
    if name != "pixel":
        raise ValueError(
            f"the benchmark scores RGB images straight from the latents, so it needs a 'pixel' latent-space "
            f"checkpoint; this one is {name!r} (decode with its VAE and pass your own generate_fn)"
        )


def model_generate_fn(
    model: UniFusionModel,
    features: Mapping[str, Features],
    steps: int | None = None,
    cfg: float | None = None,
    batch_size: int = 32,
    layer_drop: Sequence[int] = (),
    size: int | None = None,
) -> GenerateFn:
    """generate_fn(scenes, seed) -> uint8 images, sampling `model` on features[scene.prompt].

    Prompts are sampled batch_size at a time; each image depends on its prompt and the seed only
    (its noise is drawn from the seed alone), not on the other prompts of its batch. layer_drop:
    VLM layers whose LAP contribution is zeroed (Fig. 12).
    """
    check_pixel_space(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    width, height = image_size(model, size)

    def generate(scenes: list[sc.Scene], seed: int) -> list[np.ndarray]:
        missing = [s.prompt for s in scenes if s.prompt not in features]
        if missing:
            raise ValueError(f"no features for {len(missing)} of {len(scenes)} prompts, e.g. {missing[:3]}; "
                             "encode them (or add them to the features file)")
        images = []
        for i in range(0, len(scenes), batch_size):
            part = scenes[i : i + batch_size]
            x = sample_features(model, [features[s.prompt] for s in part], [seed] * len(part), steps=steps, cfg=cfg,
                                width=width, height=height, layer_drop=layer_drop)  # (b, 3, H, W) in -1..1
            images += to_rgb(x)
        return images

    return generate


def load_features(path: str | os.PathLike, encoder: EncoderSpec) -> dict[str, Features]:
    """A features file -> {prompt: Features} for a model trained against `encoder`.

    Format: tensors "0", "1", ... each (T, L, D) (fp16), metadata "prompts" = JSON list of the
    prompts in the same order, optionally "encoder" (or "spec") = the JSON EncoderSpec of the
    stored layers: then the model's layers are picked from them (without it the file must hold
    exactly the model's layers) and a different encoder is refused.
    """
    table, spec = read_features_file(path)
    stored = encoder.layers
    if spec is not None:
        identity = lambda e: (e.family, e.hidden_size, e.num_layers)
        if identity(spec) != identity(encoder):
            raise ValueError(f"{path}: features of {spec.name!r} ({spec.family}, hidden {spec.hidden_size}, "
                             f"{spec.num_layers} layers), but the model was trained against {encoder.name!r} "
                             f"({encoder.family}, hidden {encoder.hidden_size}, {encoder.num_layers} layers)")
        stored = spec.layers
    missing = sorted(set(encoder.layers) - set(stored))
    if missing:
        raise ValueError(f"{path}: the model reads VLM layers {missing} that the file does not hold "
                         f"(it holds {list(stored)})")
    pick = [stored.index(i) for i in encoder.layers]
    out = {}
    for p, h in table.items():
        if h.ndim != 3 or h.shape[1:] != (len(stored), encoder.hidden_size):
            raise ValueError(f"{path}: features of {p!r} are {tuple(h.shape)}, expected (T, {len(stored)}, "
                             f"{encoder.hidden_size}) for layers {list(stored)} of {encoder.name!r}")
        out[p] = Features(h[:, pick].float(), layers=encoder.layers, encoder=encoder, text=p)  # (T, L, D)
    return out


save_features = save_features_file  # the eval CLI's name for it
