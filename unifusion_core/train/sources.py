"""Training data sources: each yields `Sample`s of the tasks in tasks.py and raises `BadSample`
(with the file named) for data it cannot use.

`SyntheticScenes`, `ImageFolder` (image + same-stem .txt), `Manifest` (JSONL or Parquet rows of
any task) and `TarShards` (WebDataset-style tars); `load_sources` picks one for a path. All share
`preprocess`: RGB, shorter side to the resolution (bicubic), center crop, (3, R, R) in 0..1, or
with aspect-ratio buckets (buckets.py) the same cover-resize and center crop to a bucket's (H, W):
the real-data sources take `get(index, size=(H, W))` and tell an image's size without decoding it
(`image_size`); reference images stay PIL RGB in `Sample.images`. What a sample of each task
must hold is the task's rule (`Task.check`), applied by `_make_sample` for every source.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from torch import Tensor

from .. import scene_edits
from .. import scenes as sc
from ..pixels import to_8bit, uint8_to_unit
from .data import BadSample, Sample, Source
from .tasks import TASKS, Task, get_task, text_id

_log = logging.getLogger(__name__)


class SyntheticScenes:
    """The synthetic scenes of one split as an endless t2i source: index i -> scene i mod N,
    rendered with a jitter drawn from (seed, i), so every index is one fixed image."""

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, kinds: tuple[str, ...] = ("single", "pair"),
                 length: int = 1_000_000, prompts: list[str] | None = None, jitter: bool = True):
        if prompts is not None:  # a fixed list of prompts of the grammar (e.g. to overfit a few)
            self.scenes = [sc.parse_prompt(p) for p in prompts]
        else:
            self.scenes = [s for s in sc.scenes(split) if s.kind in kinds]
        if not self.scenes:
            raise ValueError(f"no synthetic scenes of split {split!r} and kinds {kinds}")
        self.size, self.seed, self.length, self.jitter = size, seed, length, jitter

    def __len__(self) -> int:
        return self.length

    def get(self, index: int) -> Sample:
        scene = self.scenes[index % len(self.scenes)]
        rng = np.random.default_rng([self.seed, index]) if self.jitter else None
        img = sc.render(scene, self.size, rng)
        id = f"scene-{self.seed}-{index}"
        return Sample(id=id, task="t2i", prompt=scene.prompt, target=uint8_to_unit(img),  # (3, H, W) in 0..1
                      cond_id=TASKS["t2i"].cond_id(id, scene.prompt))


class SceneReconstructions:
    """The synthetic scenes of one split as an endless `reconstruction` source: the render is both
    the VLM's image and the target (index i -> scene i mod N, jitter from (seed, i))."""

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, length: int = 1_000_000):
        self.scenes = sc.scenes(split)
        self.size, self.seed, self.length = size, seed, length

    def __len__(self) -> int:
        return self.length

    def get(self, index: int) -> Sample:
        scene = self.scenes[index % len(self.scenes)]
        img = sc.render(scene, self.size, np.random.default_rng([self.seed, index]))
        return Sample(id=f"scene-rec-{self.seed}-{index}", task="reconstruction", target=uint8_to_unit(img),
                      images=[Image.fromarray(img)])


