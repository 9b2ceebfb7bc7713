"""The UniFusion training loop: one flat, readable loop (nanoGPT's train.py is the model).

Each step draws `prompts_per_step` samples from the task mixture, encodes their VLM features
through LAP + refiner ONCE, and trains the DiT at `timesteps_per_prompt` noise levels of each
(LAP + refiner cost more than a small DiT; several noise levels per conditioning amortise them).
Objective (flow.py): x_t = (1-t) x0 + t noise, predict v = noise - x0, t logit-normal with the
checkpoint's timestep shift. Caption dropout replaces a prompt's conditioning with the learned
null token (what classifier-free guidance contrasts against). An fp32 EMA of the weights is
what gets exported.

Resume is exact: the noise, timesteps and dropout of step s come from a generator seeded by
(seed, s), the data order from the mixture's saved state, and the state file holds the model,
EMA and optimizer. A run killed at any point and resumed ends bit-identical (on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import load_model, save_model
from ..config import UniFusionConfig
from ..features import Features
from ..flow import flow_loss, interpolate, resolution_shift, sample_timesteps
from ..model import Conditioning, UniFusionModel
from .data import BadSample, Sample
from .vae import to_latents
from .state import list_states, load_state, prune_states, save_state, state_path

log = logging.getLogger(__name__)
# Test hook: the step at which the process kills itself (after backward, before the update).
_KILL_AT = int(os.environ["UNIFUSION_TRAIN_SIGKILL_AT"]) if os.environ.get("UNIFUSION_TRAIN_SIGKILL_AT") else None


@dataclass
class TrainConfig:
    """Everything a run needs besides its data and encoder; saved with every state file."""

    out: str
    steps: int = 1000
    prompts_per_step: int = 16
    timesteps_per_prompt: int = 4
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.0
    # "fan_in": LAP and refiner matrices learn at lr * min(1, DiT width / fan-in); "none": all at lr.
    adapter_lr_scaling: str = "fan_in"
    adapter_lr: float = 1.0  # a further multiplier of the lr of every LAP and refiner parameter
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: str = "fp32"  # or "bf16" (autocast; on GPUs)
    device: str = "cpu"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: only at the end
    log_every: int = 10
    max_bad_fraction: float = 0.5  # stop when more than this fraction of drawn samples is bad
    # minutes this invocation may train (0: no limit); at the limit it saves the state and exports,
    # and --resume continues the same run (the schedule still ends at `steps`)
    time_limit: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.adapter_lr_scaling not in ("fan_in", "none"):
            raise ValueError(f"adapter_lr_scaling must be 'fan_in' or 'none', got {self.adapter_lr_scaling!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "prompts_per_step", "timesteps_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ValueError(f"time_limit must be >= 0 minutes (0 = none), got {self.time_limit}")
        if not 0 <= self.cond_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"cond_dropout and ema_decay must be in [0, 1), got {self.cond_dropout}, {self.ema_decay}")


FeatureFn = Callable[[list[Sample]], list[Features]]
LatentFn = Callable[[list[Sample]], Tensor]
ValidateFn = Callable[[UniFusionModel, int, Path], dict]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's noise, timesteps and dropout: a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]))


def param_groups(model: UniFusionModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the adapter's wide matrices at a smaller lr.

    Why the fan-in scaling: an Adam step moves every weight by about lr, so a matrix's output
    moves by about lr * fan_in when its gradient is coherent (muP's reason to scale Adam's lr of
    hidden matrices by 1/fan-in). LAP's pooling FC reads L x D_vlm inputs (6336 for SmolLM2 with
    every third layer), 25x the DiT's width: at the DiT's lr it grew a prompt-independent output
    within 50 steps and the conditioning collapsed to a constant (measured: the LAP outputs of
    "a red circle" and "a blue circle" differed by 0.3 % after training). The DiT keeps lr.
    """
    width = model.config.dit.hidden_size
    linear = {id(m.weight) for part in (model.lap, model.refiner) for m in part.modules() if isinstance(m, nn.Linear)}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Why no weight decay on norms/embeddings/tables: the usual split (nanoGPT) decays matrices only.
        matrix = p.ndim >= 2 and p is not model.dit.null_cond
        scale = cfg.adapter_lr if name.startswith(("lap.", "refiner.")) else 1.0
        if cfg.adapter_lr_scaling == "fan_in" and id(p) in linear:
            scale *= min(1.0, width / p.shape[1])
        groups.setdefault((scale, cfg.weight_decay if matrix else 0.0), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def conditioning(model: UniFusionModel, features: list[Features], drop: Tensor, device) -> Conditioning:
    """LAP + refiner for the kept prompts; the learned null token for the dropped ones."""
    B = len(features)
    keep = (~drop).nonzero().flatten().tolist()
    null = model.dit.null_cond.to(device)  # (1, D)
    if not keep:
        return Conditioning(null[None].expand(B, -1, -1), torch.ones(B, 1, dtype=torch.bool, device=device))
    enc = model.encode([features[i] for i in keep], device=device)
    T, D = enc.tokens.shape[1], enc.tokens.shape[2]
    tokens = null[None].expand(B, T, D) * (torch.arange(T, device=device) == 0)[None, :, None]  # null at position 0
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, 0] = True
    idx = torch.tensor(keep, device=device)
    tokens = tokens.index_put((idx,), enc.tokens.to(tokens.dtype))  # bf16 under autocast
    mask[idx] = enc.mask
    return Conditioning(tokens, mask)


