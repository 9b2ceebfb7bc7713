"""Sample images during training, for any data: fixed prompts (and optional reference images) from
a file, sampled with the EMA weights at fixed seeds every N steps and at the end, saved as one
labelled grid per step (RUN/samples/step-0000100.png) and logged.

The prompts file: a .txt (one prompt a line; blank lines and lines starting with # skipped), a
.jsonl (one {"prompt", "seed"?, "images"?} a line) or a .toml (`[[sample]]` tables with the same
keys). A prompt's seed defaults to its position in the file (0, 1, ...); image paths are relative
to the file. A prompt with reference images is sampled as an edit (a VLM that reads images is
needed), images alone as a reconstruction (paper Sec. 2.2's tasks).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate import sample_features, to_rgb
from ..model import UniFusionModel
from ..pixels import signed_to_uint8
from .data import BadSample, Sample
from .tasks import TASKS

log = logging.getLogger(__name__)

KEYS = ("prompt", "seed", "images")
BATCH = 8  # prompts sampled together (each image depends on its prompt and seed only)


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt of the samples grid: its text, its seed and its reference images (paths)."""

    prompt: str
    seed: int
    images: tuple[Path, ...] = ()

    @property
    def task(self) -> str:
        return "t2i" if not self.images else "edit" if self.prompt else "reconstruction"

    @property
    def label(self) -> str:
        text = self.prompt or "(images only)"
        refs = f" +{len(self.images)} image{'s' if len(self.images) > 1 else ''}" if self.images else ""
        return f"{text}{refs} (seed {self.seed})"


