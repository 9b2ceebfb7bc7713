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

Trusted: a state holding NaN or inf is never written (`NonFiniteError`), `meta.json` records the
sha256 of every shard, and a state whose shards no longer match (damaged or modified since) or
whose tensors are not finite is refused on load (`StateError`, naming the state before it).
"""

from __future__ import annotations

import hashlib
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

from .dist import Dist, local

log = logging.getLogger(__name__)

FORMAT = "unifusion-train-state"
VERSION = 2
_NAME = re.compile(r"^step-(\d{8})$")
_OLD = re.compile(r"^state-(\d{8})\.safetensors$")  # version 1: one file per state


class StateError(ValueError):
    """A training state that cannot be resumed: incomplete, damaged, modified since it was written,
    or holding non-finite values. The message names the state and the one before it."""


class NonFiniteError(RuntimeError):
    """NaN or inf where the run needs finite numbers (a step's loss or gradient norm, a state or
    an export about to be written); what was already written is kept."""


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


def previous_state(path: Path) -> Path | None:
    """The newest complete state of the same run older than `path` (None when there is none)."""
    path = Path(path)
    m = _NAME.match(path.name)
    try:
        older = [p for step, p in list_states(path.parent.parent) if m is None or step < int(m.group(1))]
    except (OSError, ValueError):
        return None
    return older[-1] if older else None


def refuse(path: Path, why: str) -> StateError:
    """The error for a state that cannot be resumed: what is wrong, and the state to resume instead."""
    prev = previous_state(path)
    instead = (f"resume from the state before it: --resume {prev}" if prev is not None
               else "no earlier state of this run is kept")
    return StateError(f"{path}: {why}; refusing to resume from it ({instead})")


def nonfinite(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors holding NaN or inf (this rank's shards)."""
    flags: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for k, v in tensors.items():
        if torch.is_tensor(v) and v.is_floating_point():
            v = local(v)
            flags.setdefault(v.device, []).append((k, torch.isfinite(v).all()))
    bad = []
    for pairs in flags.values():  # one sync a device
        ok = torch.stack([f for _, f in pairs]).tolist()
        bad += [k for (k, _), good in zip(pairs, ok) if not good]
    return bad


def _flat(state: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def _all_nonfinite(state: dict, d: Dist) -> list[str]:
    """Every rank's non-finite tensor names (the same list on every rank)."""
    return sorted({k for names in d.gather_objects(nonfinite(_flat(state))) for k in names})


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "meta.json")


def _checksums(folder: Path, names: list[str], d: Dist) -> dict[str, str]:
    """sha256 of the named files of `folder`, each rank hashing its share (a collective)."""
    mine = {n: _sha256(folder / n) for n in names[d.rank::d.world] if (folder / n).is_file()}
    return {k: v for part in d.gather_objects(mine) for k, v in part.items()}


def verify_checksums(path: Path, record: dict, d: Dist = Dist()) -> None:
    """Refuse a state whose shards differ from the checksums recorded when it was written (a
    collective: every rank hashes its share). States written before checksums were recorded are
    read with a warning."""
    path = Path(path)
    recorded = record.get("sha256")
    if recorded is None:
        log.warning("%s was written without checksums (an older trainer): its shards are not verified", path)
        return
    missing = sorted(n for n in recorded if not (path / n).is_file())
    if missing:
        raise refuse(path, f"shards {missing} are missing")
    found = _checksums(path, sorted(recorded), d)
    changed = sorted(n for n in recorded if found.get(n) != recorded[n])
    if changed:
        raise refuse(path, f"{changed} do not match the sha256 recorded when the state was written "
                           "(the files were damaged or modified since)")


def _dcp_state(model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """What DCP saves and loads: model and optimizer state keyed by parameter name (sharded
    DTensors under FSDP, plain tensors in one process), and the fp32 EMA. The optimizer's param
    groups are not saved: they follow from the run's settings (the lr is set every step)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optim": optim["state"], "ema": ema}, optim


def save_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               meta: dict, d: Dist = Dist()) -> None:
    """Write the whole training state atomically (a collective: every process calls it), with
    the sha256 of every shard in meta.json. A state holding NaN or inf is not written at all:
    NonFiniteError, and the states already saved stay as they are."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state, _ = _dcp_state(model, ema, optimizer)
    bad = _all_nonfinite(state, d)
    if bad:
        raise NonFiniteError(f"the training state at step {meta.get('step')} holds NaN or inf in {len(bad)} tensors "
                             f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): {path} was not written "
                             "and the states already saved are kept")
    tmp = path.with_name(path.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    with _one_process_is_fine():
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    d.barrier()  # every shard written
    sums = _checksums(tmp, _shards(tmp), d)
    if d.main:
        record = {"format": FORMAT, "format_version": VERSION, "world_size": d.world, "sha256": sums, "meta": meta}
        (tmp / "meta.json").write_text(json.dumps(record))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    d.barrier()


def read_meta(path: Path) -> dict:
    path = Path(path)
    try:
        record = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise refuse(path, f"not a complete training state ({e})") from None
    if record.get("format") != FORMAT:
        raise StateError(f"{path} is not a UniFusion training state (format {record.get('format')!r})")
    return record


def load_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               d: Dist = Dist()) -> dict:
    """Restore what save_state wrote into model, ema and optimizer (in place, into whatever
    sharding they have now); returns the meta dict. A collective under torchrun. Refused
    (StateError) when its shards do not match their checksums or it holds NaN or inf."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    record = read_meta(path)
    verify_checksums(path, record, d)
    reader = dcp.HuggingFaceStorageReader(str(path))
    try:
        saved = set(reader.read_metadata().state_dict_metadata)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise refuse(path, f"cannot read the training state ({e})") from None
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
    bad = _all_nonfinite(state, d)  # a state written before the trainer checked (or without checksums)
    if bad:
        raise refuse(path, f"it holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:5])})")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(strict=False))
    return record["meta"]


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a state, whole (for tools and tests; one process; checksums verified)."""
    import torch.distributed.checkpoint as dcp

    verify_checksums(path, read_meta(path))
    reader = dcp.HuggingFaceStorageReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    with _one_process_is_fine():
        dcp.load(out, storage_reader=reader)
    return out


def prune_states(run_dir: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` states (and stray temporaries). upto: the step just saved;
    states after it (left by the run before a resume from an older state) are not counted, nor
    deleted: a good state is never pruned because of them."""
    states = [(s, p) for s, p in list_states(run_dir) if upto is None or s <= upto]
    for _, p in states[: max(0, len(states) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    for tmp in (Path(run_dir) / "checkpoints").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