class SceneEdits:
    """Edits of the synthetic scenes (`scene_edits.py`) of one split as an endless `edit` source:
    index i -> edit i mod N, the source and the target rendered with the same jitter draw from
    (seed, i), so what the instruction leaves alone stays in place. With `references`, two-image
    compositions are drawn too (one in every `1 / references` samples), each image jittered on its own."""

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, length: int = 1_000_000,
                 references: float = 0.0):
        if not 0 <= references <= 1:
            raise ValueError(f"references must be a share in 0..1, got {references}")
        self.edits, self.refs = scene_edits.edits(split), scene_edits.references(split)
        self.size, self.seed, self.length, self.share = size, seed, length, references

    def __len__(self) -> int:
        return self.length

    def get(self, index: int) -> Sample:
        id = f"scene-edit-{self.seed}-{index}"
        jitter = lambda *k: np.random.default_rng([self.seed, index, *k])  # one draw per image of the sample
        if self.share and (index * 0.6180339887) % 1 < self.share:  # a fixed, evenly spread share of indices
            r = self.refs[index % len(self.refs)]
            images = [Image.fromarray(sc.render(s, self.size, jitter(k + 1))) for k, s in enumerate(r.sources)]
            target, prompt = sc.render(r.target, self.size, jitter()), r.instruction
        else:
            e = self.edits[index % len(self.edits)]
            images = [Image.fromarray(sc.render(e.source, self.size, jitter()))]
            target, prompt = sc.render(e.target, self.size, jitter()), e.instruction
        return Sample(id=id, task="edit", prompt=prompt, target=uint8_to_unit(target), images=images)


# --------------------------------------------------------------------------------------------
# Images: decoding and the target preprocessing shared by every source
# --------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
# Version tag of `preprocess`; latent caches record it, so a change here invalidates them.
PREPROCESS = "rgb-shorter-side-bicubic-center-crop-v1"


def _check_resolution(resolution: int, min_size: int | None) -> int:
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int (pixels), got {resolution!r}")
    # Default: upscale at most 2x; smaller images would teach the model blur.
    min_size = resolution // 2 if min_size is None else min_size
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0 pixels, got {min_size}")
    return min_size


_warned_truncated = False


def _warn_truncated() -> None:
    global _warned_truncated
    _warned_truncated = True
    _log.warning("PIL's ImageFile.LOAD_TRUNCATED_IMAGES is on (set by another module): truncated images "
                 "load partly instead of raising BadSample")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) from the header alone (no decoding); 1 when there is none.
    Why not img.getexif(): for a PNG whose eXIf chunk follows the pixels it decodes the image."""
    raw = img.info.get("exif")
    if not isinstance(raw, bytes):
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
    except Exception:  # a damaged EXIF block: exif_transpose will meet it when decoding
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of a lazily opened image as `open_image` returns it (EXIF rotation applied)."""
    w, h = img.size
    return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)  # 5..8: transposed by exif_transpose


def read_image_size(data: bytes | str | Path, name: str) -> tuple[int, int]:
    """(width, height) of an image as displayed, from its header (PIL's lazy open: nothing decoded),
    or `BadSample` naming `name`."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return displayed_size(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"{name}: unreadable image header ({type(e).__name__}: {e})") from None


def open_image(data: bytes | str | Path, name: str, min_size: int = 0,
               draft: int | tuple[int, int] | None = None) -> Image.Image:
    """Decode a whole image to PIL RGB, or raise `BadSample` naming `name` and the reason. A 16-bit
    (or 32-bit, float) grayscale image is scaled to 8 bits (`pixels.to_8bit`), not clipped.

    draft: for JPEG, let the decoder scale down by a power of two while the shorter side stays
    >= draft pixels (much faster for large photos; the final resize is done by `preprocess`); an
    (H, W) bucket size: while the image still covers H x W after `preprocess`'s cover scaling.
    """
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        size = img.size
        if min(size) < min_size:
            raise BadSample(f"{name}: image is {size[0]}x{size[1]}, smaller than min_size={min_size} px")
        if isinstance(draft, tuple) and img.format == "JPEG":
            (H, W), (dw, dh) = draft, displayed_size(img)
            s = max(W / dw, H / dh)  # preprocess's cover scale; the raw image scales by the same factor
            img.draft("RGB", (math.ceil(size[0] * s), math.ceil(size[1] * s)))
        elif draft is not None and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()  # decode everything now: a truncated file fails here, not in the training loop
        img = to_8bit(ImageOps.exif_transpose(img))  # Why: convert("RGB") clips 16-bit values at 255
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"{name}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warn_truncated()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Why: convert("RGB") keeps whatever colour lies under transparent pixels (often black
        # noise); compositing on white is what a viewer shows.
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("RGB")


def preprocess(img: Image.Image, resolution: int | tuple[int, int]) -> Tensor:
    """PIL image -> RGB, resized (bicubic) to just cover the target and center-cropped: (3, R, R)
    in 0..1 for a resolution R (the shorter side to R), (3, H, W) for a bucket size (H, W) (the
    least crop that fills it)."""
    img = img.convert("RGB")
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    w, h = img.size
    scale = max(W / w, H / h)  # for a square: resolution / min(w, h), exactly
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - W) // 2, (nh - H) // 2
    img = img.crop((left, top, left + W, top + H))
    return uint8_to_unit(np.array(img, dtype=np.uint8))  # (3, H, W); a copy: PIL's array is read-only


def _checked_prompt(task: Task, prompt: str | None, num_images: int, where: str) -> str:
    """The task's rule for what a sample holds (before any image is decoded), as BadSample."""
    try:
        return task.check(prompt, num_images)
    except ValueError as e:
        raise BadSample(f"{where}: {e}") from None


