"""An opt-in on-disk cache of encoder features for small training runs, keyed by cond_id.

LAP is trainable, so the cache holds the raw states of every selected VLM layer (about 18 MB per
256-token sample for a 3584-wide, 10-layer selection): fine for a few thousand prompts, not for a
100 k-sample run, where the frozen VLM runs online. Features are stored in fp16 safetensors shards;
each shard's metadata describes the encoder, layer selection, system prompt and rewrite setting
that made it, so a cache is never read by a run it does not fit. Items are keyed by `cond_id`,
never by position (diffusers #14430 paired cached latents with the wrong captions). Each item's
checksum is written with it and checked when it is first read: a damaged shard is set aside and
its items encoded again by build(), or refused by get() with its path.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..config import EncoderSpec
from ..features import Features
from .checksums import DAMAGED, META_KEY, checksum, first_read_ok, recorded, set_aside

log = logging.getLogger(__name__)

FORMAT, VERSION = "unifusion-feature-cache", 1
SHARD_GLOB = "shard-*.safetensors"  # complete shards only: a write goes to a temporary name first
FP16_MAX = torch.finfo(torch.float16).max
FIELDS = ("hidden", "positions", "sequence_ids", "image_index")  # tensors stored per item


class FeatureCache:
    """Encoder features by cond_id in fp16 safetensors shards that each record the encoder that made them."""

    def __init__(self, root: str | os.PathLike, spec: EncoderSpec, rewrite: bool, max_new_tokens: int = 256,
                 shard_size: int = 256):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1 item, got {shard_size}")
        self.root, self.spec, self.rewrite = Path(root), spec, bool(rewrite)
        self.max_new_tokens = max_new_tokens if rewrite else None  # the rewrites' length bound
        self.shard_size = shard_size
        self.index: dict[str, Path] = {}  # cond_id -> the shard that holds it
        self.texts: dict[str, str] = {}  # cond_id -> Features.text (the rewrite, or the prompt)
        self.pending: dict[str, dict[str, Tensor]] = {}  # put but not yet flushed
        self.sums: dict[str, str | None] = {}  # cond_id -> the checksum written with it (None: an older shard)
        self.verified: set[str] = set()  # read and found as written, in this process
        self._handles: dict[Path, object] = {}
        for shard in sorted(self.root.glob(SHARD_GLOB)):
            self._add_shard(shard)

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, spec: EncoderSpec, rewrite: bool, max_new_tokens: int = 256,
               shard_size: int = 256) -> FeatureCache:
        """A cache in `root` (made if missing); one already there must match spec and rewrite."""
        Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root, spec, rewrite, max_new_tokens, shard_size)

    @classmethod
    def open(cls, root: str | os.PathLike, spec: EncoderSpec, rewrite: bool, max_new_tokens: int = 256,
             shard_size: int = 256) -> FeatureCache:
        """An existing cache; refused (ValueError) if built with another encoder, layers, system prompt or rewrite."""
        if not Path(root).is_dir():
            raise FileNotFoundError(f"no feature cache at {root}; "
                                    f"make one with FeatureCache.create({str(root)!r}, ...)")
        return cls(root, spec, rewrite, max_new_tokens, shard_size)

    open_or_create = create

    def identity(self) -> dict[str, str]:
        """The shard metadata that must match for a cache to be reused."""
        return {
            "format": FORMAT,
            "version": str(VERSION),
            "encoder": json.dumps(asdict(self.spec)),  # family, name, widths, layers, system prompt
            "rewrite": json.dumps(self.rewrite),
            "max_new_tokens": json.dumps(self.max_new_tokens),
        }

    def _add_shard(self, path: Path) -> None:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:  # written outside this class, or damaged since
            log.warning("feature cache %s: skipping unreadable shard %s (%s); its items will be encoded again",
                        self.root, path.name, e)
            return
        self._check_identity(meta, path)
        ids = json.loads(meta["ids"])
        texts = json.loads(meta["texts"])
        sums = recorded(meta, ids, path, log, f"feature cache {self.root}")
        for cid in ids:
            if cid not in self.index:  # the first shard to hold an id wins
                self.index[cid], self.texts[cid], self.sums[cid] = path, texts[cid], sums[cid]

    def _check_identity(self, meta: dict[str, str], path: Path) -> None:
        fix = f"delete {self.root} or pass another cache directory"
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise ValueError(
                f"feature cache {self.root}: {path.name} is not a {FORMAT} v{VERSION} shard (format "
                f"{meta.get('format')!r} v{meta.get('version')}); {fix}"
            )
        ours = self.identity()
        theirs = {k: meta.get(k, "") for k in ours}
        if theirs == ours:
            return
        try:
            built = EncoderSpec(**json.loads(theirs["encoder"]))
        except (TypeError, ValueError):
            raise ValueError(f"feature cache {self.root}: {path.name} has an unreadable encoder record; "
                             f"{fix}") from None
        fields = {
            "encoder": lambda s: f"{s.family}/{s.name}",
            "width": lambda s: s.hidden_size,
            "depth": lambda s: s.num_layers,
            "layers": lambda s: list(s.layers),
        }
        diffs = [f"{k} {get(built)!r} vs {get(self.spec)!r}" for k, get in fields.items()
                 if get(built) != get(self.spec)]
        a, b = built.system_prompt, self.spec.system_prompt
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"system prompt {_short(a)!r} vs {_short(b)!r} (from character {at})")
        for key in ("rewrite", "max_new_tokens"):
            if theirs[key] != ours[key]:
                diffs.append(f"{key} {json.loads(theirs[key] or 'null')!r} vs {json.loads(ours[key])!r}")
        raise ValueError(
            f"feature cache {self.root} was built with {_describe(built, json.loads(theirs['rewrite'] or 'null'))}, "
            f"this run uses {_describe(self.spec, self.rewrite)} (differs: {'; '.join(diffs)}); {fix}"
        )

    # --- reading ----------------------------------------------------------------------------------

    def __contains__(self, cond_id: str) -> bool:
        return cond_id in self.index or cond_id in self.pending

    def __len__(self) -> int:
        return len(self.index.keys() | self.pending.keys())

    def missing(self, ids: list[str]) -> list[str]:
        """The ids not cached yet, in the given order, each once."""
        return [cid for cid in dict.fromkeys(ids) if cid not in self]

    def get(self, cond_id: str) -> Features:
        """The Features stored for cond_id (hidden back in fp32); ValueError when its shard is damaged."""
        if cond_id in self.pending:
            item = self.pending[cond_id]
        elif cond_id in self.index:
            shard = self.index[cond_id]
            item = self._read(cond_id)
            if item is None:
                raise ValueError(
                    f"feature cache {self.root}: the features of {cond_id!r} in {shard} do not match the checksum "
                    f"written with them (the file was damaged since); it is set aside as {DAMAGED}{shard.name}: "
                    "build() encodes its items again"
                )
        else:
            raise KeyError(f"{cond_id!r} is not in the feature cache {self.root}; fill it with build() or put()")
        image_index = item["image_index"].long()
        return Features(
            hidden=item["hidden"].float(), layers=self.spec.layers, encoder=self.spec, text=self.texts[cond_id],
            sequence_ids=item["sequence_ids"].tolist(), positions=item["positions"].long(),
            is_image=image_index >= 0, image_index=image_index,
        )

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path]

    def _read(self, cond_id: str) -> dict[str, Tensor] | None:
        """The stored tensors of cond_id, checked against its checksum on the first read; None (the
        shard set aside) when they do not match."""
        shard = self.index[cond_id]
        f = self._handle(shard)
        item = {k: f.get_tensor(f"{k}/{cond_id}") for k in FIELDS}
        if first_read_ok(cond_id, (item[k] for k in FIELDS), self.texts[cond_id], self.sums, self.verified):
            return item
        self._set_aside(shard, cond_id)
        return None

    def _set_aside(self, shard: Path, cond_id: str) -> None:
        """Rename a damaged shard out of the cache (kept for inspection) and forget its items."""
        self._handles.pop(shard, None)
        lost = set_aside(shard, self.index, self.verified, log, f"feature cache {self.root}")
        log.warning("feature cache %s: the features of %r in %s do not match the checksum written with them (the "
                    "file was damaged since); set aside as %s%s, its %d items are encoded again by build(); "
                    "delete it once the cache is whole again", self.root, cond_id, shard, DAMAGED, shard.name,
                    len(lost))

    # --- writing ----------------------------------------------------------------------------------

    def put(self, cond_id: str, features: Features) -> None:
        """Buffer the features of cond_id (stored as fp16); every shard_size items go to a new shard.

        An id already cached is kept as it is (its features depend only on the conditioning).
        """
        if not isinstance(cond_id, str) or not cond_id:
            raise ValueError(f"cond_id must be a non-empty string, got {cond_id!r}")
        if features.layers != self.spec.layers or (features.encoder is not None and features.encoder != self.spec):
            source = _describe(features.encoder, None) if features.encoder else "an unknown encoder"
            raise ValueError(
                f"features for {cond_id!r} come from {source} with layers {list(features.layers)}; "
                f"the cache {self.root} holds {_describe(self.spec, self.rewrite)}"
            )
        if cond_id in self:
            log.debug("feature cache %s: %r already cached, kept", self.root, cond_id)
            return
        hidden = features.hidden.detach().to("cpu", torch.float16).contiguous()  # (T, L, D)
        if not bool(torch.isfinite(hidden).all()):
            raise ValueError(
                f"features for {cond_id!r} exceed the fp16 range (largest |value| "
                f"{features.hidden.abs().max().item():.4g} > {FP16_MAX:.0f}); this encoder cannot use the fp16 cache"
            )
        T = hidden.shape[0]
        positions = features.positions if features.positions is not None else torch.arange(T)
        image_index = features.image_index if features.image_index is not None else torch.full((T,), -1)
        self.pending[cond_id] = {
            "hidden": hidden,
            "positions": positions.to("cpu", torch.int32).contiguous(),
            "sequence_ids": torch.tensor(features.sequence_ids, dtype=torch.int32),
            "image_index": image_index.to("cpu", torch.int32).contiguous(),
        }
        self.texts[cond_id] = features.text
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered items to a new shard: a temporary file, then renamed (atomic)."""
        if not self.pending:
            return
        name = uuid.uuid4().hex
        final, partial = self.root / f"shard-{name}.safetensors", self.root / f".partial-{name}.tmp"
        ids = list(self.pending)
        tensors = {f"{k}/{cid}": item[k] for cid, item in self.pending.items() for k in FIELDS}
        sums = {cid: checksum((self.pending[cid][k] for k in FIELDS), self.texts[cid]) for cid in ids}
        meta = self.identity() | {"ids": json.dumps(ids), "texts": json.dumps({cid: self.texts[cid] for cid in ids}),
                                  META_KEY: json.dumps(sums)}
        try:
            save_file(tensors, str(partial), metadata=meta)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        for cid in ids:
            self.index[cid], self.sums[cid] = final, sums[cid]
            self.verified.add(cid)  # written from memory
        self.pending.clear()
        log.info("feature cache %s: wrote %d items to %s (%d in all)", self.root, len(ids), final.name, len(self))

    def close(self) -> None:
        """Flush and release the open shards."""
        self.flush()
        self._handles.clear()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self, vlm, items: list[tuple[str, str]], rewrite: bool | None = None, batch_size: int = 32) -> int:
        """Encode the (cond_id, prompt) items not cached yet with vlm.encode_batch; returns how many.

        With rewrite, the VERIFI rewrites are made once (greedy, vlm.rewrite_batch) and the features
        computed by a teacher-forced forward. Written shard by shard: an interrupted build keeps
        every complete shard. `rewrite`, if given, must be the cache's own setting.
        """
        if rewrite is not None and bool(rewrite) != self.rewrite:
            raise ValueError(
                f"feature cache {self.root} holds rewrite={self.rewrite} features, "
                f"asked to build rewrite={bool(rewrite)}; "
                "open the cache with the rewrite setting of this run or pass another cache directory"
            )
        spec = vlm.encoder_spec(self.spec.layers, self.spec.system_prompt)
        if spec != self.spec:
            raise ValueError(
                f"feature cache {self.root} holds {_describe(self.spec, self.rewrite)}, but the encoder given is "
                f"{_describe(spec, self.rewrite)}; build it with the encoder it was made for "
                "or pass another cache directory"
            )
        prompts: dict[str, str] = {}
        for cid, prompt in items:
            if prompts.setdefault(cid, prompt) != prompt:
                raise ValueError(
                    f"cond_id {cid!r} is given two prompts, {prompts[cid]!r} and {prompt!r}; ids must be unique"
                )
        for cid in prompts:  # what is cached is read once here: a damaged shard's items are encoded again
            if cid in self.index and cid not in self.verified:
                self._read(cid)
        todo = self.missing(list(prompts))
        for start in range(0, len(todo), self.shard_size):
            chunk = todo[start : start + self.shard_size]
            texts = [prompts[cid] for cid in chunk]
            rewrites = (
                vlm.rewrite_batch(texts, self.spec.system_prompt, self.max_new_tokens, batch_size=batch_size)
                if self.rewrite else None
            )
            feats = vlm.encode_batch(texts, rewrite=self.rewrite, system_prompt=self.spec.system_prompt,
                                     layers=self.spec.layers, batch_size=batch_size, rewrites=rewrites)
            for cid, f in zip(chunk, feats):
                self.put(cid, f)
            self.flush()
        return len(todo)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _describe(spec: EncoderSpec, rewrite: bool | None) -> str:
    out = f"{spec.name} layers {list(spec.layers)} system prompt {_short(spec.system_prompt)!r}"
    return out if rewrite is None else f"{out} rewrite={rewrite}"
