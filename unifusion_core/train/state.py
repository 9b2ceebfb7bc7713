"""Training state on disk: model, EMA, optimizer, data position and step in one safetensors file.

Each state file is written to a temporary name and renamed into place, so a file that exists is
complete (a run killed mid-save leaves only a stray `.tmp`). Safetensors only: nothing is
unpickled on resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

log = logging.getLogger(__name__)

FORMAT = "unifusion-train-state"
VERSION = 1
_NAME = re.compile(r"^state-(\d{8})\.safetensors$")


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"state-{step:08d}.safetensors"


def list_states(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete state files of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               meta: dict) -> None:
    """Write the whole training state atomically."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.contiguous() for k, v in ema.items()}
    opt = optimizer.state_dict()
    names = optimizer_names(model, optimizer)
    for i, st in opt["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"optim.{names[i]}.{key}"] = t.detach().contiguous()
    metadata = {"format": FORMAT, "format_version": str(VERSION), "meta": json.dumps(meta)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_state(path: Path, model: nn.Module, ema: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_state wrote into model, ema and optimizer (in place); returns the meta dict."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: cannot read the training state ({e}); delete it to resume from the one before") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a UniFusion training state (format {metadata.get('format')!r})")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the training state does not match this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); resume with the same model settings it was started with"
        )
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    index = {n: i for i, n in enumerate(optimizer_names(model, optimizer))}
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            name, field = key[len("optim."):].rsplit(".", 1)
            if name in index:  # else: a part frozen now (e.g. --adapter-lr 0)
                state.setdefault(index[name], {})[field] = v
    # The groups' settings (lr scale, weight decay, betas) follow from the run's config, and the lr
    # is set every step, so the current groups are kept: a resume may change e.g. --adapter-lr.
    # Parameters the state holds no moments for (an adapter that was frozen) start fresh.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return json.loads(metadata["meta"])


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own numbering (group by group)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def prune_states(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` state files (and stray temporaries)."""
    states = list_states(run_dir)
    for _, p in states[: max(0, len(states) - keep)]:
        p.unlink(missing_ok=True)
    for tmp in (Path(run_dir) / "checkpoints").glob("*.tmp"):
        tmp.unlink(missing_ok=True)
