"""Aspect-ratio buckets and multi-resolution training (`--buckets 512,1024`).

Every image of the real-data sources (image folders, manifests, tar shards) goes to one bucket:
an (H, W) of at most a tier's area (side^2) and close to it, aspect ratios 1:4 to 4:1, both sides
multiples of the model's pixel stride (patch x the latent space's downscale). Each step's batch comes from one
bucket; each image is resized to just cover its bucket and center-cropped (the least crop).

The tier of an image: the largest tier whose nearest-ratio bucket the image covers without
upscaling; an image too small for every tier goes to the smallest if it needs at most 2x
upscaling (the square mode's default min_size rule), otherwise it is left out (counted, logged).
Why this policy and not every tier for every image (diffusion-pipe's and ai-toolkit's resolution
lists train each image at all of them): an image is seen once per epoch, at the most detail it
holds, never upscaled when a tier fits (upscaled images teach blur); and an image's id names one
target size, so the id-keyed caches stay one entry an image. kohya-ss builds one area per dataset
(multi-resolution = several datasets), SimpleTuner one resolution per dataset too, skipping
images under its minimum size: one tier each, which is `--buckets N` here.

The bucket of each image is computed once, from the image headers (PIL's lazy open: nothing is
decoded; a manifest row's own "width" and "height" skip even that), and kept in memory: 8 bytes
of size and 8 of index an image (16 MB for a million), plus the scan (one header read per image
per process at start; run in threads).

How a step picks its batch (`BucketMixture`): batch b's bucket is drawn from a hash of (seed, b)
with probability P(bucket) = sum over tasks of ratio(task) * n(bucket, task) / n(task); then each
sample's task from a hash of (seed, draw) with probability ratio(task) * n(bucket, task) /
n(task) / P(bucket), and that task's next image in the bucket, walked in a seeded permutation per
(bucket, task, epoch). So every image is drawn with the same probability as without buckets
(each task's share is its ratio; each image of a task 1 / n(task) of it), only grouped by size; a bucket's
images are walked without repetition. The state is a few counters: a resume continues the same
sequence, and every rank draws the same global batch and trains its own slice (`Trainer.draw`),
so a batch does not depend on the number of processes.

Small buckets (fewer images than a batch) are merged into the nearest bucket (by log aspect ratio
plus log area; never a larger tier while a same or smaller one exists): no image is lost, a batch
never repeats an image for want of others; the merges are logged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .data import BadSample, Sample, Source
from .mixture import TaskMixture, _name_seed, _splitmix64, origin_differences, origin_of, seed_and_ratio_differences

log = logging.getLogger(__name__)

MAX_RATIO = 4.0  # aspect ratios 1:4 .. 4:1
AREA_TOLERANCE = 0.1  # a bucket's area within 10 % below its tier's side^2 (never above)
MAX_UPSCALE = 2.0  # the square mode's rule (min_size = resolution // 2)


@dataclass(frozen=True)
class Bucket:
    """One training size: (height, width) in pixels, approximating tier^2 pixels."""

    height: int
    width: int
    tier: int

    @property
    def key(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def ratio(self) -> float:
        """width / height"""
        return self.width / self.height


def parse_buckets(text: str | list | tuple) -> tuple[int, ...]:
    """--buckets "512,1024" -> (512, 1024): tiers as the sides of squares of their area."""
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        sides = [int(str(p).strip()) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f"--buckets {text!r}: expected comma-separated image sides in pixels, e.g. 512,1024 "
                         "(each the side of a square whose area the tier's buckets have)") from None
    if not sides or any(s < 1 for s in sides):
        raise ValueError(f"--buckets {text!r}: expected positive image sides in pixels, e.g. 512,1024")
    if len(set(sides)) != len(sides):
        raise ValueError(f"--buckets {text!r}: a tier is given twice")
    return tuple(sorted(sides))


def bucket_table(sides: tuple[int, ...], stride: int, max_ratio: float = MAX_RATIO,
                 tolerance: float = AREA_TOLERANCE) -> list[Bucket]:
    """The buckets of each tier: sides multiples of `stride`, width / height in [1/max_ratio,
    max_ratio], area at most side^2 and at least (1 - tolerance) side^2. Widths step from the
    square by about side / 16 (kohya-ss steps by 64 px at 1024^2), each width with the largest
    height that keeps the area within side^2 (why never above: a batch size that fits in memory at
    side^2 fits every bucket of the tier); the portrait buckets mirror the landscape ones. Sorted
    by tier, then ratio."""
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"bucket_table: stride must be a positive int (pixels), got {stride!r}")
    out: set[Bucket] = set()
    for side in sides:
        if side < stride:
            raise ValueError(f"--buckets {side}: smaller than the model's pixel stride ({stride} px: the patch size "
                             "times the latent space's downscale); give sides of at least that")
        area = side * side
        step = max(stride, round(side / 16 / stride) * stride)
        w = side // stride * stride
        while True:
            h = area // w // stride * stride
            if h < stride or w / h > max_ratio:
                break
            if h * w >= (1 - tolerance) * area:
                out |= {Bucket(h, w, side), Bucket(w, h, side)}
            w += step
    return sorted(out, key=lambda b: (b.tier, b.ratio, b.height))


def assign(sizes: np.ndarray, table: list[Bucket], max_upscale: float = MAX_UPSCALE) -> np.ndarray:
    """Bucket index (into `table`) of each image, (N,) int64, from (N, 2) (width, height) sizes:
    in the largest tier whose nearest-ratio bucket the image covers without upscaling, else the
    smallest tier's if that needs at most `max_upscale`; -1 for images too small, -2 for sizes
    <= 0 (unreadable)."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(sizes), -2, dtype=np.int64)
    ok = (sizes > 0).all(axis=1)
    w, h = np.where(ok, sizes[:, 0], 1.0), np.where(ok, sizes[:, 1], 1.0)
    logr = np.log(w / h)
    tiers = sorted({b.tier for b in table})
    chosen = np.full(len(sizes), -1, dtype=np.int64)
    for i, tier in enumerate(tiers):  # ascending: a larger tier that fits overrides a smaller one
        idx = np.array([j for j, b in enumerate(table) if b.tier == tier])
        bh = np.array([table[j].height for j in idx], dtype=np.float64)
        bw = np.array([table[j].width for j in idx], dtype=np.float64)
        # nearest log aspect ratio; ties go to the first in table order (the smaller ratio)
        nearest = np.abs(logr[:, None] - np.log(bw / bh)[None, :]).argmin(axis=1)
        cover = np.maximum(bw[nearest] / w, bh[nearest] / h)  # the scale preprocess resizes by
        fits = cover <= 1.0 if i else cover <= max_upscale
        chosen = np.where(fits, idx[nearest], chosen)
    return np.where(ok, chosen, out)


