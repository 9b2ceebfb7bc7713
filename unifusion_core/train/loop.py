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

Turning a periodic step off (checkpoint_every, validate_every or log_every 0) leaves it at the
end only; the run's result (the final state and model.safetensors) is always written.

Nothing non-finite is kept: a step whose loss or gradient norm is NaN or inf changes nothing
(`nonfinite`: skipped, or the run stops), and neither a state nor the export holding NaN or inf
is ever written (`NonFiniteError`; the states already saved stay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import load_model, save_model
from ..conditioning import Conditioning
from ..config import UniFusionConfig
from ..features import Features
from ..flow import flow_loss, interpolate, resolution_shift, time_shift
from ..lora import LoRAConfig, add_lora, is_lora_key, merge_lora, rank_dropout, save_lora, strip_lora
from ..model import UniFusionModel
from .board import Board, Metrics
from .buckets import bucket_record
from .data import BadSample, Sample
from .dist import Dist, full, local, shard
from .samples import Samples
from .state import (
    NonFiniteError,
    list_states,
    load_state,
    nonfinite,
    prune_states,
    read_meta,
    save_state,
    state_path,
)
from .throughput import parameter_counts, peak_flops, peak_memory_gib, progress, train_flops
from .vae import to_latents

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a run needs besides its data and encoder; saved with every state file."""

    out: str
    steps: int = 1000
    prompts_per_step: int = 16  # per micro-batch: a step trains grad_accumulation x prompts_per_step prompts
    timesteps_per_prompt: int = 4
    # micro-batches accumulated into one optimizer step (a global batch larger than memory allows)
    grad_accumulation: int = 1
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
    # with gradient_checkpointing: one block in N recomputes its forward in the backward (1: every
    # block, least memory; 2: half the recomputation; torchtitan's selective per-layer AC)
    gradient_checkpointing_every: int = 1
    # torch.compile every LAP, refiner and DiT block (torchtitan compiles per block): the
    # elementwise work fused; on GPUs (README's figures). The first steps compile (about a minute).
    compile: bool = False
    precision: str = "fp32"  # or "bf16" (autocast in one process; FSDP2's bf16 parameters under torchrun; on GPUs)
    hsdp_replicas: int = 1  # under torchrun: R groups, each sharding the model over world / R processes
    device: str = "cpu"
    checkpoint_every: int = 200  # 0: only at the end (or at the time limit)
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: only at the end
    log_every: int = 10  # 0: only at the end
    max_bad_fraction: float = 0.5  # stop when more than this fraction of drawn samples is bad
    # minutes this invocation may train (0: no limit); at the limit it saves the state and exports,
    # and --resume continues the same run (the schedule still ends at `steps`)
    time_limit: float = 0.0
    # A step whose loss or gradient norm is NaN or inf: "skip" discards its update (no optimizer
    # step, no EMA update; counted, logged, and the run goes on), "stop" stops the run at once.
    # More than max_nonfinite skipped steps in the whole run stop it too. Why skip with a limit by
    # default: an isolated overflow (one bad batch, a bf16 spike) should not end a long run
    # (Megatron's and DeepSpeed's loss scalers skip such steps too), while a divergence fails
    # every step from then on and is stopped after a few wasted steps, before any bad state.
    nonfinite: str = "skip"
    max_nonfinite: int = 10
    # LoRA (lora.py): 0 trains every weight; R > 0 trains rank-R adapters on lora_targets (a comma
    # list of lora.TARGETS) of the frozen base (--init-from), exported as lora.safetensors
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank (the adapters' scale alpha / rank is 1)
    lora_targets: str = "dit"
    # rank dropout of the adapters (lora.rank_dropout: each sample drops each rank component with this
    # probability; kohya's rank_dropout); 0: none, as PEFT's and kohya's defaults
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full training), got {self.lora_rank}")
        if self.lora_rank:
            LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_targets)  # a clear error now
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_dropout and not self.lora_rank:
            raise ValueError("lora_dropout drops LoRA adapters' rank components: give lora_rank too (or leave it out)")
        if self.lora_rank and self.adapter_lr == 0 and {"lap", "refiner"} & set(LoRAConfig(
                self.lora_rank, self.lora_alpha, self.lora_targets).targets):
            # adapter_lr 0 freezes LAP and the refiner, their LoRA adapters too: they would never train
            raise ValueError(f"lora_targets {self.lora_targets!r} adapt LAP or the refiner, which adapter_lr 0 "
                             "freezes: give adapter_lr > 0, or leave lap and refiner out of lora_targets")
        if self.adapter_lr_scaling not in ("fan_in", "none"):
            raise ValueError(f"adapter_lr_scaling must be 'fan_in' or 'none', got {self.adapter_lr_scaling!r}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be 'skip' or 'stop', got {self.nonfinite!r}")
        if self.max_nonfinite < 0:
            raise ValueError(f"max_nonfinite must be >= 0 skipped steps, got {self.max_nonfinite}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "prompts_per_step", "timesteps_per_prompt", "grad_accumulation",
                     "gradient_checkpointing_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "validate_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 steps (0: only at the end), got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 (the newest state is what --resume continues), "
                             f"got {self.keep_checkpoints}")
        if not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ValueError(f"time_limit must be >= 0 minutes (0 = none), got {self.time_limit}")
        if not 0 <= self.max_bad_fraction < 1:
            # 1 or more would never stop a run whose every sample is bad: it would refill its batch forever
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        if not 0 <= self.cond_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"cond_dropout and ema_decay must be in [0, 1), got {self.cond_dropout}, {self.ema_decay}")


FeatureFn = Callable[[list[Sample]], list[Features]]
# latents(samples, generators): model-space latents of this rank's samples; the generators (one a
# sample) draw a VAE's posterior sample, so that it too is independent of the number of processes
# (a latent cache's latents ignore them: each is drawn once, by sample id, vae.posterior_generators).
LatentFn = Callable[[list[Sample], list[torch.Generator]], Tensor]
ValidateFn = Callable[[UniFusionModel, int, Path], dict]


# Signals that stop a run with its state saved at the end of the step they arrive in: SIGTERM (a
# scheduler's preemption, `kill`, torchrun passing its own on) and SIGUSR1 (Slurm's
# `--signal=USR1@SECONDS`, sent that long before a job's time limit). Ctrl-C (SIGINT) stays
# Python's KeyboardInterrupt: an interactive stop, at once.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class SignalStop(RuntimeError):
    """The run stopped on STOP_SIGNALS after saving its state (--resume continues)."""


@contextlib.contextmanager
def stop_signals(trainer: Trainer):
    """Within: STOP_SIGNALS set trainer.stop_signal (the run stops at the end of the step); the
    previous handlers come back after. Signals reach only the main thread: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        trainer.stop_signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's timesteps and dropout: a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]))


# What a row's generator draws: one independent stream per purpose (LORA_DROPOUT: the step's seed
# of the adapters' dropout masks, lora.rank_dropout).
NOISE, POSTERIOR, LORA_DROPOUT = 0, 1, 2


def row_generators(seed: int, step: int, rows: range, purpose: int = NOISE) -> list[torch.Generator]:
    """One generator per row of the step's global batch, each a function of (seed, step, row,
    purpose) only (numpy's spawn keys: independent streams). Why per row: a rank draws only the
    rows it trains (at 64 GPUs x 1024^2, the whole step's noise on every rank would be gigabytes
    of randn per step), and a row's noise is the same whatever the number of processes."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step], spawn_key=(purpose, j))
                                              .generate_state(1, np.uint64)[0])) for j in rows]


def row_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """(len(gens), *shape) standard normal noise, row j from gens[j]."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


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
    """LAP + refiner for every prompt; the learned null token (alone, at position 0) in place of
    the dropped ones. Why every prompt, dropped ones too: under FSDP every rank must run the same
    blocks (a rank whose prompts were all dropped would skip LAP's and the refiner's all-gathers
    and hang the others); the dropped rows' outputs are simply not used."""
    B = len(features)
    enc = model.encode(features, device=device)
    T, D = enc.tokens.shape[1], enc.tokens.shape[2]
    first = (torch.arange(T, device=device) == 0)[None, :]
    null = model.dit.null_cond.to(device=device, dtype=enc.tokens.dtype)[None].expand(B, T, D) * first[..., None]
    dropped = drop.to(device)
    tokens = torch.where(dropped[:, None, None], null, enc.tokens)
    mask = torch.where(dropped[:, None], first.expand(B, T), enc.mask)
    return Conditioning(tokens, mask)


class TrainStep(nn.Module):
    """One step's forward, conditioning included, as one module call: under torchrun this is
    FSDP2's root, so the parameters outside the blocks (LAP's and the refiner's norms and
    projections, the DiT's embedders and null token) are gathered for the whole computation."""

    def __init__(self, model: UniFusionModel):
        super().__init__()
        self.model = model

    def forward(self, x_t: Tensor, t: Tensor, features: list[Features], drop: Tensor, k: int) -> tuple[Tensor, int]:
        cond = conditioning(self.model, features, drop, x_t.device)  # LAP + refiner once per prompt
        cond = Conditioning(cond.tokens.repeat_interleave(k, 0), cond.mask.repeat_interleave(k, 0))
        return self.model(x_t, t, cond), cond.tokens.shape[1]


class Trainer:
    """Holds the model, EMA, optimizer and data position; `run()` is the loop.

    on_step_end(trainer): called by `run()` after every step, once that step's metrics,
    validation and state are written (`trainer.step` steps done): e.g. to report progress, or to
    stop a run from outside (the tests SIGKILL the process there, then resume it).
    """

    # Optional, set after construction (the CLI does): a samples grid of fixed prompts every
    # samples.every steps and at the end (samples.py), TensorBoard beside metrics.jsonl (board.py).
    samples: Samples | None = None
    board: Board | None = None

    def __init__(self, cfg: TrainConfig, model: UniFusionModel, mixture, sources: dict, features: FeatureFn,
                 validate: ValidateFn | None = None, latents: LatentFn | None = None, describe: dict | None = None,
                 dist: Dist = Dist(), device: torch.device | None = None,
                 on_step_end: Callable[[Trainer], None] | None = None):
        self.cfg, self.model, self.mixture, self.sources = cfg, model, mixture, sources
        self.dist, self.on_step_end = dist, on_step_end
        dist.part(cfg.prompts_per_step)  # a clear error now if the batch does not split evenly
        self.features, self.validate = features, validate
        # pixel space by default; a VAE (and its latent cache) for flux / sd3 / sdxl: train/vae.py
        self.latents = latents or (lambda samples, generators: to_latents(samples, model.config.latent))
        self.describe = describe or {}
        self.out = Path(cfg.out)
        self.device = device or torch.device(cfg.device)
        # LoRA: adapters on the frozen base; only they train (and are in the optimizer)
        self.lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None
        if self.lora is not None:
            add_lora(model, self.lora, seed=cfg.seed)
        model.to(self.device).train()
        for part in (model.lap, model.refiner, model.dit):
            part.gradient_checkpointing = cfg.gradient_checkpointing_every if cfg.gradient_checkpointing else 0
        if cfg.compile:
            # Module.compile keeps the parameter names (checkpoints unchanged) and the module that
            # FSDP2 shards. LAP too, though its batch (every token of the step) changes shape each
            # step: after the first recompile dynamo compiles it for any size (measured: docs/benchmarks.md).
            for part in (model.lap, model.refiner, model.dit):
                for block in part.blocks:
                    block.compile()
        if cfg.adapter_lr == 0:  # a frozen adapter: no gradients computed for it at all
            for part in (model.lap, model.refiner):
                part.requires_grad_(False)
        self.counts = parameter_counts(model)
        self.flops_per_sample, self.image_tokens = 0.0, 0
        self.forward = TrainStep(model)
        if dist.sharded:
            shard(self.forward, dist, bf16=cfg.precision == "bf16")
        # Why fused on GPUs: one kernel for the whole update, no full-size temporaries (foreach's
        # sqrt of the second moments is another 4 bytes a parameter at the peak); torchtitan's default.
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, fused=fused,
                                           foreach=not fused)
        # sharded like the model. With LoRA the adapters' only: the frozen base is its own average
        # (an fp32 copy of it would cost 4 bytes a base parameter for nothing)
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                    if self.lora is None or is_lora_key(k)}
        self.step = 0
        self.bad = 0
        self.drawn = 0
        self.nonfinite = 0  # steps whose update was skipped (loss or gradient norm NaN or inf)

    # --- state -------------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "step": self.step,
            "bad": self.bad,
            "drawn": self.drawn,
            "nonfinite": self.nonfinite,
            "mixture": self.mixture.state_dict(),
            "train": dataclasses.asdict(self.cfg),
            "model": self.model.config.to_dict(),
            "describe": self.describe,
        }

    def save(self) -> Path:
        # the caches' buffered entries first: a run killed after this state and resumed reads them as
        # the uninterrupted run does, instead of encoding them again (in other batches, more work)
        self._write_caches()
        path = state_path(self.out, self.step)
        save_state(path, self.model, self.ema, self.optimizer, self.meta(), self.dist)  # refuses NaN / inf
        if self.dist.main:
            prune_states(self.out, self.cfg.keep_checkpoints, upto=self.step)
        log.info("saved training state at step %d: %s", self.step, path)
        return path

    def _write_caches(self) -> None:
        """Write what the feature and latent caches buffer (their `close` writes it; they stay open):
        each even if the other fails, and a failure never hides the error that ended the run nor stops
        one (what was not written is encoded again, the same, when next needed)."""
        for name, part in (("feature", self.features), ("latent", self.latents)):
            try:
                getattr(part, "close", lambda: None)()
            except Exception:
                log.exception("writing the %s cache's buffered entries failed (they are encoded again "
                              "when next needed)", name)

    def resume(self, path: Path | None = None, new_data: bool = False) -> bool:
        """Continue from `path` or the run's newest state; False when there is none.

        new_data: go on with a changed data mixture (other sources or ratios: e.g. edit data added
        for the last steps, Sec. 4.1) instead of refusing it; see TaskMixture.load_state_dict."""
        if path is None:  # rank 0 chooses, so that every rank loads the same state
            states = list_states(self.out) if self.dist.main else []
            path = self.dist.broadcast(str(states[-1][1]) if states else None)
            if path is None:
                return False
            path = Path(path)
        record = read_meta(path)
        meta = record["meta"]
        if UniFusionConfig.from_dict(meta["model"]) != self.model.config:
            raise ValueError(f"{path} was made with another model configuration; resume with the same settings")
        lora = {k: meta["train"].get(k, default) for k, default in (("lora_rank", 0), ("lora_alpha", 0.0),
                                                                     ("lora_targets", "dit"))}
        if lora != {k: getattr(self.cfg, k) for k in lora}:
            raise ValueError(f"{path} was saved with LoRA settings {lora}: resume with the same --lora-rank, "
                             "--lora-alpha and --lora-targets")
        load_state(path, self.model, self.ema, self.optimizer, self.dist)  # into this run's sharding, whatever wrote it
        self.step, self.bad, self.drawn = meta["step"], meta["bad"], meta["drawn"]
        self.nonfinite = meta.get("nonfinite", 0)
        self.describe["train_seconds"] = meta.get("describe", {}).get("train_seconds", 0.0)
        diffs = self.mixture.differences(meta["mixture"])
        if diffs and not new_data:
            raise ValueError(f"{path} was saved with another data mixture ({'; '.join(diffs)}): resume with the "
                             "--data, --mix and --seed it was saved with (the run's run.json holds them), or add "
                             "--new-data (from Python: resume(new_data=True)) to go on from this state with the new "
                             "mixture")
        self.mixture.load_state_dict(meta["mixture"], strict=False)  # warns of the differences
        newer = [p.name for s, p in list_states(self.out) if s > self.step] if self.dist.main else []
        if newer:
            log.warning("states after step %d (%s) are of the run before this resume: they are not pruned, and "
                        "--resume without a path would pick the newest of them", self.step, ", ".join(newer))
        log.info("resumed from %s at step %d (saved by %d process(es), continuing on %d)", path, self.step,
                 record.get("world_size", 1), self.dist.world)
        return True

    def ema_model(self) -> UniFusionModel | None:
        """A plain (unsharded) copy of the model carrying the EMA weights: what gets exported and
        validated. Under torchrun every process must call it (it gathers the shards, one tensor at
        a time); rank 0 keeps the copy, the others get None."""
        sd = {}
        # with LoRA the EMA holds the adapters; the base is the model's own (frozen) weights
        base = [] if self.lora is None else [(k, v) for k, v in self.model.state_dict().items() if not is_lora_key(k)]
        for k, v in [*base, *self.ema.items()]:
            whole = full(v)
            if self.dist.main:
                sd[k] = whole.detach().clone()
            del whole
        if not self.dist.main:
            return None
        m = UniFusionModel(self.model.config, device="meta")
        if self.lora is not None:
            add_lora(m, self.lora)
        m.load_state_dict(sd, assign=True)
        return m.eval()

    def export(self, path: Path) -> Path:
        """The pack's .safetensors (EMA), written by rank 0 from the gathered shards; never with
        NaN or inf (NonFiniteError on every rank, nothing written). With LoRA: lora.safetensors (the
        EMA adapters) beside it, and the base with them merged at `path`."""
        model = self.ema_model()
        bad = self.dist.broadcast(nonfinite(model.state_dict()) if self.dist.main else None)
        if bad:
            raise NonFiniteError(f"the EMA weights at step {self.step} hold NaN or inf in {len(bad)} tensors "
                                 f"({', '.join(bad[:5])}): {path} was not written")
        if self.dist.main:
            if self.lora is not None:  # the adapters alone (for the LoRA Loader node), then merged into the base
                lora = save_lora(model, path.with_name("lora.safetensors"), base=self.describe.get("init_from"),
                                 targets=self.lora.targets)
                log.info("exported the EMA LoRA to %s", lora)
                merge_lora(model, 1.0)
                strip_lora(model)
            save_model(model, path)
            log.info("exported EMA weights to %s", path)
        self.dist.barrier()
        return path

    # --- one step ----------------------------------------------------------------------------

    def draw(self, n: int) -> list[Sample]:
        """This rank's share of a global batch of n usable samples. Every rank draws the same n
        picks from the mixture and reads only its own; a bad sample is skipped, counted and logged
        with its file, and its slot refilled by the next draws (the same on every rank: the bad
        slots are summed over the ranks first)."""
        mine = self.dist.part(n)
        picks = self.mixture.draw(n)
        self.drawn += n
        out: list[Sample | None] = [None] * n
        while True:
            bad = torch.zeros(n)
            for i in range(mine.start, mine.stop):
                if out[i] is None:
                    task, index = picks[i]
                    try:
                        out[i] = self.sources[task].get(index)
                    except BadSample as e:
                        bad[i] = 1
                        log.warning("skipped a bad %s sample: %s", task, e)
            slots = self.dist.sum_(bad).nonzero().flatten().tolist()
            if not slots:
                return out[mine]
            self.bad += len(slots)
            if self.drawn >= 20 and self.bad > self.cfg.max_bad_fraction * self.drawn:
                # ValueError: bad data, exit status 1 with this message (every rank alike: the counts are global)
                raise ValueError(f"{self.bad} of {self.drawn} samples drawn were bad, more than --max-bad-fraction "
                                 f"{self.cfg.max_bad_fraction:g} (the warnings above name each file and why): fix or "
                                 "remove them") from None
            # refill: the same batch (a bucketed mixture keeps it in the batch's bucket)
            refill = getattr(self.mixture, "refill", self.mixture.draw)
            for i, pick in zip(slots, refill(len(slots))):
                picks[i] = pick
            self.drawn += len(slots)

    def train_step(self) -> dict:
        """One optimizer step over `grad_accumulation` micro-batches of `prompts_per_step` prompts.

        The step's global batch is all its micro-batches together: the dropout and the timesteps'
        normal draws of every row come from the step's generator at once, each row's noise from its
        global row index, and each micro-batch's loss is scaled by 1 / grad_accumulation, so the
        accumulated gradient is that of the whole batch's mean loss (N micro-batches of P prompts
        train what one batch of N*P prompts does, up to the order of floating-point sums; tested).
        """
        cfg, model = self.cfg, self.model
        g = step_generator(cfg.seed, self.step)
        P, K, N = cfg.prompts_per_step, cfg.timesteps_per_prompt, cfg.grad_accumulation
        # The whole step's dropout and timestep draws (a few numbers); each micro-batch takes its slice.
        drop_all = torch.rand(N * P, generator=g) < cfg.cond_dropout
        u_all = torch.randn(N * P * K, generator=g) * cfg.t_std + cfg.t_mean  # logit-normal (SD3) before the shift
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        total, ts, all_losses = 0.0, [], []
        work = [0, 0.0]  # the step's image tokens and model FLOPs (all ranks': each micro-batch's P * K rows)
        for m in range(N):
            with self._lora_dropout(m):  # open over the backward: checkpointed blocks recompute their masks
                loss, t, losses = self._micro_batch(m, drop_all, u_all)
                # Why backward per micro-batch (FSDP2 reduce-scatters each one): the gradients stay
                # sharded between micro-batches, which is the memory that accumulation is for.
                (loss / N).backward()
            total += loss.item() / N
            ts.append(t.cpu())
            all_losses.append(losses.detach().cpu())
            work[0] += P * K * self.image_tokens  # per micro-batch: its bucket's size, its conditioning's length
            work[1] += P * K * self.flops_per_sample
        gnorm = float(full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        # One all-reduce decides for every rank: the global loss (NaN or inf if any rank's is) and
        # the number of ranks that saw a non-finite gradient norm (under FSDP the norm is already
        # global; summed anyway, so that no rank can step while another skips and waits).
        stats = self.dist.sum_(torch.tensor([total, float(not math.isfinite(gnorm))], dtype=torch.float64))
        mean, finite = stats[0].item() / self.dist.world, math.isfinite(stats[0].item()) and stats[1].item() == 0
        if finite:
            self.optimizer.step()
            self._update_ema()
        else:  # the step changes nothing: no update, no EMA, no moments
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": mean, "grad_norm": gnorm, "finite": finite, "t": torch.cat(ts),
                "losses": torch.cat(all_losses), "samples": N * P * K, "image_tokens": work[0], "flops": work[1]}

    def _lora_dropout(self, m: int):
        """The adapters' dropout for micro-batch m (none without --lora-dropout): each sample's masks
        keyed by its index in the step's global batch, prompts for LAP and the refiner, (prompt,
        timestep) rows for the DiT, so that they do not depend on the number of processes."""
        cfg = self.cfg
        if not (self.lora is not None and cfg.lora_dropout):
            return contextlib.nullcontext()
        P, K = cfg.prompts_per_step, cfg.timesteps_per_prompt
        mine = self.dist.part(P)
        first, n = m * P + mine.start, mine.stop - mine.start
        prompts = torch.arange(first, first + n)
        rows = torch.arange(first * K, (first + n) * K)
        seed = np.random.SeedSequence([cfg.seed, self.step], spawn_key=(LORA_DROPOUT,)).generate_state(1, np.uint64)[0]
        return rank_dropout(self.model, cfg.lora_dropout, int(seed), {"dit": rows, "lap": prompts, "refiner": prompts})

    def _micro_batch(self, m: int, drop_all: Tensor, u_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forward of micro-batch m of the step: (this rank's mean loss, its timesteps, its per-row losses).
        Its prompts are the step's global prompts m*P .. (m+1)*P - 1, this rank its contiguous slice."""
        cfg, model, dev = self.cfg, self.model, self.device
        P, K = cfg.prompts_per_step, cfg.timesteps_per_prompt
        samples = self.draw(P)  # this rank's prompts
        mine = self.dist.part(P)
        first = m * P + mine.start  # global index of this rank's first prompt
        prompts = range(first, first + len(samples))
        rows = range(first * K, (first + len(samples)) * K)  # this rank's (prompt, timestep) rows
        posterior = row_generators(cfg.seed, self.step, prompts, POSTERIOR)
        x0 = self.latents(samples, posterior).to(dev)  # (P_rank, C, H, W) model-space latents
        feats = self.features(samples)
        drop = drop_all[prompts.start:prompts.stop]
        _, _, H, W = x0.shape
        p = model.config.dit.patch_size
        # the checkpoint's fixed shift, if it has one (else Flux's rule for this size)
        shift = resolution_shift((H // p) * (W // p), model.config.sampling)
        t = time_shift(torch.sigmoid(u_all[rows.start:rows.stop]), shift).to(dev)  # (P_rank*K,)
        noise = row_noise(row_generators(cfg.seed, self.step, rows), x0.shape[1:]).to(dev)
        x0 = x0.repeat_interleave(K, dim=0)  # (P_rank*K, C, H, W)
        # bf16: autocast (under FSDP too, whose MixedPrecisionPolicy keeps bf16 copies of the
        # parameters but leaves the inputs alone: t and the features stay fp32, as in sampling)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        with autocast:
            v, cond_tokens = self.forward(interpolate(x0, noise, t), t, feats, drop, K)
        self.image_tokens = x0.shape[-2] * x0.shape[-1] // p**2
        self.flops_per_sample = train_flops(self.counts, model.config, self.image_tokens, cond_tokens, K)
        losses = flow_loss(v, x0, noise).float()  # (P_rank*K,)
        # FSDP averages the ranks' gradients: the gradient of the global mean
        return losses.mean(), t, losses

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up of the decay
        sd = self.model.state_dict()
        keys = list(self.ema)
        torch._foreach_lerp_([local(self.ema[k]) for k in keys], [local(sd[k]).detach().float() for k in keys], 1 - d)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, main = self.cfg, self.dist.main
        self.out.mkdir(parents=True, exist_ok=True)
        # rank 0's; from the state's step on: what a killed run logged after its last state is dropped
        metrics = Metrics(self.out / "metrics.jsonl", self.board, self.step) if main else open(os.devnull, "w")
        bins = torch.zeros(4), torch.zeros(4)
        seen, t_start, t_log, losses = 0, time.perf_counter(), time.perf_counter(), []
        work = [0, 0.0]  # image tokens and FLOPs since the last log: with buckets each step has its own size
        train_seconds = self.describe.get("train_seconds", 0.0)
        bar = progress(cfg.steps, self.step, enabled=main)
        last_val: dict = {}
        self.stop_signal = None
        signals = contextlib.ExitStack()
        signals.enter_context(stop_signals(self))
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                seen += out["samples"]
                work[0] += out["image_tokens"]
                work[1] += out["flops"]
                if out["finite"]:
                    losses.append(out["loss"])
                    b = (out["t"] * 4).long().clamp(max=3)
                    bins[0].index_add_(0, b, out["losses"])
                    bins[1].index_add_(0, b, torch.ones_like(out["losses"]))
                else:
                    self._nonfinite_step(out, metrics)  # raises when the run must stop
                bar.update(1)
                if self._due(cfg.log_every):
                    self.dist.sum_(bins[0]), self.dist.sum_(bins[1])  # every rank's rows
                    now = time.perf_counter()
                    train_seconds += now - t_log
                    rate = seen / (now - t_log)
                    rec = {"step": self.step, "loss": float(np.mean(losses)) if losses else None,
                           "grad_norm": out["grad_norm"] if out["finite"] else None,
                           "lr": lr_at(cfg, self.step - 1), "samples_per_s": round(rate, 2),
                           "loss_by_t": [round(float(s / max(c, 1)), 5) for s, c in zip(*bins)],
                           "bad_samples": self.bad, "nonfinite_steps": self.nonfinite,
                           "train_seconds": round(train_seconds, 1)}
                    rec |= self._throughput(work[0] / (now - t_log), work[1] / (now - t_log))
                    rec |= bucket_record(self.mixture)  # {} without --buckets
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    shown = {"loss": "-" if rec["loss"] is None else f"{rec['loss']:.4f}", "sps": f"{rate:.1f}",
                             "tok/s": f"{rec['tokens_per_s']:.0f}",
                             "GiB": "/".join(f"{m:.1f}" for m in rec["memory_gib_per_rank"])}
                    if "mfu" in rec:
                        shown["mfu"] = f"{100 * rec['mfu']:.1f}%"
                    bar.set_postfix(shown)
                    seen, t_log, losses, work = 0, time.perf_counter(), [], [0, 0.0]
                    bins[0].zero_(), bins[1].zero_()
                    self.describe["train_seconds"] = train_seconds
                # validation before the last step; the last one's comes after the export
                validate = self.validate is not None and self._periodic(cfg.validate_every)
                sample = self.samples is not None and self._periodic(self.samples.every)
                if validate or sample:
                    t0 = time.perf_counter()
                    model = self.ema_model()  # gathered once for both
                    if validate:
                        last_val = self._validate(metrics, train_seconds, model)
                    if sample:
                        self._sample(metrics, model)
                    del model
                    t_log += time.perf_counter() - t0  # validation and sampling time is not training time
                # One tiny all-reduce decides for every rank: rank 0's clock (ranks that disagreed would
                # wait for each other's save) and a stop signal that reached any rank
                timed_out = cfg.time_limit > 0 and time.perf_counter() - t_start >= cfg.time_limit * 60
                flags = torch.tensor([float(timed_out and main), float(self.stop_signal is not None)])
                timed_out, signalled = (bool(f) for f in self.dist.sum_(flags).tolist())
                if self._due(cfg.checkpoint_every) or timed_out or signalled:
                    t0 = time.perf_counter()
                    self.describe["train_seconds"] = train_seconds + (t0 - t_log)  # with the steps since the last log
                    self.save()
                    t_log += time.perf_counter() - t0
                if self.on_step_end is not None:
                    self.on_step_end(self)
                if signalled and self.step < cfg.steps:
                    # no export, validation or samples: a preempted job has seconds; --resume continues
                    raise SignalStop(f"stopped by {self.stop_signal or 'a signal to another rank'} at step {self.step} "
                                     f"of {cfg.steps}: state saved in {state_path(self.out, self.step)}; --resume "
                                     "continues the run exactly")
                if timed_out and self.step < cfg.steps:
                    log.warning("time limit of %g minutes reached at step %d of %d: state saved; --resume continues",
                                cfg.time_limit, self.step, cfg.steps)
                    break
        finally:
            signals.close()
            bar.close()
            self._write_caches()  # the caches' last, partial shards
        # the export first: a validation that fails must not lose the run's result
        export = self.export(self.out / "model.safetensors")
        if self.validate is not None or self.samples is not None:
            model = self.ema_model()  # gathered once for both
            if self.validate is not None:
                last_val = self._validate(metrics, train_seconds, model)
            if self.samples is not None:
                self._sample(metrics, model)
        metrics.close()
        return {"step": self.step, "steps": cfg.steps, "bad_samples": self.bad, "nonfinite_steps": self.nonfinite,
                "export": str(export),
                "validation": last_val, "train_seconds": round(train_seconds, 1),
                "seconds": round(time.perf_counter() - t_start, 1)}

    def _nonfinite_step(self, out: dict, metrics) -> None:
        """Count a step whose update was skipped, log it, and stop the run (NonFiniteError, on
        every rank alike) under nonfinite='stop' or past max_nonfinite skipped steps."""
        cfg = self.cfg
        self.nonfinite += 1
        what = f"step {self.step}: the loss is {out['loss']:.6g} and the gradient norm {out['grad_norm']:.6g}"
        go_on = cfg.nonfinite == "skip" and self.nonfinite <= cfg.max_nonfinite
        metrics.write(json.dumps({"step": self.step, "nonfinite_steps": self.nonfinite,
                                  "nonfinite": "skipped" if go_on else "stopped"}) + "\n")
        metrics.flush()
        if go_on:
            log.warning("%s: update skipped (%d of at most %d skipped steps, --max-nonfinite)", what, self.nonfinite,
                        cfg.max_nonfinite)
            return
        why = ("--nonfinite stop" if cfg.nonfinite == "stop"
               else f"{self.nonfinite} skipped steps, more than --max-nonfinite {cfg.max_nonfinite}")
        states = list_states(self.out) if self.dist.main else []
        newest = f"the newest state is {states[-1][1]}" if states else "no state was saved yet"
        raise NonFiniteError(f"{what}: stopped ({why}). Its update was not applied and nothing was written after "
                             f"it: {newest}. Lower --lr (now {cfg.lr:g}) or check the data, and "
                             "--resume (a resumed run starts from the newest state)")

    def _due(self, every: int) -> bool:
        """Whether a periodic step runs now: every `every` steps and at the last (every = 0: the last only)."""
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.steps

    def _periodic(self, every: int) -> bool:
        """Whether a periodic validation or sampling runs after this step (the last step's come after the export)."""
        return self.step < self.cfg.steps and every > 0 and self.step % every == 0

    def _on_main(self, what: str, fn: Callable[[UniFusionModel, int, Path], dict],
                 model: UniFusionModel | None) -> dict:
        """fn(EMA model, step, run folder) on rank 0 while the others wait (`model`: ema_model()'s
        copy, None on the other ranks); a failure stops every rank alike, none is left waiting."""
        result, failed = {}, None
        if self.dist.main:
            try:
                result = fn(model, self.step, self.out)
            except Exception as e:
                failed = e
        if self.dist.sum_(torch.tensor([float(failed is not None)])).item():
            raise RuntimeError(f"{what} at step {self.step} failed on rank 0") from failed
        return result

    def _validate(self, metrics, train_seconds: float, model: UniFusionModel | None) -> dict:
        result = self._on_main("validation", self.validate, model)
        record = {"step": self.step, "train_seconds": round(train_seconds, 1), "validation": result}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        log.info("validation at step %d: %s", self.step, json.dumps(result))
        return result

    def _sample(self, metrics, model: UniFusionModel | None) -> None:
        """The samples grid of the EMA weights (samples.py): rank 0 samples."""
        result = self._on_main("sampling", self.samples, model)
        metrics.write(json.dumps({"step": self.step, "samples": result}) + "\n")
        metrics.flush()

    def _throughput(self, tokens_per_s: float, flops_per_s: float) -> dict:
        """Tokens/s (image tokens through the DiT), TFLOP/s and MFU where the device's peak is known,
        over the steps since the last log (each its own image size with buckets), and each rank's
        peak memory (GPU: allocated by torch; CPU: the process's resident set)."""
        out = {"tokens_per_s": round(tokens_per_s, 1), "world_size": self.dist.world}
        out["tflops_per_s"] = round(flops_per_s / 1e12, 4)
        peak = peak_flops(self.device, self.cfg.precision)
        if peak:
            out["mfu"] = round(flops_per_s / (peak * self.dist.world), 4)
        out["memory_gib_per_rank"] = [round(float(m), 2) for m in self.dist.gather(peak_memory_gib(self.device))]
        return out


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
