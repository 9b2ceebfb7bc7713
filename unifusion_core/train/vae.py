"""The VAE for training: images -> model-space latents, and a latent cache keyed by sample id and pixels.

diffusers' `AutoencoderKL` is used as a frozen black box, loaded from local files only (never a
download). `LatentCache` stores latents in safetensors shards keyed by `Sample.id` and a hash of
the sample's pixels, and records what made them (VAE identity, resolution, latent space,
preprocessing); it refuses to mix. Each
latent's checksum is written with it and checked when it is first read: a damaged shard is set
aside and its samples encoded again by `to_latents` with a VAE, or refused by `LatentCache.get`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..latents import LatentSpace, get_latent_space
from .checksums import DAMAGED, META_KEY, checksum, first_read_ok, recorded, set_aside
from .data import Sample
from .sources import PREPROCESS

_log = logging.getLogger(__name__)

_INSTALL_HINT = ("pip install -c constraints.txt 'diffusers>=0.42' (or the project's 'train' extra: "
                 "pip install -c constraints.txt '.[train]')")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"loading a VAE for training needs diffusers: {_INSTALL_HINT}") from None
    return diffusers


def _encoder_fingerprint(model: torch.nn.Module) -> str:
    """A hash of what the latents depend on: the encoder (+ quant_conv) weights and the config.

    Why only the encoder: a decoder-only fine-tune (e.g. sd-vae-ft-mse) gives the same latents,
    so its caches stay valid.
    """
    h = hashlib.sha256()
    cfg = dict(model.config)
    h.update(json.dumps({k: cfg.get(k) for k in ("latent_channels", "block_out_channels", "in_channels")},
                        sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class VAE:
    """A frozen AutoencoderKL bound to the latent space the DiT works in."""

    def __init__(self, model: torch.nn.Module, space: LatentSpace | str, name: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.space = get_latent_space(space)
        self.name = name
        cfg = model.config
        self.channels = int(cfg.latent_channels)
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)
        if (self.channels, self.downscale) != (self.space.channels, self.space.downscale):
            raise ValueError(
                f"VAE {name!r} makes {self.channels}-channel latents at 1/{self.downscale} scale, but the "
                f"latent space {self.space.name!r} has channels={self.space.channels}, "
                f"downscale={self.space.downscale}; load the VAE this checkpoint was trained with "
                f"(or a checkpoint whose latent space matches this VAE)")
        scale, shift = cfg.get("scaling_factor"), cfg.get("shift_factor") or 0.0
        if scale is not None and (abs(scale - self.space.scale) > 1e-4 or abs(shift - self.space.shift) > 1e-4):
            _log.warning("VAE %r config has scaling_factor=%s shift_factor=%s; using the latent space %r "
                         "(scale=%s shift=%s), which the DiT works in", name, scale, shift, self.space.name,
                         self.space.scale, self.space.shift)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.identity = f"{type(model).__name__}/{_encoder_fingerprint(model)}/{str(self.dtype).removeprefix('torch.')}"

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True,
               generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Images (B, 3, H, W) in 0..1 -> model-space latents (B, C, H/d, W/d), float32.

        generator: of the posterior sample; a list (one a row, CPU generators) makes each row's
        sample independent of what else is in the batch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE.encode: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"VAE.encode: image size {W}x{H} is not a multiple of the VAE's downscale "
                             f"{self.downscale}; use a resolution that is")
        x = images.to(self.device, self.dtype) * 2 - 1  # (B, 3, H, W) in -1..1, what the VAE expects
        dist = self.model.encode(x).latent_dist
        # Sample, not the mean: what the Flux/SD3 trainers do (diffusers' train_dreambooth_*_flux/sd3
        # scripts, kohya's sd-scripts, the Flux AE's own `reg` in torchtitan): the decoder was
        # trained on samples, and the posterior std of these VAEs is small, so the extra noise is
        # a mild augmentation. A cached latent is one such sample, drawn once.
        if not sample:
            raw = dist.mean
        elif isinstance(generator, (list, tuple)):
            if len(generator) != x.shape[0]:
                raise ValueError(f"VAE.encode: {len(generator)} generators for {x.shape[0]} images; give one an image")
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generator])
            raw = dist.mean + dist.std * eps.to(dist.mean)
        else:
            raw = dist.sample(generator=generator)  # (B, C, h, w)
        return self.space.to_model(raw.float())


def load_vae(path: str | Path, space: LatentSpace | str, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", config: str | Path | None = None) -> VAE:
    """Load an AutoencoderKL from local files only: a diffusers folder, or one .safetensors file.

    path: a folder with config.json (or a pipeline folder with a vae/ subfolder), or a single
    .safetensors file; for the latter pass `config` = a diffusers VAE folder (its config.json)
    unless the config is already in the local Hugging Face cache.
    """
    AutoencoderKL = _diffusers().AutoencoderKL
    path = Path(path)
    if path.is_dir():
        sub = None if (path / "config.json").is_file() else "vae" if (path / "vae" / "config.json").is_file() else ""
        if sub == "":
            raise ValueError(f"load_vae: {str(path)!r} has no config.json (nor vae/config.json); "
                             f"expected a diffusers AutoencoderKL folder")
        model = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True, torch_dtype=dtype)
    elif path.is_file() and path.suffix == ".safetensors":
        kw = {"config": str(config)} if config is not None else {}
        try:
            model = AutoencoderKL.from_single_file(str(path), local_files_only=True, torch_dtype=dtype, **kw)
        except Exception as e:  # diffusers raises many kinds here (missing config, hub offline, keys)
            raise ValueError(
                f"load_vae: could not load {path} as a single file without downloading "
                f"({type(e).__name__}: {e}). Use the folder form: a diffusers VAE folder with config.json "
                f"and diffusion_pytorch_model.safetensors, passed as path (or as config=... beside this file)"
            ) from None
    else:
        raise ValueError(f"load_vae: {str(path)!r} is neither a diffusers VAE folder nor a .safetensors file")
    vae = VAE(model, space, name=path.name)
    vae.model.to(device)
    vae.device = torch.device(device)
    _log.info("VAE %s loaded (%s, identity %s)", path, dtype, vae.identity)
    return vae


# The entropy beside the run's seed of a cached latent's posterior draw (posterior_generators); the
# trainer's uncached draws come from (seed, step) streams (loop.row_generators)
CACHED_POSTERIOR = 0x1A7E27


def posterior_generators(seed: int, ids: list[str]) -> list[torch.Generator]:
    """One generator a sample for the posterior draw of a latent that goes to the cache: a function
    of (seed, sample id) only. Why not the trainer's (seed, step, row): a cached latent is drawn once
    and kept, so the step, row or process that first encodes it must not matter. A run killed after
    a state re-encodes what it had not written at another step; in a later epoch a sample can land
    on another rank, whose cache lacks it; both would otherwise train on another draw than the
    uninterrupted single-process run."""
    words = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:16], "little") for i in ids]
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, CACHED_POSTERIOR], spawn_key=(w,))
                                              .generate_state(1, np.uint64)[0])) for w in words]


def pixels_digest(target: Tensor) -> str:
    """A hash of the pixels a latent is encoded from (the sample's preprocessed target, its shape too).

    Why the pixels and not the file's bytes: they are what the VAE encodes, and what `to_latents`
    has at hand (a source decodes its files). Hashing 3 x 1024 x 1024 floats takes 7 ms on this
    project's CPU machine; decoding and resizing a 1024 x 768 JPEG, 38 ms."""
    t = target.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy())
    return h.hexdigest()[:16]


