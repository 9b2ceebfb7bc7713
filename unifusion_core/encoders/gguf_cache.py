"""The converted-weights cache of .gguf files: a GGUF is dequantised and its tokenizer converted
by transformers once (about 30 s for SmolLM2-135M on 2 CPU cores), then kept as a plain Hugging
Face folder that later loads read in under a second. Every file of an entry is checked against the
checksum recorded when it was written; a damaged entry is converted again and replaced. A GGUF keeps
one entry per dtype it is loaded at (float32 on a CPU, bfloat16 on a GPU by default), so switching
between them does not convert again; an entry of an older version of the file is removed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from .. import guard

log = logging.getLogger(__name__)

# Where load_vlm keeps the converted weights of .gguf files (None: no cache). A setting, not an
# environment variable: the CLI points it at ~/.cache/unifusion/gguf, the nodes at ComfyUI's temp
# folder, the tests at a temporary folder; `load_vlm(..., cache_dir=)` overrides it per call.
# Set it here (encoders.gguf_cache.GGUF_CACHE = ...): load_vlm reads it at each call.
GGUF_CACHE: Path | None = None
CACHE_FORMAT = 2  # 2: complete.json records the size and sha256 of every file of the entry
RECORD = "complete.json"  # written last: an entry without it never finished
CHUNK = 64 << 20  # files are hashed in chunks of this size, in parallel
PIECE = 16 << 20  # a large tensor is dequantised this many bytes of its GGUF blocks at a time (Cancel between)
# The folders a write works in (write_entry's .tmp<pid>, _install's .old<pid>): a process killed
# while writing leaves one, up to the size of the whole model.
TEMP_FOLDER = re.compile(r".+\.(?:tmp|old)(\d+)")
STALE_TEMP_S = 24 * 3600  # a temp folder nothing was written to for a day is left over, whatever its pid says


def cache_entry(path: Path, dtype: torch.dtype, cache: Path) -> Path:
    """The entry of a .gguf file in the cache folder: keyed by the file's path, size and
    modification time, the dtype, the transformers version and the cache format."""
    import transformers

    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, str(dtype), transformers.__version__,
                      CACHE_FORMAT])
    return cache / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# --- checksums -----------------------------------------------------------------------------------


def _chunk_digest(path: Path, start: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = CHUNK
        while left and (block := f.read(min(left, 4 << 20))):
            h.update(block)
            left -= len(block)
    return h.digest()


def checksum(path: Path) -> str:
    """sha256 of the sha256 of each 64 MiB chunk of the file, the chunks hashed on several threads.

    The whole file, not samples of it: damage smaller than the gaps between samples would pass (a
    crash can leave a few 4 KiB pages of zeros), and the load that follows reads every byte anyway,
    so the hash costs its arithmetic, not a second read from disk; hashlib releases the GIL, so the
    chunks are hashed on all cores."""
    starts = range(0, path.stat().st_size, CHUNK)
    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1, 8) or 1) as pool:
        digests = list(pool.map(partial(_chunk_digest, path), starts))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def record(folder: Path, gguf: Path, dtype: torch.dtype) -> dict:
    """What complete.json holds: the GGUF converted, the dtype it was stored at, and each file's size
    and checksum."""
    files = {p.name: [p.stat().st_size, checksum(p)] for p in sorted(folder.iterdir()) if p.name != RECORD}
    return {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "dtype": str(dtype), "format": CACHE_FORMAT,
            "files": files}


def damage(entry: Path) -> str | None:
    """Why the entry cannot be trusted, or None when every file is as it was written."""
    try:
        files = json.loads((entry / RECORD).read_text())
    except FileNotFoundError:
        return f"it has no {RECORD}: its conversion never finished"
    except (OSError, ValueError) as e:
        return f"its {RECORD} is unreadable ({e})"
    try:
        expected = {name: (int(size), str(digest)) for name, (size, digest) in files["files"].items()}
    except (TypeError, KeyError, AttributeError, ValueError):
        expected = None
    if not expected:
        return f"its {RECORD} records no checksums of its files"
    for name, (size, _) in expected.items():  # sizes first: a truncated file costs no hashing
        try:
            actual = (entry / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written"
    for name, (_, digest) in expected.items():
        if checksum(entry / name) != digest:
            return f"{name} differs from the checksum recorded when it was written: it was changed or damaged since"
    return None


# --- writing -------------------------------------------------------------------------------------


def write_entry(entry: Path, model, tokenizer, gguf: Path) -> None:
    """Save a converted GGUF model as a Hugging Face folder, atomically: written in a temporary
    folder (complete.json, with every file's checksum, last), then renamed into place. A damaged
    entry there is replaced (renamed aside, the new one renamed in, the old removed); a good one,
    written by another process first, is kept. Older entries of the same file at the same dtype
    are removed, and so are the temp folders of writes that were killed. A failure (disk full, no
    permission) only costs the next load its speed: it is logged, never raised."""
    from safetensors.torch import save_model as save_safetensors

    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        _remove_stale_temp(entry.parent)
        tmp.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, str(tmp / "model.safetensors"))  # tied embeddings are stored once
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record(tmp, gguf, model.dtype)))  # the dtype load_vlm keyed it by
        done = _install(tmp, entry)
        _remove_older(entry, gguf, model.dtype)
        log.info({"kept": "kept the converted weights of %s in %s",
                  "replaced": "replaced the damaged converted weights of %s in %s",
                  "theirs": "kept the converted weights of %s that another process wrote first in %s; "
                            "this conversion is discarded"}[done], gguf.name, entry)
    except (OSError, ValueError) as e:
        log.warning("could not keep the converted weights of %s in %s (%s); the next load converts again", gguf.name,
                    entry.parent, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place


def _install(tmp: Path, entry: Path) -> str:
    """Rename the finished folder `tmp` to `entry`: 'kept' (none was there), 'replaced' (a damaged
    one was), or 'theirs' (a good one, written by another process, was there first: tmp stays)."""
    aside = entry.with_name(f"{entry.name}.old{os.getpid()}")
    replaced = False
    if entry.exists():
        if damage(entry) is None:
            return "theirs"
        try:
            os.rename(entry, aside)
            replaced = True
        except FileNotFoundError:  # another process moved it aside first
            pass
    try:
        os.rename(tmp, entry)
    except OSError:  # another process renamed its own in meanwhile
        return "theirs"
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return "replaced" if replaced else "kept"


def _remove_older(entry: Path, gguf: Path, dtype: torch.dtype) -> None:
    """Remove the entries of the same GGUF at the same dtype under another key (the file or
    transformers changed). Entries at other dtypes stay: a GUI loading a GGUF at bfloat16 and a CLI
    at float32 would otherwise convert it again at every switch. So a GGUF has at most one entry
    per dtype it is loaded at (in practice float32, bfloat16, float16: three)."""
    for old in entry.parent.glob(f"{gguf.stem}-*/{RECORD}"):
        try:
            found = json.loads(old.read_text())
            # An entry written before the dtype was recorded cannot say its own: removed as before,
            # which costs at most one more conversion of that dtype.
            if (old.parent != entry and found.get("gguf") == str(gguf.resolve())
                    and found.get("dtype", str(dtype)) == str(dtype)):
                shutil.rmtree(old.parent, ignore_errors=True)
        except (OSError, ValueError, AttributeError):
            continue  # another entry's damage is its own load's business


def _running(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (True where that cannot be asked)."""
    if os.name != "posix":  # Windows' os.kill(pid, 0) would terminate the process, not probe it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs, as another user; OverflowError: no pid
        return True
    return True


def _last_written(folder: Path) -> float:
    """The newest modification time of the folder and the files in it."""
    return max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])