def scan_sizes(source: Source, name: str, threads: int = 8) -> tuple[np.ndarray, list[str]]:
    """(N, 2) (width, height) of every image of a source from their headers ((0, 0) where the
    header is unreadable), and the messages of those."""
    if not hasattr(source, "image_size"):
        raise ValueError(f"--buckets: the {name} source ({type(source).__name__}) cannot tell its image sizes; "
                         "buckets apply to image folders, manifests and tar shards")
    bad: list[str] = []

    def one(i: int) -> tuple[int, int]:
        try:
            return source.image_size(i)
        except BadSample as e:
            bad.append(str(e))
            return 0, 0

    with ThreadPoolExecutor(threads) as pool:  # header reads are I/O: threads overlap them
        sizes = np.array(list(pool.map(one, range(len(source)), chunksize=256)), dtype=np.int64).reshape(-1, 2)
    return sizes, sorted(bad)


def merge_small(counts: dict[int, int], table: list[Bucket], minimum: int) -> dict[int, int]:
    """Which bucket each small bucket (fewer than `minimum` images) merges into: {from: to}, the
    smallest first, each into the nearest other non-empty bucket (by |log ratio| + |log tier| apart;
    a larger tier only when no same or smaller tier has one). Stops when one bucket is left."""
    counts = dict(counts)
    moves: dict[int, int] = {}

    def distance(a: Bucket, b: Bucket) -> tuple:
        return (b.tier > a.tier, abs(math.log(a.ratio / b.ratio)) + abs(math.log(b.tier / a.tier)))

    while len(counts) > 1:
        small = [i for i, n in counts.items() if n < minimum]
        if not small:
            break
        i = min(small, key=lambda j: (counts[j], j))
        j = min((k for k in counts if k != i), key=lambda k: (distance(table[i], table[k]), k))
        counts[j] += counts.pop(i)
        moves = {a: (j if b == i else b) for a, b in moves.items()}
        moves[i] = j
    return moves


