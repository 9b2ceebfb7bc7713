"""An exact detector for the synthetic scenes: palette pixels -> components -> colour, shape, place.

No judge model: every decision is a rule on pixels, written out below, so a score can be checked
by hand. It is built for generated images (soft edges, noise, slightly-off colours):

1. Pixels. A pixel c is read as a palette colour p dimmed by a factor a (a blurred edge over the
   black canvas is exactly that): a = c.p / |p|^2, residual r = |c - a p|. The colour with the
   smallest residual wins; the pixel is an object pixel when a >= 0.5 (so a blurred edge is cut
   at half height, where the true edge is), r <= MAX_RESIDUAL * |a p| and r <= AMBIGUITY times
   the runner-up colour's residual. Anything darker, of no palette colour, or about as near to two
   colours (orange between red and yellow) is background.
2. Components: 8-connected pixels of one colour (a run-length union-find in numpy); components
   smaller than MIN_AREA_FRACTION of the smallest ideal object (`scenes.object_area`) are dropped.
3. Shape: the component against the three ideal masks drawn in its own bounding box (the circle
   inscribed, the square filling it, the upright triangle with its apex at the top centre); the
   best IoU wins. Ideal fill ratios: square 1.0, circle pi/4, triangle 0.5.
4. Place: the centroid of the component's pixels, as fractions of the canvas.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from .. import scenes as sc

MAX_RESIDUAL = 0.3  # off-palette tolerance, relative to the brightness of the matched colour
MIN_ALPHA = 0.5  # dimmer than half a palette colour is background
AMBIGUITY = 0.6  # the best colour's residual must be below this fraction of the runner-up's
MIN_AREA_FRACTION = 0.25  # of the smallest ideal object area (the triangle's)
RELATION_MARGIN = 0.1  # "to the left of" / "above": centres at least this far apart (canvas fraction)
MAX_CANDIDATES = 6  # the largest detections considered when matching a prompt's objects



@functools.lru_cache(maxsize=16)
def _palette(colors: tuple[tuple[str, tuple[int, int, int]], ...]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    names = tuple(c for c, _ in colors)
    rgb = np.array([v for _, v in colors], dtype=np.float32)  # (K, 3)
    return names, rgb, np.linalg.norm(rgb, axis=1)


def palette_of(colors: dict[str, tuple[int, int, int]] | None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(names, (K, 3) RGB, (K,) norms) of a palette: the grammar's COLORS by default; another one
    (e.g. with a colour a LoRA taught) is read by the same rules."""
    return _palette(tuple((colors or sc.COLORS).items()))


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    color: str
    shape: str
    cx: float  # centroid, fraction of the width
    cy: float  # centroid, fraction of the height
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end exclusive


def classify_pixels(img: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: index into the palette (scenes.COLORS), or -1 for background."""
    _, _PALETTE, _NORMS = palette_of(palette)
    H, W, _ = img.shape
    c = img.reshape(-1, 3).astype(np.float32)  # (N, 3)
    proj = c @ (_PALETTE / _NORMS[:, None]).T  # (N, K) length of c along each colour
    k = proj.argmax(1)  # residual |c - a p|^2 = |c|^2 - proj^2: the largest projection fits best
    p1 = proj[np.arange(len(c)), k]
    out = np.full(len(c), -1)
    cand = np.nonzero(p1 >= MIN_ALPHA * _NORMS[k])[0]  # bright enough (a >= MIN_ALPHA)
    top2 = -np.partition(-proj[cand], 1, axis=1)[:, :2]  # (n, 2) best and runner-up projections
    cc = (c[cand] ** 2).sum(1)
    r1, r2 = cc - top2[:, 0] ** 2, cc - top2[:, 1] ** 2  # squared residuals
    ok = (r1 <= (MAX_RESIDUAL * top2[:, 0]) ** 2) & (r1 <= AMBIGUITY**2 * r2)
    out[cand[ok]] = k[cand[ok]]
    return out.reshape(H, W)


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal non-negative labels per row, joined 8-connected across rows.

    Returns per run: row y, first column x0, last column x1 (inclusive), label, component id.
    """
    H, W = labels.shape
    padded = np.full((H, W + 2), -1, dtype=np.int64)
    padded[:, 1:-1] = labels
    change = padded[:, 1:] != padded[:, :-1]  # (H, W + 1): a run starts or ends at this boundary
    ys, xs = np.nonzero(change)  # row-major, so each run's start is followed by its end
    lab = padded[ys, xs + 1]  # label to the right of the boundary: the run that starts here
    starts = np.nonzero(lab >= 0)[0]
    y, x0, cls = ys[starts], xs[starts], lab[starts]
    x1 = xs[starts + 1] - 1  # a run ends before the next boundary, always in its own row (padding)
    R = len(y)
    if R == 0:
        return y, x0, x1, cls, np.zeros(0, dtype=np.int64)
    # Candidate neighbours of run j in the row above: runs i with x1_i >= x0_j - 1 and x0_i <= x1_j + 1.
    S = W + 2  # row stride of the keys; runs are sorted by (y, x), so both keys are sorted
    lo = np.searchsorted(y * S + x1, (y - 1) * S + x0 - 1, "left")
    hi = np.searchsorted(y * S + x0, (y - 1) * S + x1 + 1, "right")
    n = np.maximum(hi - lo, 0)
    b = np.repeat(np.arange(R), n)
    a = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    keep = cls[a] == cls[b]
    a, b = a[keep], b[keep]
    # Union-find by min-label propagation with pointer jumping (a few passes for any image).
    comp = np.arange(R)
    while True:
        m = np.minimum(comp[a], comp[b])
        new = comp.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        if np.array_equal(new, comp):
            break
        comp = new
    return y, x0, x1, cls, comp


@functools.lru_cache(maxsize=1024)
def _ideal_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """The three shapes drawn into an h x w box at pixel centres, as the renderer draws them."""
    v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]  # 0..1 inside the box
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose ideal mask in the mask's own (cropped) box has the highest IoU."""
    ious = {}
    for name, ideal in _ideal_masks(*mask.shape).items():
        ious[name] = (mask & ideal).sum() / max((mask | ideal).sum(), 1)
    return max(ious, key=ious.get)


