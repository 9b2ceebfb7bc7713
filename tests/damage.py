"""Damage done to files on disk, the way a bad disk or an interrupted copy does it (for the tests
of what verifies its caches and states)."""

from __future__ import annotations

import json
from pathlib import Path


def flip(shard: Path, key: str, n: int = 8) -> None:
    """Invert n bytes in the middle of one stored tensor of a safetensors file."""
    raw = bytearray(shard.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + header])[key]["data_offsets"]
    at = 8 + header + (start + end) // 2
    raw[at : at + n] = bytes(b ^ 0xFF for b in raw[at : at + n])
    shard.write_bytes(bytes(raw))