def _entry(row: object, index: int, base: Path, where: str) -> SamplePrompt:
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a table/object with {list(KEYS)}, got {type(row).__name__}")
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a sample takes {list(KEYS)}")
    prompt, seed, images = row.get("prompt", ""), row.get("seed", index), row.get("images", [])
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string, got {prompt!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: images must be a list of image paths, got {images!r}")
    if not prompt.strip() and not images:
        raise ValueError(f"{where}: an empty prompt needs reference images")
    paths = tuple(base / p for p in images)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{where}: no such image {missing} (paths are relative to the prompts file)")
    return SamplePrompt(prompt.strip(), seed, paths)


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a .txt, .jsonl or .toml file, or ValueError naming the file, line and fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Notepad's UTF-8) is no part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--sample-prompts {path}: cannot read it ({e})") from None
    base, suffix = path.parent, path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"--sample-prompts {path}, line {n}"))
                except ValueError as e:
                    raise ValueError(f"--sample-prompts {path}, line {n}: not JSON ({e})") from None
    elif suffix == ".toml":
        from .config_file import _tomllib

        try:
            doc = _tomllib().loads(text)
        except Exception as e:  # tomllib.TOMLDecodeError
            raise ValueError(f"--sample-prompts {path}: not valid TOML ({e})") from None
        if set(doc) - {"sample"} or not isinstance(doc.get("sample", []), list):
            raise ValueError(f"--sample-prompts {path}: expected [[sample]] tables only (prompt, seed, images), "
                             f"got {sorted(doc)}")
        rows = [(r, f"--sample-prompts {path}, [[sample]] {i + 1}") for i, r in enumerate(doc.get("sample", []))]
    else:  # a text file, one prompt a line
        rows = [(line.strip(), f"--sample-prompts {path}, line {n}") for n, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#")]
    prompts = [_entry(row, i, base, where) for i, (row, where) in enumerate(rows)]
    if not prompts:
        raise ValueError(f"--sample-prompts {path}: no prompts in it (one a line, or .jsonl / .toml entries)")
    return prompts


def vae_decoder(vae) -> Callable[[torch.Tensor], list[np.ndarray]]:
    """Model-space latents -> uint8 RGB images through a train/vae.py VAE's decoder."""

    @torch.no_grad()
    def decode(z: torch.Tensor) -> list[np.ndarray]:
        raw = vae.space.to_raw(z.float()).to(vae.device, vae.dtype)  # (B, C, h, w)
        return [np.ascontiguousarray(im) for im in signed_to_uint8(vae.model.decode(raw).sample.float()).cpu().numpy()]

    return decode


class Samples:
    """The in-training sampler: `every` steps (0: at the end only) the Trainer calls it with the EMA
    model; it writes RUN/samples/step-NNNNNNN.png and returns the metrics record's `samples` entry.

    features: the run's feature function (train/setup.PromptFeatures: prompts are encoded once and
    kept). decode: latents -> images (default: the pixel space's own; vae_decoder for a VAE)."""

    def __init__(self, prompts: list[SamplePrompt], features: Callable, every: int = 0,
                 decode: Callable[[torch.Tensor], list[np.ndarray]] | None = None):
        if every < 0:
            raise ValueError(f"--sample-every must be >= 0 steps (0: at the end only), got {every}")
        self.prompts, self.features, self.every, self.decode = prompts, features, every, decode or to_rgb
        self._features: list | None = None
        from .sources import open_image

        try:
            self.references = [[open_image(p, str(p)) for p in sp.images] for sp in prompts]
        except BadSample as e:
            raise ValueError(f"--sample-prompts: {e}") from None

    def conditioning(self) -> list:
        """Every prompt's encoder features (a prompt without them fails here, not hours into a run),
        encoded once and kept: prompts with reference images are not kept by the trainer's feature
        function (a training sample with images is its own conditioning), and these recur every grid."""
        if self._features is not None:
            return self._features
        samples = []
        for i, (sp, refs) in enumerate(zip(self.prompts, self.references)):
            task = TASKS[sp.task]
            id = f"sample-prompt-{i}"
            samples.append(Sample(id=id, task=sp.task, prompt=sp.prompt, images=list(refs),
                                  cond_id=task.cond_id(id, sp.prompt)))
        self._features = self.features(samples)
        return self._features

    @torch.no_grad()
    def images(self, model: UniFusionModel) -> list[np.ndarray]:
        """One image per prompt, from its seed alone (the same for any batch, rank or step)."""
        feats = self.conditioning()
        seeds = [sp.seed for sp in self.prompts]
        out: list[np.ndarray] = []
        for i in range(0, len(feats), BATCH):  # steps and cfg: the checkpoint's (--sample-steps, --sample-cfg)
            out += self.decode(sample_features(model, feats[i:i + BATCH], seeds[i:i + BATCH]))
        return out

    def __call__(self, model: UniFusionModel, step: int, out: Path) -> dict:
        from ..eval import write_grid

        t0 = time.perf_counter()
        images = self.images(model)
        side = min(images[0].shape[:2])
        # why cell = the image size (64..512): the grid shows what was sampled, unscaled where it can
        path = write_grid(Path(out) / "samples" / f"step-{step:07d}.png", images,
                          labels=[sp.label for sp in self.prompts], cols=min(4, len(images)),
                          cell=int(min(512, max(128, side))))
        seconds = round(time.perf_counter() - t0, 2)
        log.info("samples at step %d: %s (%d prompts, %.1f s)", step, path, len(images), seconds)
        return {"grid": str(path.relative_to(out)), "prompts": len(images), "seconds": seconds}


def make_samples(args, features: Callable, config, vae=None) -> Samples | None:
    """--sample-prompts FILE [--sample-every N] -> the run's sampler (None without a file). vae: the
    run's VAE (train/vae.py) for a latent space, loaded here only when not given."""
    every = getattr(args, "sample_every", 0) or 0
    if not getattr(args, "sample_prompts", None):
        if every:
            raise ValueError(f"--sample-every {every} needs --sample-prompts FILE (one prompt a line)")
        return None
    decode = None
    if config.latent.name != "pixel":
        from .vae import load_vae

        if vae is None and not args.vae:
            raise ValueError(f"--sample-prompts with --latent {config.latent.name} needs --vae to decode the samples")
        decode = vae_decoder(vae or load_vae(args.vae, config.latent))
    samples = Samples(read_sample_prompts(args.sample_prompts), features, every, decode)
    samples.conditioning()  # every prompt encodable now: a clear error before training starts
    return samples
