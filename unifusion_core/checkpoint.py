"""Self-describing checkpoints: one .safetensors with LAP + refiner + DiT and the config as JSON."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import UniFusionConfig
from .model import UniFusionModel

log = logging.getLogger(__name__)

FORMAT = "unifusion"
FORMAT_VERSION = 1


def save_model(model: UniFusionModel, path: str | os.PathLike) -> None:
    """Write the weights and the full config (metadata key `config`) to a .safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: UniFusion checkpoints are .safetensors files; use that extension")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name


def read_config(path: str | os.PathLike) -> UniFusionConfig:
    """The config stored in a checkpoint, without reading its tensors."""
    path = Path(path)
    with _open(path) as f:
        return _config_from_metadata(path, f.metadata())


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    operations=None,
    weight_dtype: torch.dtype | None = None,
) -> UniFusionModel:
    """Build a model from the checkpoint's own config and load its weights (never unpickles).

    dtype: the compute dtype (None keeps the stored one). weight_dtype: a storage dtype for the
    Linear weights only (e.g. float8_e4m3fn), for `operations` that cast weights on the fly
    (ComfyUI's comfy.ops.manual_cast). device defaults to the CPU.
    """
    # dtype is checked where every model is built (UniFusionModel); weight_dtype only exists here
    if weight_dtype is not None and (not isinstance(weight_dtype, torch.dtype) or not weight_dtype.is_floating_point):
        raise ValueError("weight_dtype must be a floating-point torch.dtype (e.g. torch.float8_e4m3fn), "
                         f"got {weight_dtype!r}")
    if weight_dtype is not None and operations is None:
        raise ValueError("weight_dtype needs operations that cast weights at run time (comfy.ops.manual_cast)")
    path = Path(path)
    with _open(path) as f:
        config = _config_from_metadata(path, f.metadata())
        keys = set(f.keys())
        if dtype is None:  # the stored dtype of a plain parameter
            stored = f.get_slice(_DTYPE_KEY).get_dtype() if _DTYPE_KEY in keys else None
            if stored not in _DTYPES:
                raise ValueError(
                    f"{path}: cannot tell the model's dtype (tensor {_DTYPE_KEY!r} is {stored}); pass dtype="
                )
            dtype = _DTYPES[stored]
        model = UniFusionModel(config, dtype=dtype, device="meta", operations=operations)
        expected = model.state_dict()
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match the config stored in the file: "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        state = {}
        for key, ref in expected.items():
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(ref.shape):
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {list(shape)} in the file, but the config "
                    f"stored in the file needs {list(ref.shape)}"
                )
            try:
                tensor = f.get_tensor(key)
            except SafetensorError as e:
                raise ValueError(f"{path}: tensor {key!r} cannot be read ({e}); the file is corrupted") from None
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values; the checkpoint is broken "
                                 "(re-export it from a training state, or use another file)")
            stored_as = dtype
            if weight_dtype is not None and key.endswith(".weight"):
                owner = model.get_submodule(key.rsplit(".", 1)[0])
                stored_as = weight_dtype if isinstance(owner, torch.nn.Linear) else dtype
            state[key] = tensor.to(device=device or "cpu", dtype=stored_as)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded UniFusion checkpoint %s (%s params)", path.name, f"{model.num_parameters()['total']:,}")
    return model.eval()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_KEY = "dit.null_cond"


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"UniFusion checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: only .safetensors checkpoints are loaded (pickled .ckpt/.pt/.bin files are "
            "never opened, since unpickling can run code)"
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupted") from None


def _config_from_metadata(path: Path, metadata: dict | None) -> UniFusionConfig:
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a UniFusion checkpoint (metadata 'format' is {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); UniFusion checkpoints are written by unifusion_core.save_model"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r} is not supported (this code reads up to "
            f"{FORMAT_VERSION}); update the UniFusion node pack"
        )
    try:
        return UniFusionConfig.from_dict(json.loads(metadata["config"]))
    except KeyError:
        raise ValueError(f"{path}: metadata key 'config' is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata key 'config' is not valid JSON ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: metadata key 'config' is invalid: {e}") from None
