"""Training state on disk: model, EMA, optimizer, data position and step, one folder per state.

Written with `torch.distributed.checkpoint` (DCP) in safetensors files: each process writes the
shards it holds (`shard-0000R-...safetensors`, each with its offsets in the header), and DCP
reads them back into any sharding, so a state saved by N processes resumes on M (or on one, with
no process group at all). Safetensors only: nothing is unpickled on resume (DCP's default
format pickles its metadata; its Hugging Face storage keeps the metadata in the safetensors
headers). `meta.json` beside the shards holds the step, the data position (the task mixture's
state), the settings and the world size that wrote it.

Atomic: the state is written into `step-N.tmp/`, `meta.json` last, and renamed to `step-N/`
once every process has written its shards; a folder named `step-N/` with a `meta.json` is
complete (a run killed mid-save leaves only a stray `.tmp`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .dist import Dist

log = logging.getLogger(__name__)

FORMAT = "unifusion-train-state"
VERSION = 2
_NAME = re.compile(r"^step-(\d{8})$")
_OLD = re.compile(r"^state-(\d{8})\.safetensors$")  # version 1: one file per state


@contextmanager
def _one_process_is_fine():
    """DCP warns on every call without a process group; one process is a run of ours too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_states(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete states of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p / "meta.json").is_file()]
    if not found and any(_OLD.match(p.name) for p in folder.iterdir()):
        raise ValueError(f"{folder} holds training states of an older version of the trainer (one .safetensors file "
                         "per state); finish that run with the version that started it, or start a new run")
    return sorted(found)


def _dcp_state(model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """What DCP saves and loads: model and optimizer state keyed by parameter name (sharded
    DTensors under FSDP, plain tensors in one process), and the fp32 EMA. The optimizer's param
    groups are not saved: they follow from the run's settings (the lr is set every step)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optim": optim["state"], "ema": ema}, optim


def save_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               meta: dict, d: Dist = Dist()) -> None:
    """Write the whole training state atomically (a collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    state, _ = _dcp_state(model, ema, optimizer)
    with _one_process_is_fine():
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    d.barrier()  # every shard written
    if d.main:
        record = {"format": FORMAT, "format_version": VERSION, "world_size": d.world, "meta": meta}
        (tmp / "meta.json").write_text(json.dumps(record))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    d.barrier()


def read_meta(path: Path) -> dict:
    path = Path(path)
    try:
        record = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a complete training state ({e}); resume from another one") from None
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a UniFusion training state (format {record.get('format')!r})")
    return record


def load_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_state wrote into model, ema and optimizer (in place, into whatever
    sharding they have now); returns the meta dict. A collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    record = read_meta(path)
    reader = dcp.HuggingFaceStorageReader(str(path))
    try:
        saved = set(reader.read_metadata().state_dict_metadata)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: cannot read the training state ({e}); "
                         "delete it to resume from the one before") from None
    state, optim = _dcp_state(model, ema, optimizer)
    wanted = {f"model.{k}" for k in state["model"]} | {f"ema.{k}" for k in ema}
    if wanted - saved:
        missing = sorted(wanted - saved)
        raise ValueError(f"{path}: the training state does not match this model (missing {missing[:5]}); resume with "
                         "the same model settings it was started with")
    # Parameters the state holds no optimizer moments for (an adapter that was frozen) start fresh.
    for name in list(state["optim"]):
        if any(f"optim.{name}.{field}" not in saved for field in state["optim"][name]):
            del state["optim"][name]
            optim["state"].pop(name, None)
    with _one_process_is_fine():
        dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(strict=False))
    return record["meta"]


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a state, whole (for tools and tests; one process)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    with _one_process_is_fine():
        dcp.load(out, storage_reader=reader)
    return out


def prune_states(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` states (and stray temporaries)."""
    states = list_states(run_dir)
    for _, p in states[: max(0, len(states) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    for tmp in (Path(run_dir) / "checkpoints").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