class Bucketed:
    """A source whose samples come at their bucket's size: index -> source.get(index, size=(H, W))."""

    def __init__(self, source: Source, sizes: np.ndarray):
        self.source, self.sizes = source, sizes  # (N, 2) int32 (H, W); 0 where the image is in no bucket

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> Sample:
        h, w = (int(x) for x in self.sizes[index])
        if h <= 0:
            raise BadSample(f"sample {index} is in no aspect-ratio bucket (too small, or its header unreadable)")
        return self.source.get(index, size=(h, w))


class BucketMixture:
    """(task, index) draws as `TaskMixture` gives them, grouped so that each batch (`draw`) comes
    from one bucket; `refill` gives more samples of the current batch's bucket (for bad samples).
    See the module's docstring for the rule and why."""

    def __init__(self, sources: dict[str, Source], ratios: dict[str, float], seed: int,
                 groups: dict[Bucket, dict[str, np.ndarray]]):
        base = TaskMixture(sources, ratios, seed)  # the same checks of ratios, sources and seed
        self.sources, self.seed, self.tasks, self.ratios = sources, seed, base.tasks, base.ratios
        self.buckets = sorted((b for b, g in groups.items() if any(len(g.get(t, ())) for t in self.tasks)),
                              key=lambda b: (b.tier, b.ratio, b.height))
        if not self.buckets:
            raise ValueError("BucketMixture: no bucket holds a sample of the tasks drawn")
        self.members = [{t: np.sort(np.asarray(groups[b].get(t, []), dtype=np.int64)) for t in self.tasks}
                        for b in self.buckets]
        total = {t: sum(len(m[t]) for m in self.members) for t in self.tasks}
        empty = [t for t in self.tasks if not total[t]]
        if empty:
            raise ValueError(f"BucketMixture: no bucket holds a sample of {empty}, which have a ratio > 0")
        # P(bucket, task) = ratio(task) * n(bucket, task) / n(task): the plain mixture's, grouped
        joint = np.array([[self.ratios[t] * len(m[t]) / total[t] for t in self.tasks] for m in self.members])
        self._cdf = _cdf(joint.sum(axis=1))
        self._task_cdf = [_cdf(row) for row in joint]
        self.draws = self.batches = 0
        self.epochs = {(b, t): 0 for b in range(len(self.buckets)) for t in self.tasks}
        self.positions = dict.fromkeys(self.epochs, 0)
        self._perms: dict[tuple[int, str], tuple[int, np.ndarray]] = {}
        self.current: int | None = None  # the bucket of the batch being drawn
        self.recent: Counter = Counter()  # batches per bucket key since `take_recent`

    @property
    def bucket(self) -> Bucket | None:
        """The bucket of the last batch drawn."""
        return None if self.current is None else self.buckets[self.current]

    def histogram(self) -> dict[str, dict[str, int]]:
        """Images per bucket key and task."""
        return {b.key: {t: len(m[t]) for t in self.tasks if len(m[t])} for b, m in zip(self.buckets, self.members)}

    def _perm(self, b: int, task: str) -> np.ndarray:
        epoch = self.epochs[(b, task)]
        cached = self._perms.get((b, task))
        if cached is None or cached[0] != epoch:
            name = _name_seed(f"{task}@{self.buckets[b].key}")
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32, name & 0xFFFFFFFF, epoch])
            cached = (epoch, rng.permutation(len(self.members[b][task])))
            self._perms[(b, task)] = cached
        return cached[1]

    def draw(self, n: int) -> list[tuple[str, int]]:
        """A new batch: its bucket, and n (task, index) pairs from it."""
        if n < 0:
            raise ValueError(f"BucketMixture.draw: n must be >= 0, got {n}")
        u = _uniform(self.seed ^ 0xB0C4E7, np.array([self.batches], dtype=np.uint64))
        self.current = int(np.searchsorted(self._cdf, u[0], side="right"))
        self.batches += 1
        self.recent[self.buckets[self.current].key] += 1
        return self.refill(n)

    def refill(self, n: int) -> list[tuple[str, int]]:
        """n more (task, index) pairs of the current batch's bucket."""
        if self.current is None:
            raise RuntimeError("BucketMixture.refill: no batch drawn yet (draw first)")
        b = self.current
        u = _uniform(self.seed ^ 0x5DEECE66D, np.arange(self.draws, self.draws + n, dtype=np.uint64))
        out = []
        for c in np.searchsorted(self._task_cdf[b], u, side="right"):
            task = self.tasks[int(c)]
            perm = self._perm(b, task)
            out.append((task, int(self.members[b][task][perm[self.positions[(b, task)]]])))
            self.positions[(b, task)] += 1
            if self.positions[(b, task)] == len(perm):
                self.epochs[(b, task)] += 1
                self.positions[(b, task)] = 0
        self.draws += n
        return out

    def get(self, task: str, index: int) -> Sample:
        return self.sources[task].get(index)

    def take_recent(self) -> dict:
        """For metrics.jsonl: the last batch's bucket [H, W] and the batches per bucket since the last call."""
        if self.current is None:
            return {}
        b = self.buckets[self.current]
        out = {"bucket": [b.height, b.width], "buckets": dict(sorted(self.recent.items()))}
        self.recent.clear()
        return out

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON-able state: seed, ratios, the images per bucket and task, counters, positions."""
        keys = lambda: ((f"{self.buckets[b].key}/{t}", (b, t)) for b, t in self.epochs)
        lengths = {t: sum(len(m[t]) for m in self.members) for t in self.tasks}
        return {"seed": self.seed, "ratios": dict(self.ratios), "draws": self.draws, "batches": self.batches,
                "lengths": lengths, "buckets": self.histogram(),
                "origins": {t: origin_of(self.sources[t]) for t in self.tasks},
                "epochs": {k: self.epochs[bt] for k, bt in keys() if len(self.members[bt[0]][bt[1]])},
                "positions": {k: self.positions[bt] for k, bt in keys() if len(self.members[bt[0]][bt[1]])}}

    def differences(self, state: dict) -> list[str]:
        """How a saved state's mixture differs from this one (seed, ratios, where the data comes from,
        buckets); [] when none."""
        diffs = seed_and_ratio_differences(state, self.seed, self.ratios) + origin_differences(state, self.sources)
        if "buckets" not in state:
            diffs.append("no aspect-ratio buckets -> --buckets")
        elif state["buckets"] != self.histogram():
            old, new = state["buckets"], self.histogram()
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            diffs.append(f"images per bucket changed in {len(changed)} buckets (" +
                         ", ".join(f"{k}: {old.get(k, {})} -> {new.get(k, {})}" for k in changed[:4]) +
                         (", ..." if len(changed) > 4 else "") + ")")
        return diffs

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue a saved sequence. strict: refuse a different seed, ratios or buckets. With
        strict=False a (bucket, task) whose images changed starts its next epoch, new ones at 0,
        and a state without buckets starts the bucket sequence afresh."""
        diffs = self.differences(state)
        if diffs and strict:
            raise ValueError("BucketMixture: the saved state is of another mixture (" + "; ".join(diffs) +
                             "); use the same data, --buckets, ratios and seed, or load_state_dict(state, "
                             "strict=False) to go on with the new mixture")
        if diffs:
            log.warning("BucketMixture: resuming a changed mixture: %s", "; ".join(diffs))
        if "buckets" not in state:
            return
        self.draws, self.batches = int(state["draws"]), int(state["batches"])
        for (b, t) in self.epochs:
            key, bucket = f"{self.buckets[b].key}/{t}", self.buckets[b].key
            e, p = int(state["epochs"].get(key, 0)), int(state["positions"].get(key, 0))
            if state["buckets"].get(bucket, {}).get(t, 0) != len(self.members[b][t]):
                e, p = (e + 1, 0) if key in state["epochs"] else (0, 0)
            self.epochs[(b, t)], self.positions[(b, t)] = e, p