class LatentCache:
    """Model-space latents in safetensors shards under `root`, keyed by `Sample.id` and the hash of
    its pixels (never position): an image replaced under the same name is encoded again (`key`).

    `root/cache.json` (and every shard's metadata) records the VAE identity, resolution, latent
    space and preprocessing; opening with any of them different is refused. `put` buffers and
    writes a shard of `shard_size` latents atomically (temp file + rename), so a crash loses at
    most the unwritten buffer, never a shard. Call `flush()` (or use `with`) at the end. Each
    latent's sha256 is in its shard's metadata and checked on its first read; a damaged shard is
    renamed `damaged-<name>` and its latents forgotten (`read` gives None, `get` refuses).
    """

    # /1 keyed latents by sample id alone, so a replaced image kept its old latent: such a cache is
    # refused (a clear error) rather than read as misses, which would leave its entries on disk forever
    FORMAT = "unifusion-latent-cache/2"

    def __init__(self, root: str | Path, vae: str, space: LatentSpace | str, resolution: int,
                 shard_size: int = 256, buckets: tuple[int, ...] | None = None):
        if shard_size < 1:
            raise ValueError(f"LatentCache: shard_size must be >= 1, got {shard_size}")
        self.root, self.space, self.resolution = Path(root), get_latent_space(space), resolution
        self.shard_size, self.buckets = shard_size, tuple(buckets) if buckets else None
        self.meta = {"format": self.FORMAT, "vae": vae, "resolution": resolution,
                     "space": self.space.to_dict(), "preprocess": PREPROCESS}
        if self.buckets:  # aspect-ratio buckets: one latent a sample and image size, keyed "<id>@<H>x<W>"
            self.meta |= {"resolution": None, "buckets": list(self.buckets)}
        h, w = self.space.latent_size(resolution, resolution)
        self.shape = None if self.buckets else (self.space.channels, h, w)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "cache.json"
        if meta_path.is_file():
            self._check_meta(json.loads(meta_path.read_text()), str(meta_path))
        else:
            _atomic_write_text(meta_path, json.dumps(self.meta, indent=1, sort_keys=True))
        self._pending: dict[str, Tensor] = {}
        self._handles: dict[Path, object] = {}
        self._index: dict[str, Path] = {}
        self._sums: dict[str, str | None] = {}  # id -> the checksum written with it (None: an older shard)
        self._verified: set[str] = set()  # read and found as written (or written), in this process
        self.refresh()

    def _check_meta(self, old: dict, where: str) -> None:
        if old.get("format") != self.FORMAT:
            raise ValueError(f"latent cache {self.root} was written by an older version of the trainer ({where}: "
                             f"format {old.get('format')!r}, this version reads {self.FORMAT!r}; it keyed latents "
                             f"by sample id alone, so a replaced image kept its old latent). Delete {self.root} "
                             f"to re-encode, or point --latent-cache at another folder")
        diffs = [f"{k}: cache has {old.get(k)!r}, this run has {v!r}" for k, v in self.meta.items() if old.get(k) != v]
        if diffs:
            raise ValueError(f"latent cache {self.root} was made differently ({where}): " + "; ".join(diffs) +
                             f". Point the cache at another folder for this setup, or delete {self.root} "
                             f"to re-encode")

    def refresh(self) -> None:
        """Re-index the shards on disk (e.g. written by other ranks)."""
        from safetensors import SafetensorError, safe_open

        before, self._index, self._sums = self._index, {}, {}
        self._handles.clear()
        label = f"latent cache {self.root}"
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    meta, keys = f.metadata() or {}, list(f.keys())
            except (SafetensorError, OSError) as e:  # damaged since, or set aside by another process
                _log.warning("%s: skipping unreadable shard %s (%s); its latents will be encoded again",
                             label, shard.name, e)
                continue
            self._check_meta(json.loads(meta.get("unifusion_latent_cache", "{}")), shard.name)
            sums = recorded(meta, keys, shard, _log, label)
            for key in keys:
                if key not in self._index:  # the first shard to hold an id wins
                    self._index[key], self._sums[key] = shard, sums[key]
        self._verified = {k for k in self._verified if k in self._index and before.get(k) == self._index[k]}

    def key(self, id: str, target: Tensor | None) -> str | None:
        """The cache key of sample `id` whose target image is `target` (3, H, W): "<id>#<pixels>", with
        buckets "<id>#<pixels>@<H>x<W>" (pixels: `pixels_digest`); None without a target (nothing to
        check a cached latent against)."""
        if target is None:
            return None
        key = f"{id}#{pixels_digest(target)}"
        return f"{key}@{target.shape[-2]}x{target.shape[-1]}" if self.buckets else key

    def _shape_of(self, key: str) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        h, _, w = key.rpartition("@")[2].partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise ValueError(f"LatentCache.put({key!r}): a bucketed cache's keys end in '@<H>x<W>' (LatentCache.key)")
        return (self.space.channels, *self.space.latent_size(int(h), int(w)))

    def __contains__(self, id: str) -> bool:
        return id in self._pending or id in self._index

    def __len__(self) -> int:
        return len(self._index) + sum(1 for k in self._pending if k not in self._index)

    def get(self, id: str) -> Tensor:
        """The latent stored for sample `id`, (C, h, w); ValueError when its shard is damaged."""
        shard = self._index.get(id)
        z, problem = self._load(id)
        if z is not None:
            return z
        if shard is None:
            raise KeyError(f"latent cache {self.root} has no latent for sample {id!r}")
        raise ValueError(
            f"latent cache {self.root}: the latent of {id!r} in {shard} {problem} (the file was damaged since); "
            f"it is set aside as {DAMAGED}{shard.name}: to_latents with the VAE (the trainer's --vae) encodes "
            "its samples again"
        )

    def read(self, id: str) -> Tensor | None:
        """The latent stored for sample `id`, checked against its checksum on its first read; None when
        it is not cached, or its shard is damaged (then set aside, with a warning, and its latents forgotten)."""
        return self._load(id)[0]

    def _load(self, id: str) -> tuple[Tensor | None, str | None]:
        """(the latent or None, what is wrong with its shard or None)."""
        from safetensors import SafetensorError

        if id in self._pending:
            return self._pending[id], None
        shard = self._index.get(id)
        if shard is None:
            return None, None
        try:
            f = self._handles.get(shard)
            if f is None:
                from safetensors import safe_open

                f = self._handles[shard] = safe_open(str(shard), framework="pt")
            z = f.get_tensor(id)
        except (SafetensorError, OSError) as e:  # gone (set aside by another rank) or unreadable
            problem = f"cannot be read ({type(e).__name__}: {e})"
        else:
            if first_read_ok(id, [z], id, self._sums, self._verified):
                return z, None
            problem = "does not match the checksum written with it"
        self._set_aside(shard, id, problem)
        return None, problem

    def _set_aside(self, shard: Path, id: str, problem: str) -> None:
        self._handles.pop(shard, None)
        lost = set_aside(shard, self._index, self._verified, _log, f"latent cache {self.root}")
        _log.warning("latent cache %s: the latent of %r in %s %s (the file was damaged since); set aside as %s%s, "
                     "its %d latents are encoded again when next drawn; delete it once the cache is whole again",
                     self.root, id, shard, problem, DAMAGED, shard.name, len(lost))

    def put(self, id: str, latent: Tensor) -> None:
        """Store the latent of sample `id`, (C, h, w); written with the next shard."""
        if not isinstance(id, str) or not id or id == "__metadata__":
            raise ValueError(f"LatentCache.put: id must be a non-empty string other than '__metadata__', got {id!r}")
        shape = self._shape_of(id)
        if tuple(latent.shape) != shape:
            at = f"buckets {','.join(map(str, self.buckets))}" if self.buckets else f"{self.resolution} px"
            raise ValueError(f"LatentCache.put({id!r}): latent shape {tuple(latent.shape)} does not match the "
                             f"cache's {shape} ({self.space.name} at {at})")
        self._pending[id] = latent.detach().to("cpu", copy=True).contiguous()
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered latents as one shard (atomically)."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        tmp = self.root / f".tmp-{name}"
        sums = {key: checksum([z], key) for key, z in self._pending.items()}
        save_file(self._pending, str(tmp), metadata={"unifusion_latent_cache": json.dumps(self.meta, sort_keys=True),
                                                     META_KEY: json.dumps(sums)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        for key in self._pending:
            if key not in self._index:
                self._index[key], self._sums[key] = self.root / name, sums[key]
                self._verified.add(key)  # written from memory
        _log.debug("latent cache %s: wrote %s (%d latents)", self.root, name, len(self._pending))
        self._pending = {}

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_latents(samples: list[Sample], space: LatentSpace | str, vae: VAE | None = None,
               cache: LatentCache | None = None, generators: list[torch.Generator] | None = None) -> Tensor:
    """Model-space latents of samples, (B, C, h, w) float32: from `Sample.latent`, the cache, or encoded.

    pixel space: target * 2 - 1, no VAE. Otherwise the samples the cache lacks (by id and pixels:
    `LatentCache.key`) are encoded in one batch by `vae` and put in the cache; generators (one a
    sample) draw their posterior samples (with a cache, the trainer gives `posterior_generators`).
    """
    space = get_latent_space(space)
    if vae is not None and vae.space != space:
        raise ValueError(f"to_latents: the VAE is bound to latent space {vae.space.name!r}, not {space.name!r}")
    if cache is not None and cache.space != space:
        raise ValueError(f"to_latents: the cache holds latent space {cache.space.name!r}, not {space.name!r}")
    out: list[Tensor | None] = [None] * len(samples)
    missing, keys = [], [None] * len(samples)
    for i, s in enumerate(samples):
        cached = None
        if cache is not None and s.latent is None:
            keys[i] = cache.key(s.id, s.target)
        if s.latent is None and keys[i] is not None and keys[i] in cache:
            # without a VAE a damaged latent is refused; with one, its shard is set aside and it is encoded again
            cached = cache.get(keys[i]) if vae is None else cache.read(keys[i])
        if s.latent is not None:
            out[i] = s.latent.float()
        elif cached is not None:
            out[i] = cached.float()
        elif s.target is None:
            raise ValueError(f"to_latents: sample {s.id!r} has neither a target image nor a latent")
        elif space.name == "pixel":
            out[i] = space.to_model(s.target.float() * 2 - 1)  # (3, H, W) in -1..1
        else:
            missing.append(i)
    if missing:
        if vae is None:
            raise ValueError(f"to_latents: latent space {space.name!r} needs a VAE for samples "
                             f"{[samples[i].id for i in missing[:3]]}...: pass vae=load_vae(...) or a cache "
                             f"that holds them")
        gens = None if generators is None else [generators[i] for i in missing]
        z = vae.encode(torch.stack([samples[i].target for i in missing]), generator=gens).cpu()  # (M, C, h, w)
        for j, i in enumerate(missing):
            out[i] = z[j]
            if keys[i] is not None:
                cache.put(keys[i], z[j])
    return torch.stack(out)  # (B, C, h, w)


def to_latent(sample: Sample, space: LatentSpace | str, vae: VAE | None = None,
              cache: LatentCache | None = None) -> Tensor:
    """Model-space latent of one sample, (C, h, w); see `to_latents`."""
    return to_latents([sample], space, vae, cache)[0]
