"""The task mixture: (task, index) draws with the tasks' ratios (the paper's: tasks.PAPER_RATIOS),
resumable to the exact same sequence on any number of processes."""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np

from .data import Sample, Source

_log = logging.getLogger(__name__)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: uint64 -> well-mixed uint64 (vectorised, wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def seed_and_ratio_differences(state: dict, seed: int, ratios: dict[str, float]) -> list[str]:
    """How a saved mixture state's seed and task ratios differ from these; [] when they do not."""
    diffs = []
    if state["seed"] != seed:
        diffs.append(f"seed {state['seed']} -> {seed}")
    if set(state["ratios"]) != set(ratios) or any(
            not math.isclose(state["ratios"][t], ratios[t], rel_tol=1e-9) for t in ratios):
        diffs.append(f"ratios {state['ratios']} -> {ratios}")
    return diffs


def origin_of(source) -> str | None:
    """Where a source's samples come from (a folder, a manifest, shards: their `origin`), through
    the wrappers that hold one as `.source` (subsets, buckets); None for the synthetic scenes."""
    while not hasattr(source, "origin") and hasattr(source, "source"):
        source = source.source
    return getattr(source, "origin", None)


def origin_differences(state: dict, sources: dict) -> list[str]:
    """The tasks whose data comes from elsewhere than in a saved state (another --data of the same
    size trained on silently before: only a changed size was seen). A state from before origins
    were recorded has none to compare, but if --val-split sets data aside now, that state's
    held-out set was chosen by position, another set than now's."""
    if "origins" not in state:
        split = [t for t, s in sources.items() if hasattr(s, "held_out")]
        return [f"{t}: --val-split now holds out by sample id, this state's run held out by position (another "
                "held-out set: --new-data goes on with the new one, whose images that run may have trained on)"
                for t in split]
    saved = state["origins"]
    return [f"{t} data {saved[t]} -> {origin_of(sources[t])} (the same data moved: --new-data continues exactly)"
            for t in sources
            if saved.get(t) is not None and origin_of(sources[t]) is not None and saved[t] != origin_of(sources[t])]


class TaskMixture:
    """Draws (task, index) pairs with the given task ratios, resumable to the exact same sequence.

    Draw k picks its task from a hash of (seed, k), so the sequence does not depend on how draws
    are grouped into calls; each task walks its own source in epochs, each epoch a permutation
    from (seed, task, epoch). For data parallelism draw the global batch on every rank and take
    this rank's slice: one state for all ranks, and a resume on another world size stays exact.
    """

    def __init__(self, sources: dict[str, Source], ratios: dict[str, float], seed: int = 0):
        missing = sorted(set(ratios) - set(sources))
        if missing:
            raise ValueError(f"TaskMixture: ratios given for {missing} but there is no source for them; "
                             f"sources: {sorted(sources)}")
        bad = {t: r for t, r in ratios.items() if not (r >= 0 and math.isfinite(r))}
        if bad:
            raise ValueError(f"TaskMixture: ratios must be finite and >= 0, got {bad}")
        total = sum(ratios.values())
        if total <= 0:
            raise ValueError(f"TaskMixture: at least one ratio must be > 0, got {ratios}")
        unused = sorted(set(sources) - set(ratios))
        if unused:
            _log.info("TaskMixture: sources %s have no ratio and are never drawn", unused)
        self.tasks = sorted(t for t, r in ratios.items() if r > 0)
        self.ratios = {t: ratios[t] / total for t in self.tasks}  # renormalised
        empty = [t for t in self.tasks if len(sources[t]) == 0]
        if empty:
            raise ValueError(f"TaskMixture: the sources of {empty} hold no samples but have a ratio > 0: "
                             "give them data, or set their ratio to 0")
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"TaskMixture: seed must be an int in [0, 2**63), got {seed!r}")
        self.sources, self.seed = sources, seed
        self._cdf = np.cumsum([self.ratios[t] for t in self.tasks])
        self._cdf[-1] = 1.0
        self.draws = 0
        self.epochs = {t: 0 for t in self.tasks}
        self.positions = {t: 0 for t in self.tasks}
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # task -> (epoch, permutation)

    def _perm(self, task: str) -> np.ndarray:
        epoch = self.epochs[task]
        cached = self._perms.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32, _name_seed(task) & 0xFFFFFFFF, epoch])
            cached = (epoch, rng.permutation(len(self.sources[task])))
            self._perms[task] = cached
        return cached[1]

    def draw(self, n: int) -> list[tuple[str, int]]:
        """The next n (task, index into sources[task]) pairs."""
        if n < 0:
            raise ValueError(f"TaskMixture.draw: n must be >= 0, got {n}")
        k = np.arange(self.draws, self.draws + n, dtype=np.uint64)
        key = _splitmix64(np.array([self.seed ^ 0x5DEECE66D], dtype=np.uint64))  # (1,)
        u = (_splitmix64(k ^ key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # (n,) in [0, 1)
        choice = np.searchsorted(self._cdf, u, side="right")
        out = []
        for c in choice:
            task = self.tasks[int(c)]
            perm = self._perm(task)
            out.append((task, int(perm[self.positions[task]])))
            self.positions[task] += 1
            if self.positions[task] == len(perm):
                self.epochs[task] += 1
                self.positions[task] = 0
        self.draws += n
        return out

    def refill(self, n: int) -> list[tuple[str, int]]:
        """n more pairs for the batch being drawn (bad samples' slots): here simply the next n.
        (A bucketed mixture, buckets.py, keeps them in the batch's bucket.)"""
        return self.draw(n)

    def get(self, task: str, index: int) -> Sample:
        """The sample a drawn pair names."""
        return self.sources[task].get(index)

    def state_dict(self) -> dict:
        """Plain JSON-able state: seed, ratios, source lengths, draws, per-task epoch and position."""
        return {"seed": self.seed, "draws": self.draws, "ratios": dict(self.ratios),
                "lengths": {t: len(self.sources[t]) for t in self.tasks},
                "origins": {t: origin_of(self.sources[t]) for t in self.tasks},
                "epochs": dict(self.epochs), "positions": dict(self.positions)}

    def differences(self, state: dict) -> list[str]:
        """How a saved state's mixture differs from this one (seed, ratios, where the data comes
        from, source lengths); [] when none."""
        diffs = seed_and_ratio_differences(state, self.seed, self.ratios) + origin_differences(state, self.sources)
        if state.get("buckets") is not None:
            diffs.append("aspect-ratio buckets -> none (no --buckets)")
        changed = self._changed_lengths(state)
        if changed:
            diffs.append("source lengths " + ", ".join(f"{t}: {state['lengths'][t]} -> {len(self.sources[t])}"
                                                       for t in changed))
        return diffs

    def _changed_lengths(self, state: dict) -> list[str]:
        return [t for t in self.tasks if t in state["lengths"] and state["lengths"][t] != len(self.sources[t])]

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue a saved sequence. strict: refuse a different seed, ratios or source lengths.

        With strict=False (e.g. edit data added for the last steps, Sec. 4.1) known tasks keep their
        place, a task whose source length changed starts its next epoch, new tasks start at 0.
        """
        diffs = self.differences(state)
        if diffs and strict:
            raise ValueError("TaskMixture: the saved state is of another mixture (" + "; ".join(diffs) +
                             "); use the same sources, ratios and seed, or load_state_dict(state, strict=False) "
                             "to go on with the new mixture from where the saved one stopped")
        if diffs:
            _log.warning("TaskMixture: resuming a changed mixture: %s", "; ".join(diffs))
        changed = self._changed_lengths(state)
        self.draws = int(state["draws"])
        for t in self.tasks:
            e, p = int(state["epochs"].get(t, 0)), int(state["positions"].get(t, 0))
            if t in changed:
                e, p = e + 1, 0
            self.epochs[t], self.positions[t] = e, p