def detect(img: np.ndarray, min_area: float | None = None,
           palette: dict[str, tuple[int, int, int]] | None = None) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image, largest first. min_area (pixels) defaults to
    MIN_AREA_FRACTION of the smallest ideal object at this canvas size; palette: the colours read
    (default scenes.COLORS)."""
    if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"detect needs an (H, W, 3) uint8 RGB image, got {got}")
    H, W = img.shape[:2]
    if min_area is None:
        size = math.sqrt(H * W)
        min_area = MIN_AREA_FRACTION * min(sc.object_area(s, size) for s in sc.SHAPES)
    labels = classify_pixels(img, palette)
    names = palette_of(palette)[0]
    y, x0, x1, cls, comp = _components(labels)
    if len(y) == 0:
        return []
    ids, comp = np.unique(comp, return_inverse=True)
    length = (x1 - x0 + 1).astype(np.float64)
    area = np.bincount(comp, length)
    sum_x = np.bincount(comp, length * (x0 + x1 + 1) / 2)  # sum of pixel-centre x over the run
    sum_y = np.bincount(comp, length * (y + 0.5))
    out = []
    for c in np.nonzero(area >= min_area)[0]:
        runs = np.nonzero(comp == c)[0]
        bx0, bx1 = int(x0[runs].min()), int(x1[runs].max()) + 1
        by0, by1 = int(y[runs].min()), int(y[runs].max()) + 1
        mask = np.zeros((by1 - by0, bx1 - bx0), dtype=bool)
        for r in runs:
            mask[y[r] - by0, x0[r] - bx0 : x1[r] - bx0 + 1] = True
        out.append(Detection(
            color=names[int(cls[runs[0]])],
            shape=classify_shape(mask),
            cx=float(sum_x[c] / area[c] / W),
            cy=float(sum_y[c] / area[c] / H),
            area=int(area[c]),
            bbox=(bx0, by0, bx1, by1),
        ))
    return sorted(out, key=lambda d: -d.area)


# --- scoring ------------------------------------------------------------------------------------


def position_ok(d: Detection, position: str) -> bool:
    """left: cx < 1/3; right: cx > 2/3; top: cy < 1/3; bottom: cy > 2/3; center: both in [1/3, 2/3]."""
    if position not in sc.POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {list(sc.POSITIONS)}")
    return {
        "on the left": d.cx < 1 / 3,
        "on the right": d.cx > 2 / 3,
        "at the top": d.cy < 1 / 3,
        "at the bottom": d.cy > 2 / 3,
        "in the center": 1 / 3 <= d.cx <= 2 / 3 and 1 / 3 <= d.cy <= 2 / 3,
    }[position]


def relation_ok(first: Detection, second: Detection, relation: str, margin: float = RELATION_MARGIN) -> bool:
    """"to the left of": first.cx + margin < second.cx; "above": first.cy + margin < second.cy
    (the other axis is not judged)."""
    if relation == "to the left of":
        return first.cx + margin < second.cx
    if relation == "above":
        return first.cy + margin < second.cy
    raise ValueError(f"unknown relation {relation!r}; expected one of {list(sc.RELATIONS)}")


def match(scene: sc.Scene, detections: list[Detection]) -> list[Detection | None]:
    """The detection for each of the prompt's objects (None where too few were found).

    The assignment maximises 2 * (colours right) + (shapes right); ties go to larger detections.
    """
    n = len(scene.objects)
    cands: list[Detection | None] = sorted(detections, key=lambda d: -d.area)[:MAX_CANDIDATES]
    cands += [None] * max(0, n - len(cands))

    def agreement(assign) -> int:
        return sum(2 * (d.color == o.color) + (d.shape == o.shape) for o, d in zip(scene.objects, assign) if d)

    best, best_key = None, -1
    for assign in itertools.permutations(cands, n):  # first best = largest detections
        key = agreement(assign)
        if key > best_key:
            best, best_key = list(assign), key
    return best


def score(scene: sc.Scene, detections: list[Detection], margin: float = RELATION_MARGIN) -> dict[str, float | bool]:
    """Per-category scores of one image for one prompt.

    color, shape: fraction of the prompt's objects whose matched detection (see `match`) has the
    right colour / shape (0, 0.5 or 1 for pairs). count: exactly as many detections as objects.
    position (single prompts): the matched detection obeys `position_ok`. relation (pairs): both
    objects matched and `relation_ok`. Position and relation are judged on the matched detections
    whatever their attributes; `all` needs everything: right count, every colour and shape, and the
    position or relation.
    """
    matched = match(scene, detections)
    objs = scene.objects
    out: dict[str, float | bool] = {
        "color": sum(d is not None and d.color == o.color for o, d in zip(objs, matched)) / len(objs),
        "shape": sum(d is not None and d.shape == o.shape for o, d in zip(objs, matched)) / len(objs),
        "count": len(detections) == len(objs),
    }
    if scene.relation is None:
        out["position"] = matched[0] is not None and position_ok(matched[0], scene.position)
        placed = out["position"]
    else:
        a, b = matched
        out["relation"] = a is not None and b is not None and relation_ok(a, b, scene.relation, margin)
        placed = out["relation"]
    out["all"] = bool(out["count"] and out["color"] == 1 and out["shape"] == 1 and placed)
    return out