def _make_sample(id: str, task: Task, prompt: str, target: Image.Image, images: list,
                 resolution: int | tuple[int, int]) -> Sample:
    """A checked sample of any task (its prompt from `_checked_prompt`)."""
    return Sample(id=id, task=task.name, prompt=prompt, target=preprocess(target, resolution), images=images,
                  cond_id=task.cond_id(id, prompt))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ImageFolder:
    """Images with same-stem .txt captions under a folder (recursive, sorted) as a t2i source."""

    def __init__(self, root: str | Path, resolution: int, min_size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"ImageFolder: {str(self.root)!r} is not a folder")
        self.resolution = resolution
        self.min_size = _check_resolution(resolution, min_size)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not self.files:
            others = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
            held = f"it holds {len(others)} other files, e.g. {others[:3]}" if others else "it is empty"
            raise ValueError(f"ImageFolder: no images in {str(self.root)!r} or its subfolders ({held}); expected "
                             f"{'/'.join(IMAGE_EXTS)} files, each with a same-stem .txt caption beside it "
                             "(cat.png + cat.txt)")
        self.ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in self.files]
        self.origin = str(self.root.resolve())  # where the samples come from (a resume compares it)
        seen: dict[str, Path] = {}
        for id, p in zip(self.ids, self.files):
            if id in seen:
                raise ValueError(f"ImageFolder: {seen[id]} and {p} share the id {id!r} (and the caption "
                                 f"file); rename one of them")
            seen[id] = p
        _log.info("ImageFolder %s: %d images", self.root, len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index` as displayed, from its header alone (for buckets)."""
        return read_image_size(self.files[index], str(self.files[index]))

    def get(self, index: int, size: tuple[int, int] | None = None) -> Sample:
        """Sample `index`, its target at the square resolution, or at a bucket's (H, W) size."""
        path = self.files[index]
        cap = path.with_suffix(".txt")
        try:
            text = cap.read_text(encoding="utf-8-sig")  # -sig: a BOM (Notepad's UTF-8) is no part of it
        except FileNotFoundError:
            raise BadSample(f"{path}: missing caption file {cap.name}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BadSample(f"{cap}: unreadable caption ({e})") from None
        t2i = TASKS["t2i"]
        prompt = _checked_prompt(t2i, text, 0, str(cap))
        # with a bucket size: its assignment already refused images needing more than 2x upscaling
        img = open_image(path, str(path), self.min_size if size is None else 0, draft=size or self.resolution)
        return _make_sample(self.ids[index], t2i, prompt, img, [], size or self.resolution)


class Subset:
    """Some indices of a source, as a source (e.g. the rows of one task of a manifest)."""

    def __init__(self, source: Source, indices: list[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int, size: tuple[int, int] | None = None) -> Sample:
        if size is None:  # a source without bucket sizes keeps working
            return self.source.get(self.indices[index])
        return self.source.get(self.indices[index], size=size)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.source.image_size(self.indices[index])

    @property
    def ids(self) -> list[str]:
        """The samples' ids, in order, without reading a sample (the source's `ids`)."""
        ids = self.source.ids
        return [ids[i] for i in self.indices]


@dataclass
class _Row:
    where: str  # "manifest.jsonl line 7", for messages
    data: dict | None = None
    error: str = ""  # why the row cannot be used (parse error, unknown task)
    size: tuple | None = None  # a Parquet row's width and height columns (kept out of its id)
    task: str = ""
    id: str = ""


class Manifest:
    """JSONL or Parquet rows {id?, task, image, prompt|caption, sources?}; paths relative to the file.

    Rows are parsed once here; a malformed row raises `BadSample` (with its line) when read.
    `by_task()` splits the usable rows into one source per task for `TaskMixture`.
    A row without "id" gets "<manifest stem>/<hash of the row>": stable under reordering and
    moving the dataset folder, never a line number (a cache keyed by position pairs wrong data).
    """

    def __init__(self, path: str | Path, resolution: int, min_size: int | None = None,
                 default_task: str = "t2i"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"Manifest: {str(self.path)!r} is not a file")
        self.origin = str(self.path.resolve())  # where the samples come from (a resume compares it)
        get_task(default_task)  # ValueError naming the known tasks
        self.resolution, self.default_task = resolution, default_task
        self.min_size = _check_resolution(resolution, min_size)
        self.base = self.path.parent
        if self.path.suffix.lower() == ".parquet":
            rows = [_Row(f"{self.path.name} row {i}", data=d, size=(d.pop("width", None), d.pop("height", None)))
                    for i, d in enumerate(self._read_parquet())]
        else:
            rows = self._read_jsonl()
        ids: dict[str, _Row] = {}
        for row in rows:
            self._check(row)
            if row.error:
                continue
            other = ids.get(row.id)
            if other is not None and other.data != row.data:
                raise ValueError(f"Manifest {self.path}: {other.where} and {row.where} share the id {row.id!r} "
                                 f"with different content; give them different ids")
            ids[row.id] = row
        self.rows = rows
        bad = [r for r in rows if r.error]
        if bad:
            _log.warning("Manifest %s: %d of %d rows unusable, first: %s", self.path, len(bad), len(rows),
                         bad[0].error)
        _log.info("Manifest %s: %s", self.path, self.tasks())

    def _read_parquet(self) -> list[dict]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {self.path} needs pyarrow: pip install pyarrow "
                              f"(or the project's 'train' extra: pip install -c constraints.txt '.[train]')") from None
        schema = pq.read_schema(self.path)
        cols = [c for c in ("id", "task", "image", "prompt", "caption", "sources", "width", "height")
                if c in schema.names]
        return pq.read_table(self.path, columns=cols).to_pylist()

    def _read_jsonl(self) -> list[_Row]:
        rows = []
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path.name} line {n}"
                try:
                    rows.append(_Row(where, data=json.loads(line.decode("utf-8-sig"))))  # a BOM on line 1
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    rows.append(_Row(where, error=f"{where}: malformed JSON ({e})"))
        return rows

    def _check(self, row: _Row) -> None:
        """Fill in task and id, or the error."""
        if row.error:
            return
        d = row.data
        if not isinstance(d, dict):
            row.error = f"{row.where}: expected a JSON object, got {type(d).__name__}"
            return
        d = {k: v for k, v in d.items() if v is not None}  # Parquet gives None for absent columns
        row.data = d
        try:
            row.task = get_task(d.get("task", self.default_task)).name
        except ValueError as e:
            row.error = f"{row.where}: {e}"
            return
        if "id" in d:
            row.id = str(d["id"])
        else:
            content = json.dumps({k: d[k] for k in sorted(d)}, sort_keys=True, ensure_ascii=False, default=str)
            row.id = f"{self.path.stem}/{text_id(content)}"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        """The rows' ids, in order ("" for an unusable row)."""
        return [r.id for r in self.rows]

    def tasks(self) -> dict[str, int]:
        """Usable rows per task."""
        counts = {t: 0 for t in TASKS}
        for r in self.rows:
            if not r.error:
                counts[r.task] += 1
        return {t: c for t, c in counts.items() if c}

    def by_task(self) -> dict[str, Subset]:
        """One source per task present (unusable rows left out), for `TaskMixture`."""
        return {t: Subset(self, [i for i, r in enumerate(self.rows) if not r.error and r.task == t])
                for t in self.tasks()}

    def _resolve(self, value: object, row: _Row, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise BadSample(f"{row.where}: {what} must be a path string, got {value!r}")
        path = Path(value)
        path = path if path.is_absolute() else self.base / path
        if not path.is_file():
            raise BadSample(f"{row.where}: {what} file {value!r} not found (looked at {path})")
        return path

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of row `index`'s target image: the row's own integer "width" and
        "height" when it has them (no file opened: what a large dataset's manifest should carry;
        as displayed, after EXIF rotation), else from the image's header (nothing decoded)."""
        row = self.rows[index]
        if row.error:
            raise BadSample(row.error)
        d = row.data
        w, h = row.size or (d.get("width"), d.get("height"))
        if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and w > 0 and h > 0:
            return w, h
        if "image" not in d:
            raise BadSample(f"{row.where}: no 'image' (the target image path)")
        path = self._resolve(d["image"], row, "image")
        return read_image_size(path, f"{row.where} ({path})")

    def get(self, index: int, size: tuple[int, int] | None = None) -> Sample:
        """Sample `index`, its target at the square resolution, or at a bucket's (H, W) size."""
        row = self.rows[index]
        if row.error:
            raise BadSample(row.error)
        d = row.data
        if "image" not in d:
            raise BadSample(f"{row.where}: no 'image' (the target image path)")
        task = TASKS[row.task]
        image = self._resolve(d["image"], row, "image")
        prompt = d.get("prompt") or d.get("caption")
        if not isinstance(prompt, (str, type(None))):
            raise BadSample(f"{row.where}: prompt/caption must be a string, got {type(prompt).__name__}")
        sources = d.get("sources", [d["image"]] if task.target_is_source else [])
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list):
            raise BadSample(f"{row.where}: 'sources' must be a list of paths, got {sources!r}")
        prompt = _checked_prompt(task, prompt, len(sources), f"{row.where} ({image.name})")
        target = open_image(image, f"{row.where} ({image})", self.min_size if size is None else 0,
                            draft=size or self.resolution)
        images = [open_image(self._resolve(s, row, "source"), f"{row.where} ({s})") for s in sources]
        return _make_sample(row.id, task, prompt, target, images, size or self.resolution)


def expand_shards(pattern: str | Path | list) -> list[Path]:
    """WebDataset-style shard names: a list, a glob ("shards/*.tar") or a brace range ("s-{000..009}.tar")."""
    if isinstance(pattern, (list, tuple)):
        return [Path(p) for p in pattern]
    pattern = str(pattern)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1)
                for p in expand_shards(pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():])]
    if any(c in pattern for c in "*?["):
        return sorted(Path(p) for p in glob.glob(pattern))
    return [Path(pattern)]


def shard_names(shards: list[Path]) -> list[str]:
    """Each shard's name in its samples' ids: its path relative to the folder all the shards share,
    without ".tar". Shards of one folder keep their stem ("000" for shards/000.tar, the ids before
    shards of several folders were told apart: caches made then stay valid); train/000.tar and
    extra/000.tar give "train/000" and "extra/000" (the stem alone paired one's captions with the
    other's cached latents)."""
    paths = [Path(os.path.abspath(p)) for p in shards]
    try:
        root = os.path.commonpath([p.parent for p in paths])
    except ValueError:  # no common folder (Windows drives): the whole path
        return [p.with_suffix("").as_posix() for p in paths]
    return [p.relative_to(root).with_suffix("").as_posix() for p in paths]


@dataclass
class _Member:
    offset: int
    size: int


class TarShards:
    """WebDataset-style tar shards (key.jpg|png|webp + key.txt or key.json) with random access.

    The index is built once by scanning the member headers (only the small .json members are
    read, for their task); `get` seeks to a member's offset. key.json has the manifest row fields
    (task, prompt/caption, sources), where a source names another member of the same key by its
    extension (e.g. "src.png" for key.src.png). id = "<shard>/<key>", the shard named by its path
    relative to the folder the given shards share, without ".tar" (`shard_names`): "000/key" when
    all are in one folder, "train/000/key" and "extra/000/key" for train/000.tar and extra/000.tar.
    Uncompressed tars only (a .tar.gz cannot seek). `by_task()` splits the samples per task like
    `Manifest.by_task`.
    """

    def __init__(self, shards: str | Path | list, resolution: int, min_size: int | None = None):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"TarShards: no shard matches {shards!r}")
        # where the samples come from (a resume compares it): the shards, or their first and count
        names = [str(p.resolve()) for p in self.shards]
        self.origin = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more shards"
        self.resolution = resolution
        self.min_size = _check_resolution(resolution, min_size)
        self.samples: list[tuple[int, str, dict[str, _Member]]] = []  # (shard index, key, ext -> member)
        self.sample_tasks: list[str] = []  # task of each sample ("" when its json is unusable)
        dropped = 0
        for si, path in enumerate(self.shards):
            if not path.is_file():
                raise ValueError(f"TarShards: shard {str(path)!r} not found")
            try:
                tf = tarfile.open(path, "r:")  # "r:" refuses compressed tars: offsets must be file offsets
            except tarfile.TarError as e:
                raise ValueError(f"TarShards: {path} is not an uncompressed tar ({e}); "
                                 f"repack it with `tar cf` (no compression) for random access") from None
            keys: dict[str, dict[str, _Member]] = {}
            tasks: dict[str, str] = {}
            with tf:
                try:
                    for m in tf:
                        if not m.isfile():
                            continue
                        d, _, base = m.name.rpartition("/")
                        stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                        if not dot:
                            continue
                        key = f"{d}/{stem}" if d else stem
                        keys.setdefault(key, {})[ext.lower()] = _Member(m.offset_data, m.size)
                        if ext.lower() == "json":
                            tasks[key] = _json_task(tf, m)
                except tarfile.TarError as e:
                    raise ValueError(f"TarShards: {path} is damaged ({e}); fix or remove the shard") from None
            for key in sorted(keys):
                if any(e in keys[key] for e in _TAR_IMAGE_EXTS):
                    self.samples.append((si, key, keys[key]))
                    self.sample_tasks.append(tasks.get(key, "t2i"))
                else:
                    dropped += 1
        if dropped:
            _log.warning("TarShards: %d keys without an image (%s) left out", dropped, "/".join(_TAR_IMAGE_EXTS))
        names = shard_names(self.shards)
        self.ids = [f"{names[si]}/{key}" for si, key, _ in self.samples]
        seen: dict[str, int] = {}
        for i, id in enumerate(self.ids):
            if id in seen:
                (a, ka, _), (b, kb, _) = self.samples[seen[id]], self.samples[i]
                raise ValueError(f"TarShards: {self.shards[a]}:{ka} and {self.shards[b]}:{kb} share the id {id!r} "
                                 f"(the caches are keyed by id); give each shard once, or rename one of them")
            seen[id] = i
        _log.info("TarShards: %d samples in %d shards", len(self.samples), len(self.shards))

    def __len__(self) -> int:
        return len(self.samples)

    def tasks(self) -> dict[str, int]:
        """Samples per task (samples whose json is unusable left out)."""
        return {t: c for t in TASKS if (c := self.sample_tasks.count(t))}

    def by_task(self) -> dict[str, Subset]:
        """One source per task present, for `TaskMixture`."""
        return {t: Subset(self, [i for i, x in enumerate(self.sample_tasks) if x == t]) for t in self.tasks()}

    def _read(self, si: int, m: _Member) -> bytes:
        # A fresh handle per read: safe in forked DataLoader workers (no shared file offset).
        with open(self.shards[si], "rb") as f:
            f.seek(m.offset)
            data = f.read(m.size)
        if len(data) != m.size:
            raise BadSample(f"{self.shards[si]}: member truncated ({len(data)} of {m.size} bytes)")
        return data

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of sample `index`'s target image, from its header (the member is read,
        not decoded)."""
        si, key, members = self.samples[index]
        ext = next(e for e in _TAR_IMAGE_EXTS if e in members)
        return read_image_size(self._read(si, members[ext]), f"{self.shards[si].name}:{key}.{ext}")

    def get(self, index: int, size: tuple[int, int] | None = None) -> Sample:
        """Sample `index`, its target at the square resolution, or at a bucket's (H, W) size."""
        si, key, members = self.samples[index]
        shard = self.shards[si]
        name = f"{shard.name}:{key}"
        ext = next(e for e in _TAR_IMAGE_EXTS if e in members)
        row: dict = {}
        if "json" in members:
            try:
                row = json.loads(self._read(si, members["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSample(f"{name}.json: malformed JSON ({e})") from None
            if not isinstance(row, dict):
                raise BadSample(f"{name}.json: expected a JSON object, got {type(row).__name__}")
        try:
            task = get_task(row.get("task", "t2i"))
        except ValueError as e:
            raise BadSample(f"{name}.{ext}: {e}") from None
        prompt = row.get("prompt") or row.get("caption")
        if not isinstance(prompt, (str, type(None))):
            raise BadSample(f"{name}.json: prompt/caption must be a string, got {type(prompt).__name__}")
        if prompt is None and "txt" in members:
            try:
                prompt = self._read(si, members["txt"]).decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise BadSample(f"{name}.txt: unreadable caption ({e})") from None
        sources = row.get("sources", [ext] if task.target_is_source else [])
        sources = sources if isinstance(sources, list) else [sources]
        prompt = _checked_prompt(task, prompt, len(sources), f"{name}.{ext}")
        images = []
        for s in sources:
            s = str(s).lower()
            if s not in members:
                raise BadSample(f"{name}: source member {key}.{s} not found in {shard.name}")
            images.append(open_image(self._read(si, members[s]), f"{name}.{s}"))
        target = open_image(self._read(si, members[ext]), f"{name}.{ext}", self.min_size if size is None else 0,
                            draft=size or self.resolution)
        return _make_sample(self.ids[index], task, prompt, target, images, size or self.resolution)


_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _json_task(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """The task a sample's json names; "" when it is unreadable, malformed or names an unknown task."""
    try:
        row = json.loads(tf.extractfile(member).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    task = row.get("task", "t2i") if isinstance(row, dict) else ""
    return task if isinstance(task, str) and task in TASKS else ""


def load_sources(data: str | Path | list, resolution: int, min_size: int | None = None) -> dict[str, Source]:
    """Sources per task from a path: an image folder (t2i), a .jsonl/.parquet manifest, or tar shards
    (a .tar, a glob or a brace range, or a list of them)."""
    if isinstance(data, (list, tuple)) or str(data).endswith(".tar") or any(c in str(data) for c in "*?[{"):
        return TarShards(data, resolution, min_size).by_task()
    path = Path(data)
    if path.is_dir():
        return {"t2i": ImageFolder(path, resolution, min_size)}
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return Manifest(path, resolution, min_size).by_task()
    raise ValueError(f"training data {str(data)!r}: expected an image folder, a .jsonl/.parquet manifest, "
                     f"or tar shards (a .tar path, a glob or a brace range such as shards-{{000..009}}.tar)")