def _remove_stale_temp(cache: Path) -> None:
    """Remove the temp folders that writes killed midway (SIGKILL, the OOM killer, power loss) left:
    nothing else ever would. One is stale when its pid runs no process here, or when nothing was
    written to it for a day (the pid reused, or Windows, where a pid cannot be probed). A cache
    folder shared by several machines could lose another machine's write in progress to the pid
    rule; that write then logs its failure and its next load converts again, nothing worse."""
    if not cache.is_dir():
        return
    now = time.time()
    for folder in cache.iterdir():
        match = TEMP_FOLDER.fullmatch(folder.name)
        if match is None or int(match[1]) == os.getpid() or not folder.is_dir():
            continue  # this process's own temp folders belong to writes in progress (other threads)
        try:
            if not _running(int(match[1])) or now - _last_written(folder) > STALE_TEMP_S:
                log.info("removing %s, left by a conversion that was killed while writing", folder)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # removed meanwhile by another process


# --- Cancel during a conversion --------------------------------------------------------------------

_patch_lock = threading.Lock()
_patch_depth = 0
_patched: list[tuple[object, str, object]] = []


def _checking(fn: Callable, every: int) -> Callable:
    """fn, running guard.check_cancel() before one call in `every`."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] % every == 0:
            guard.check_cancel()
        return fn(*args, **kwargs)

    return wrapper


def _dequantizing_in_pieces(fn: Callable) -> Callable:
    """gguf.dequantize, a large tensor's rows dequantised a few MiB at a time with
    guard.check_cancel() between them (quantised blocks never span rows: the result is the same)."""

    def dequantize(data, qtype):
        import numpy as np

        rows = max(1, PIECE // max(1, data[0].nbytes)) if data.ndim > 1 else len(data)
        if data.ndim < 2 or len(data) <= rows or getattr(qtype, "name", "") == "F32":  # F32: a view, no work
            guard.check_cancel()
            return fn(data, qtype)
        pieces = []
        for start in range(0, len(data), rows):
            guard.check_cancel()
            pieces.append(fn(data[start : start + rows], qtype))
        return np.concatenate(pieces)

    return dequantize


def _cancel_points() -> list[tuple[object, str, int]]:
    """Where transformers' GGUF conversion spends its time, with how often each place checks (0:
    the dequantiser, in pieces): the GGUF reader's parsing of the metadata (the vocabulary, string
    by string, read once for the config, once for the tokenizer and twice for the weights), the
    conversion of its values, the tensor-name map built module by module, and the dequantisation.
    Names missing in other versions are skipped: Cancel then lands later, never wrongly."""
    points: list[tuple[object, str, int]] = []
    try:
        import gguf
        from gguf.gguf_reader import GGUFReader

        points += [(GGUFReader, "_get_field_parts", 1024), (gguf, "dequantize", 0)]
    except ImportError:
        pass
    try:
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        points += [(hf_gguf, "_gguf_parse_value", 1024), (hf_gguf, "get_gguf_hf_weights_map", 1)]
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import reader as hf_reader

        points += [(hf_reader, "_read_string", 1024)]  # transformers' own reader of the metadata
    except ImportError:
        pass
    return [(owner, name, every) for owner, name, every in points if callable(vars(owner).get(name))]


@contextmanager
def cancellable() -> Iterator[None]:
    """Within this block, transformers' GGUF conversion runs guard.check_cancel() as it goes (a
    few times a second), so Cancel need not wait for the whole conversion. The reader and the
    dequantiser are wrapped for the block's duration only; outside an `interruptible` block (and
    on other threads) the check does nothing."""
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for owner, name, every in _cancel_points():
                original = vars(owner)[name]
                _patched.append((owner, name, original))
                setattr(owner, name, _checking(original, every) if every else _dequantizing_in_pieces(original))
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                while _patched:
                    owner, name, original = _patched.pop()
                    setattr(owner, name, original)
