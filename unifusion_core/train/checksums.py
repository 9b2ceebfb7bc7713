"""Per-item checksums for the trainer's safetensors caches (the feature cache and the latent cache).

Each item's sha256 (its tensors' bytes, after a text such as its prompt or id) is written in its
shard's metadata under "checksums" and checked the first time the item is read in a process. A
shard found damaged is renamed `damaged-<name>` (kept for inspection, never read again) and its
items forgotten, so the cache that holds them encodes them again or refuses with the shard's path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

META_KEY = "checksums"  # the shard metadata entry: json {id: sha256}
DAMAGED = "damaged-"  # a shard whose items do not match their checksums is renamed with this prefix


def checksum(tensors: Iterable[Tensor], text: str = "") -> str:
    """sha256 of text, then of each tensor's stored bytes in the order given."""
    h = hashlib.sha256(text.encode())
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def recorded(meta: dict[str, str], ids: Iterable[str], path: Path, log: logging.Logger,
             label: str) -> dict[str, str | None]:
    """The checksums a shard's metadata records for ids (None: none recorded); a shard written without
    them (by an older version) is read with a warning."""
    sums = json.loads(meta.get(META_KEY, "{}"))
    out = {i: sums.get(i) for i in ids}
    if any(s is None for s in out.values()):
        log.warning("%s: %s was written without checksums (an older version), so damage to it cannot be found; "
                    "delete it to have its items encoded again with them", label, path.name)
    return out


def first_read_ok(id: str, tensors: Iterable[Tensor], text: str, sums: dict[str, str | None],
                  verified: set[str]) -> bool:
    """Whether an item read from disk is as written: checked on its first read (then kept in verified);
    an item with no recorded checksum passes unchecked."""
    if id in verified or sums.get(id) is None:
        return True
    if checksum(tensors, text) != sums[id]:
        return False
    verified.add(id)
    return True


def set_aside(shard: Path, index: dict[str, Path], verified: set[str], log: logging.Logger, label: str) -> list[str]:
    """Rename a damaged shard out of its cache (kept for inspection) and forget its items: they are
    removed from index (id -> shard) and verified; returns them."""
    lost = [i for i, where in index.items() if where == shard]
    for i in lost:
        del index[i]
        verified.discard(i)
    try:
        os.replace(shard, shard.with_name(DAMAGED + shard.name))
    except OSError as e:  # read-only, or set aside by another process: the next open checks it again
        log.warning("%s: could not set %s aside (%s)", label, shard.name, e)
    return lost