class Trainer:
    """Holds the model, EMA, optimizer and data position; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig, model: UniFusionModel, mixture, sources: dict, features: FeatureFn,
                 validate: ValidateFn | None = None, latents: LatentFn | None = None, describe: dict | None = None):
        self.cfg, self.model, self.mixture, self.sources = cfg, model, mixture, sources
        self.features, self.validate = features, validate
        # pixel space by default; a VAE (and its latent cache) for flux / sd3 / sdxl: train/vae.py
        self.latents = latents or (lambda samples: to_latents(samples, model.config.latent))
        self.describe = describe or {}
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device)
        model.to(self.device).train()
        for part in (model.lap, model.refiner, model.dit):
            part.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.adapter_lr == 0:  # a frozen adapter: no gradients computed for it at all
            for part in (model.lap, model.refiner):
                part.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, fused=False, foreach=True)
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.step = 0
        self.bad = 0
        self.drawn = 0

    # --- state -------------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "step": self.step,
            "bad": self.bad,
            "drawn": self.drawn,
            "mixture": self.mixture.state_dict(),
            "train": dataclasses.asdict(self.cfg),
            "model": self.model.config.to_dict(),
            "describe": self.describe,
        }

    def save(self) -> Path:
        path = state_path(self.out, self.step)
        save_state(path, self.model, self.ema, self.optimizer, self.meta())
        prune_states(self.out, self.cfg.keep_checkpoints)
        log.info("saved training state at step %d: %s", self.step, path)
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Continue from `path` or the run's newest state; False when there is none."""
        if path is None:
            states = list_states(self.out)
            if not states:
                return False
            path = states[-1][1]
        meta = load_state(path, self.model, self.ema, self.optimizer)
        if UniFusionConfig.from_dict(meta["model"]) != self.model.config:
            raise ValueError(f"{path} was made with another model configuration; resume with the same settings")
        self.step, self.bad, self.drawn = meta["step"], meta["bad"], meta["drawn"]
        self.describe["train_seconds"] = meta.get("describe", {}).get("train_seconds", 0.0)
        self.mixture.load_state_dict(meta["mixture"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def ema_model(self) -> UniFusionModel:
        """A copy of the model carrying the EMA weights (what gets exported and validated)."""
        m = UniFusionModel(self.model.config, device="meta")
        m.load_state_dict({k: v.clone() for k, v in self.ema.items()}, assign=True)
        return m.eval()

    def export(self, path: Path) -> Path:
        save_model(self.ema_model(), path)
        log.info("exported EMA weights to %s", path)
        return path

    # --- one step ----------------------------------------------------------------------------

    def draw(self, n: int) -> list[Sample]:
        """n usable samples; bad ones are skipped, counted and logged with their file."""
        out: list[Sample] = []
        while len(out) < n:
            for task, index in self.mixture.draw(n - len(out)):
                self.drawn += 1
                try:
                    out.append(self.sources[task].get(index))
                except BadSample as e:
                    self.bad += 1
                    log.warning("skipped a bad %s sample (%d so far): %s", task, self.bad, e)
                    if self.drawn >= 20 and self.bad > self.cfg.max_bad_fraction * self.drawn:
                        raise RuntimeError(
                            f"{self.bad} of {self.drawn} samples were bad (see the warnings): fix the data"
                        ) from None
        return out

    def train_step(self) -> dict:
        cfg, model, dev = self.cfg, self.model, self.device
        g = step_generator(cfg.seed, self.step)
        samples = self.draw(cfg.prompts_per_step)
        P, K = len(samples), cfg.timesteps_per_prompt
        x0 = self.latents(samples).to(dev)  # (P, C, H, W) model-space latents
        feats = self.features(samples)
        drop = torch.rand(P, generator=g) < cfg.cond_dropout
        _, _, H, W = x0.shape
        p = model.config.dit.patch_size
        shift = resolution_shift((H // p) * (W // p), model.config.sampling)  # the checkpoint's fixed shift, if it has one
        t = sample_timesteps(P * K, shift, g, cfg.t_mean, cfg.t_std).to(dev)  # (P*K,)
        noise = torch.randn((P * K, *x0.shape[1:]), generator=g).to(dev)
        x0 = x0.repeat_interleave(K, dim=0)  # (P*K, C, H, W)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group["lr_scale"]
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        with autocast:
            cond = conditioning(model, feats, drop, dev)  # LAP + refiner once per prompt
            cond = Conditioning(cond.tokens.repeat_interleave(K, 0), cond.mask.repeat_interleave(K, 0))
            v = model(interpolate(x0, noise, t), t, cond)
        losses = flow_loss(v, x0, noise)  # (P*K,)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if _KILL_AT is not None and self.step == _KILL_AT:  # tests: die mid-step, as a SIGKILL would
            os.kill(os.getpid(), signal.SIGKILL)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        return {"loss": loss.item(), "grad_norm": float(gnorm), "t": t.cpu(), "losses": losses.detach().cpu(), "samples": P * K}

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up of the decay
        sd = self.model.state_dict()
        keys = list(self.ema)
        torch._foreach_lerp_([self.ema[k] for k in keys], [sd[k].detach().float() for k in keys], 1 - d)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = (self.out / "metrics.jsonl").open("a")
        bins = torch.zeros(4), torch.zeros(4)
        seen, t_start, t_log, losses = 0, time.perf_counter(), time.perf_counter(), []
        train_seconds = self.describe.get("train_seconds", 0.0)
        bar = _progress(cfg.steps, self.step)
        last_val: dict = {}
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                seen += out["samples"]
                losses.append(out["loss"])
                b = (out["t"] * 4).long().clamp(max=3)
                bins[0].index_add_(0, b, out["losses"])
                bins[1].index_add_(0, b, torch.ones_like(out["losses"]))
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    train_seconds += now - t_log
                    rate = seen / (now - t_log)
                    rec = {"step": self.step, "loss": float(np.mean(losses)), "grad_norm": out["grad_norm"],
                           "lr": lr_at(cfg, self.step - 1), "samples_per_s": round(rate, 2),
                           "loss_by_t": [round(float(s / max(c, 1)), 5) for s, c in zip(*bins)],
                           "bad_samples": self.bad, "train_seconds": round(train_seconds, 1)}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rate:.1f}")
                    seen, t_log, losses = 0, time.perf_counter(), []
                    bins[0].zero_(), bins[1].zero_()
                    self.describe["train_seconds"] = train_seconds
                if self.validate is not None and cfg.validate_every and self.step % cfg.validate_every == 0 and self.step < cfg.steps:
                    t0 = time.perf_counter()
                    last_val = self._validate(metrics, train_seconds)
                    t_log += time.perf_counter() - t0  # validation time is not training time
                timed_out = cfg.time_limit > 0 and time.perf_counter() - t_start >= cfg.time_limit * 60
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or timed_out:
                    t0 = time.perf_counter()
                    self.save()
                    t_log += time.perf_counter() - t0
                if timed_out and self.step < cfg.steps:
                    log.warning("time limit of %g minutes reached at step %d of %d: state saved; --resume continues",
                                cfg.time_limit, self.step, cfg.steps)
                    break
        finally:
            bar.close()
            getattr(self.features, "close", lambda: None)()
        if self.validate is not None:
            last_val = self._validate(metrics, train_seconds)
        metrics.close()
        export = self.export(self.out / "model.safetensors")
        return {"step": self.step, "steps": cfg.steps, "bad_samples": self.bad, "export": str(export), "validation": last_val,
                "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t_start, 1)}

    def _validate(self, metrics, train_seconds: float) -> dict:
        result = self.validate(self.ema_model(), self.step, self.out)
        metrics.write(json.dumps({"step": self.step, "train_seconds": round(train_seconds, 1), "validation": result}) + "\n")
        metrics.flush()
        log.info("validation at step %d: %s", self.step, json.dumps(result))
        return result


def _progress(total: int, initial: int):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
    except ImportError:  # tqdm comes with transformers; without it, log lines are the progress
        class _Null:
            def update(self, n): ...
            def set_postfix(self, **kw): log.info("%s", kw)
            def close(self): ...

        return _Null()


def build_model(config: UniFusionConfig, init_from: str | None = None, reinit: tuple[str, ...] = ()) -> UniFusionModel:
    """A fresh model, or a handoff (Sec. 3.4): parts of an existing checkpoint's weights, the
    others freshly initialised. A checkpoint trained with another encoder keeps its DiT; LAP and
    the refiner (whose input is the encoder's width and layers) start fresh."""
    model = UniFusionModel(config)
    if init_from is None:
        return model
    src = load_model(init_from)
    parts = {"lap", "refiner", "dit"} - set(reinit)
    if not src.config.encoder.same_encoder(config.encoder):
        parts -= {"lap", "refiner"}
    if src.config.dit != config.dit or src.config.latent != config.latent:
        if "dit" in parts:
            raise ValueError(
                f"{init_from}: its DiT ({src.config.dit}, latent {src.config.latent.name}) differs from this run's "
                f"({config.dit}, latent {config.latent.name}); use the same DiT settings to hand off"
            )
    for name in sorted(parts):
        getattr(model, name).load_state_dict(getattr(src, name).state_dict())
    log.info("handoff from %s: kept %s, fresh %s", init_from, sorted(parts), sorted({"lap", "refiner", "dit"} - parts))
    return model