def bucket_record(mixture) -> dict:
    """What metrics.jsonl records of the buckets since the last record ({} for a mixture without)."""
    take = getattr(mixture, "take_recent", None)
    return take() if take is not None else {}


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights) / weights.sum()
    cdf[-1] = 1.0
    return cdf


def _uniform(key: int, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), one per counter, a function of (key, counter) only."""
    k = _splitmix64(np.array([key & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return (_splitmix64(counters ^ k) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def bucketize(sources: dict[str, Source], ratios: dict[str, float], seed: int, sides: tuple[int, ...], stride: int,
              batch: int) -> tuple[BucketMixture, dict[str, Bucketed]]:
    """The bucketed mixture and sources of real-data sources: image sizes read once, each image
    assigned a bucket, small buckets merged, the histogram logged."""
    table = bucket_table(sides, stride)
    tasks = [t for t in sorted(sources) if ratios.get(t, 0) > 0]
    assigned: dict[str, np.ndarray] = {}
    for t in tasks:
        sizes, bad = scan_sizes(sources[t], t)
        assigned[t] = assign(sizes, table)
        if bad:
            log.warning("--buckets: %d %s images with unreadable headers left out, first: %s", len(bad), t, bad[0])
        small = int((assigned[t] == -1).sum())
        if small:
            log.warning("--buckets: %d %s images need more than %gx upscaling for the smallest bucket (%s px) and "
                        "are left out", small, t, MAX_UPSCALE, min(sides))
    counts = Counter(int(i) for a in assigned.values() for i in a if i >= 0)
    if not counts:
        raise ValueError(f"--buckets {','.join(map(str, sides))}: no image fits any bucket (all too small or "
                         "unreadable); give smaller tiers")
    moves = merge_small(dict(counts), table, batch)
    if moves:
        shown = [f"{table[a].key} ({counts[a]}) -> {table[b].key}" for a, b in sorted(moves.items())]
        log.warning("--buckets: %d buckets with fewer images than a batch (%d) merged into their nearest: %s%s",
                    len(moves), batch, ", ".join(shown[:12]), ", ..." if len(shown) > 12 else "")
    groups: dict[Bucket, dict[str, np.ndarray]] = {}
    wrapped: dict[str, Bucketed] = {}
    for t in tasks:
        a = assigned[t]
        final = np.array([moves.get(int(i), int(i)) for i in a], dtype=np.int64)
        hw = np.zeros((len(a), 2), dtype=np.int32)
        for i in np.unique(final[final >= 0]):
            where = np.flatnonzero(final == i)
            groups.setdefault(table[i], {})[t] = where
            hw[where] = (table[i].height, table[i].width)
        wrapped[t] = Bucketed(sources[t], hw)
        if hasattr(sources[t], "held_out"):  # --val-split's held-out samples, in the buckets training uses
            held = sources[t].held_out
            sizes, _ = scan_sizes(held, f"{t} (held out)")
            a = [moves.get(int(i), int(i)) for i in assign(sizes, table)]
            wrapped[t].held_out = Bucketed(held, np.array([(table[i].height, table[i].width) if i >= 0 else (0, 0)
                                                            for i in a], dtype=np.int32).reshape(-1, 2))
    mixture = BucketMixture(wrapped, {t: ratios[t] for t in tasks}, seed, groups)
    hist = mixture.histogram()
    log.info("--buckets %s (stride %d px): %d of %d buckets used; images per bucket: %s", ",".join(map(str, sides)),
             stride, len(hist), len(table), ", ".join(f"{k} {sum(v.values())}" for k, v in hist.items()))
    return mixture, wrapped
