"""Validation loss: the flow loss of a fixed held-out set at fixed timesteps and fixed noise.

Comparable across runs, resumes and process counts: the samples are the held-out set's first n
(in its own order), each is scored at the same `timesteps` times (midpoints of `timesteps` equal
bins of [0, 1], no timestep shift: the same times whatever a run's shift), with noise drawn from a
generator seeded by (VAL_SALT, sample, timestep) only, not by the run's seed; the conditioning is
never dropped. What gets scored is the model it is given (the trainer passes its EMA copy, the
weights it exports). A run whose loss on its training data keeps falling while this one rises is
overfitting: that is what this number is for.

The held-out set: the synthetic scenes' held-out compositions (--data scenes), a separate dataset
(--val-data, any form --data takes), or a fraction of the training data set aside (--val-split).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..conditioning import Conditioning
from ..flow import flow_loss, interpolate
from .data import BadSample, Sample

VAL_SALT = 0x5EED_0F_7A11  # fixed: the noise of a validation sample never depends on the run's seed


def split_indices(ids: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a source whose samples have these ids (in its order):
    sample i is held out when a hash of (VAL_SALT, ids[i]) falls below `fraction`. The same split
    for every run and seed, and each sample's side depends on its own id alone: adding or removing
    samples moves no other sample in or out. Why not by position (a fixed draw per index, as
    before): one file added that sorts first shifted every later index, and most of the held-out
    images went to training."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must be a fraction in (0, 1), got {fraction}")
    if isinstance(ids, (str, int)):
        raise TypeError(f"split_indices: expected the samples' ids (a list of str), got {type(ids).__name__}")
    held = np.array([_unit_hash(id) < fraction for id in ids], dtype=bool)
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def _unit_hash(id: str) -> float:
    """A fixed number in [0, 1) for a sample id (sha256 of VAL_SALT and the id)."""
    digest = hashlib.sha256(f"{VAL_SALT}/{id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


NOISE, POSTERIOR = 0, 1


def _generator(*key: int) -> torch.Generator:
    """A generator of (VAL_SALT, purpose, sample[, time]) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([VAL_SALT, *key]).generate_state(1, np.uint64)[0]))


class ValidationLoss:
    """`__call__(model) -> {"val_loss": mean, "val_loss_by_t": [mean at each fixed time]}`.

    samples: the held-out samples (drawn once; a bad one is left out with its reason logged by the
    caller). features / latents: the trainer's own functions (the same VLM features and latent
    space as training). batch: samples a forward (x timesteps rows)."""

    def __init__(self, samples: list[Sample], features: Callable, latents: Callable, timesteps: int = 8,
                 batch: int = 8):
        if not samples:
            raise ValueError("validation loss: the held-out set has no usable samples")
        if timesteps < 1 or batch < 1:
            raise ValueError(f"validation loss: timesteps and batch must be >= 1, got {timesteps}, {batch}")
        self.samples, self.features, self.latents = samples, features, latents
        self.times = (torch.arange(timesteps, dtype=torch.float32) + 0.5) / timesteps
        self.batch = batch
        # The held-out latents are fixed (fixed samples, posterior draws keyed by sample): encoded
        # at the first validation and kept, not by the VAE at every one.
        self._x0: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def __call__(self, model) -> dict:
        device = next(model.parameters()).device
        T = len(self.times)
        total = torch.zeros(T, dtype=torch.float64)
        # samples of one image size a forward (aspect-ratio buckets give several sizes)
        by_size: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.samples):
            by_size.setdefault(tuple((s.target if s.target is not None else s.latent).shape), []).append(i)
        chunks = [ids[k:k + self.batch] for ids in by_size.values() for k in range(0, len(ids), self.batch)]
        for idx in chunks:
            chunk = [self.samples[i] for i in idx]
            key = tuple(idx)
            if key not in self._x0:
                self._x0[key] = self.latents(chunk, [_generator(POSTERIOR, i) for i in idx]).cpu()
            x0 = self._x0[key].to(device)
            cond = model.encode(self.features(chunk), device=device)
            B = len(chunk)
            noise = torch.stack([torch.randn(x0.shape[1:], generator=_generator(NOISE, i, j))
                                 for i in idx for j in range(T)]).to(device)
            t = self.times.repeat(B).to(device)  # rows: sample-major, then time
            x = x0.repeat_interleave(T, 0)
            tokens, mask = cond.tokens.repeat_interleave(T, 0), cond.mask.repeat_interleave(T, 0)
            v = model(interpolate(x, noise, t), t, Conditioning(tokens, mask))
            total += flow_loss(v, x, noise).double().cpu().view(B, T).sum(0)
        by_t = total / len(self.samples)
        return {"val_loss": round(float(by_t.mean()), 6), "val_loss_by_t": [round(float(x), 6) for x in by_t]}


def held_out_samples(source, n: int, log) -> list[Sample]:
    """The first n usable samples of a held-out source, in its order (bad ones skipped and logged)."""
    out = []
    for i in range(len(source)):
        if len(out) == n:
            break
        try:
            out.append(source.get(i))
        except BadSample as e:
            log.warning("validation loss: skipped a bad held-out sample: %s", e)
    return out
