"""The converted-weights cache of .gguf files: a GGUF is dequantised and its tokenizer converted
by transformers once (about 30 s for SmolLM2-135M on 2 CPU cores), then kept as a plain Hugging
Face folder that later loads read in under a second."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Where load_vlm keeps the converted weights of .gguf files (None: no cache). A setting, not an
# environment variable: the CLI points it at ~/.cache/unifusion/gguf, the nodes at ComfyUI's temp
# folder, the tests at a temporary folder; `load_vlm(..., cache_dir=)` overrides it per call.
# Set it here (encoders.gguf_cache.GGUF_CACHE = ...): load_vlm reads it at each call.
GGUF_CACHE: Path | None = None
CACHE_FORMAT = 1


def cache_entry(path: Path, dtype: torch.dtype, cache: Path) -> Path:
    """The entry of a .gguf file in the cache folder: keyed by the file's path, size and
    modification time, the dtype, the transformers version and the cache format."""
    import transformers

    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, str(dtype), transformers.__version__,
                      CACHE_FORMAT])
    return cache / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def write_entry(entry: Path, model, tokenizer, gguf: Path) -> None:
    """Save a converted GGUF model as a Hugging Face folder, atomically (a temporary folder renamed
    into place, `complete.json` last); older entries of the same file are removed. A failure (disk
    full, no permission) only costs the next load its speed: it is logged, never raised."""
    from safetensors.torch import save_model as save_safetensors

    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, str(tmp / "model.safetensors"))  # tied embeddings are stored once
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
        if entry.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another process was first
        else:
            os.replace(tmp, entry)
        for old in entry.parent.glob(f"{gguf.stem}-*/complete.json"):  # this file's earlier versions
            if old.parent != entry and json.loads(old.read_text()).get("gguf") == str(gguf.resolve()):
                shutil.rmtree(old.parent, ignore_errors=True)
        log.info("kept the converted weights of %s in %s", gguf.name, entry)
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not keep the converted weights of %s in %s (%s); the next load converts again", gguf.name,
                    entry.parent, e)
