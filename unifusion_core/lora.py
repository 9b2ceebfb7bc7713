"""LoRA: low-rank adapters on a UniFusion model's Linear layers (Hu et al. 2021), in ComfyUI's layout.

An adapted Linear computes W x + b + (alpha / rank) * up(down(x)): `down` (rank, in) starts
Kaiming-uniform and `up` (out, rank) at zero, so a fresh LoRA is exactly the base model. The
adapters live on the Linear itself (parameters `lora_down` and `lora_up`, a forward hook adds
their term), so the base's parameter names, checkpoints and FSDP sharding stay as they are.

The file is kohya's layout, which `comfy.lora.load_lora` reads: for each adapted layer, named
as in the model (`dit.blocks.0.attn.qkv`), the tensors `<name>.lora_down.weight` (rank, in),
`<name>.lora_up.weight` (out, rank) and `<name>.alpha` (a scalar); the metadata says
`format: unifusion-lora` and names the base (its config's hash, and the file it was trained
on). Merging adds (strength * alpha / rank) * up @ down to the weight, as ComfyUI's patcher does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import EncoderSpec, UniFusionConfig

log = logging.getLogger(__name__)

FORMAT = "unifusion-lora"
FORMAT_VERSION = 1
# What each target adapts. Why the DiT's blocks by default: they hold nearly all of its weights
# and are where every LoRA trainer for DiTs (ai-toolkit, kohya's Flux scripts) puts adapters;
# the modulation (the timestep -> adaLN projections) and the conditioning path (LAP, refiner)
# are opt-in, the latter costing a LAP pass with gradients per prompt.
TARGETS = {
    "dit": "every Linear of the DiT's blocks: attention qkv and output projection, MLP fc1 and fc2",
    "modulation": "the DiT's adaLN projections of the timestep: time_mod (shared by the blocks) and final.adaLN",
    "lap": "every Linear of LAP (its blocks and the pooling projection)",
    "refiner": "every Linear of the refiner (its blocks and the projection to the DiT's width)",
}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def parse_targets(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'dit,lap' (or a sequence) -> ('dit', 'lap'), checked against TARGETS."""
    parts = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    parts = [t for t in parts if t]
    unknown = [t for t in parts if t not in TARGETS]
    if unknown or not parts:
        raise ValueError(f"LoRA targets must be a comma list of {', '.join(TARGETS)}, got {text!r}")
    return tuple(dict.fromkeys(parts))


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha (0: the rank, i.e. scale 1) and the parts adapted (keys of TARGETS)."""

    rank: int
    alpha: float = 0.0
    targets: tuple[str, ...] = ("dit",)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"LoRA alpha must be >= 0 (0: the rank), got {self.alpha!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of the Linear layers that `targets` adapt, in the model's order."""
    targets = parse_targets(targets)
    prefixes = {"dit": ("dit.blocks.",), "lap": ("lap.",), "refiner": ("refiner.",)}
    wanted = tuple(p for t in targets for p in prefixes.get(t, ()))
    exact = {"dit.time_mod", "dit.final.adaLN"} if "modulation" in targets else set()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_adapter(n)
            and (n in exact or (wanted and n.startswith(wanted)))]


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_down", ".lora_up"))


def is_lora_key(key: str) -> bool:
    """Whether a model state-dict key is an adapter's (`<layer>.lora_down` / `<layer>.lora_up`)."""
    return key.endswith((".lora_down", ".lora_up"))


def adapted(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's Linear layers that carry an adapter, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora_hook")}


def _hook(lin: nn.Linear, args: tuple, out: Tensor) -> Tensor:
    s = lin.lora_strength * lin.lora_scale
    if lin.lora_merged is not None or s == 0:
        return out
    x = args[0]
    h = nn.functional.linear(x, lin.lora_down.to(x.dtype))  # (..., rank)
    if lin.lora_drop is not None and lin.training:
        h = h * _keep(lin, h)
    # out + h @ (s * up)^T as one GEMM accumulating into `out` (beta = 1): no separate scale and add
    # passes over the (tokens, out) activations, and nothing of that size saved for the backward
    up = (s * lin.lora_up).to(out.dtype)
    return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]).to(out.dtype), up.t()).view_as(out)


def _attach(lin: nn.Linear, down: Tensor, up: Tensor, alpha: float) -> None:
    rank = down.shape[0]
    lin.register_parameter("lora_down", nn.Parameter(down))  # (rank, in)
    lin.register_parameter("lora_up", nn.Parameter(up))  # (out, rank)
    lin.lora_alpha, lin.lora_scale, lin.lora_strength, lin.lora_merged = alpha, alpha / rank, 1.0, None
    lin.lora_drop = None  # (p, keys, salt) within rank_dropout
    lin.lora_hook = lin.register_forward_hook(_hook)


def add_lora(model: nn.Module, config: LoRAConfig, seed: int = 0, freeze: bool = True) -> list[str]:
    """Attach fresh adapters (up = 0: the model's outputs are unchanged) to the layers config.targets
    name; freeze: every other parameter stops requiring gradients. Returns the adapted names.
    The adapters are in the model's compute dtype (that of its first floating parameter), on the
    layers' devices; `down` is drawn from a generator seeded by `seed` (a run's adapters are a
    function of its seed). On the meta device they are left uninitialised (to be assigned)."""
    names = target_names(model, config.targets)
    if not names:
        raise ValueError(f"the model has no Linear layers for LoRA targets {list(config.targets)}")
    already = [n for n in names if hasattr(model.get_submodule(n), "lora_hook")]
    if already:
        raise ValueError(f"{already[0]} already carries a LoRA; merge or strip it first (strip_lora)")
    if freeze:
        model.requires_grad_(False)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype.itemsize > 1)
    g = torch.Generator().manual_seed(seed)
    alpha = float(config.alpha or config.rank)
    for name in names:
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        device = lin.weight.device
        down = torch.empty(config.rank, in_f, dtype=dtype, device=device)
        if device.type != "meta":
            # nn.Linear's own init for `down` (PEFT's choice too); drawn on the CPU for the generator
            cpu = torch.empty(config.rank, in_f, dtype=torch.float32)
            nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=g)
            down.copy_(cpu)
        up = torch.zeros(out_f, config.rank, dtype=dtype, device=device)
        _attach(lin, down, up, alpha)
    return names


def merge_lora(model: nn.Module, strength: float | None = None) -> int:
    """Fold every adapter into its weight: W += (strength * alpha / rank) * up @ down (in fp32,
    then the weight's dtype, as ComfyUI patches; strength None: each adapter's own, see
    set_strength); the hook then adds nothing. Returns the count."""
    n = 0
    with torch.no_grad():
        for lin in adapted(model).values():
            if lin.lora_merged is None:
                s = lin.lora_strength if strength is None else float(strength)
                lin.weight.copy_((lin.weight.float() + _delta(lin, s)).to(lin.weight.dtype))
                lin.lora_merged = s
                n += 1
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Undo merge_lora (subtracting the same term: the weights come back up to rounding)."""
    n = 0
    with torch.no_grad():
        for lin in adapted(model).values():
            if lin.lora_merged is not None:
                lin.weight.sub_(_delta(lin, lin.lora_merged).to(lin.weight.dtype))
                lin.lora_merged = None
                n += 1
    return n


def _delta(lin: nn.Linear, strength: float) -> Tensor:
    up, down = lin.lora_up.detach().float(), lin.lora_down.detach().float()
    return (strength * lin.lora_scale) * torch.mm(up, down)  # (out, in)


def set_strength(model: nn.Module, strength: float, layers: list[str] | None = None) -> None:
    """Scale the unmerged adapters' term (of `layers`, default all; 0: the base model exactly)."""
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength}")
    for lin in (adapted(model).values() if layers is None else map(model.get_submodule, layers)):
        lin.lora_strength = float(strength)


def strip_lora(model: nn.Module) -> int:
    """Remove every adapter (a merged one stays in the weights, an unmerged one is dropped):
    a plain model again, with the base's state-dict keys only."""
    layers = adapted(model)
    for lin in layers.values():
        lin.lora_hook.remove()
        del lin.lora_down, lin.lora_up
        for attr in ("lora_hook", "lora_alpha", "lora_scale", "lora_strength", "lora_merged", "lora_drop"):
            delattr(lin, attr)
    return len(layers)


# --- dropout in training -----------------------------------------------------------------------------
#
# Why rank dropout (kohya's sd-scripts `rank_dropout`: each sample drops each of the adapter's rank
# components with probability p, the kept ones scaled by 1 / (1 - p)) rather than PEFT's dropout on
# every input element: a sample's mask here is a function of (seed, step, the sample's index in the
# step's global batch, the layer) alone, computed by a counter-based hash on the device. So it is the
# same whatever the number of processes, micro-batches, or the padding of the batch's conditioning
# (which moves every image token's position), and a gradient-checkpointed block recomputes the
# same mask: exact resume and 1 process = N processes hold as without dropout. An elementwise mask
# would have to be keyed by token positions that padding shifts.

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (products wrap modulo 2^64): a bijection whose
    outputs for consecutive inputs are as good as independent uniform 64-bit draws."""
    z = (z ^ _shr(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ _shr(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ _shr(z, 31)


def _keep(lin: nn.Linear, h: Tensor) -> Tensor:
    """The kept-and-rescaled rank components of the samples h's leading dimension holds: (N, 1.., rank).
    Rows of a sample share its mask (LAP's blocks see a prompt's tokens as rows: N = prompts x tokens)."""
    p, keys, salt = lin.lora_drop
    n, rank = h.shape[0], h.shape[-1]
    if n % keys.numel():
        raise RuntimeError(f"LoRA dropout: a layer saw {n} rows for {keys.numel()} samples; set the samples' keys of "
                           "each part with lora.rank_dropout for the batch it runs")
    k = keys.repeat_interleave(n // keys.numel())
    z = _mix(_mix(k ^ salt)[:, None] + _GOLDEN * torch.arange(1, rank + 1, device=h.device))
    u = _shr(z, 40).to(torch.float32) * 2.0**-24  # the top 24 bits: uniform in [0, 1), exact in fp32
    keep = (u >= p).to(h.dtype) / (1 - p)
    return keep.view(n, *(1,) * (h.ndim - 2), rank)


@contextmanager
def rank_dropout(model: nn.Module, p: float, seed: int, keys: dict[str, Tensor]):
    """Within: in training mode, the adapted layers of each part ('dit', 'lap', 'refiner': the
    prefix of their names) drop rank components of their samples with probability p (see above).
    keys[part]: one int64 per sample of the batch that part runs (its index in the step's global
    batch); `seed`: the run's seed and step together (e.g. the step generator's seed). Keep it
    open over the backward too: checkpointed blocks recompute their forward there."""
    if not 0 <= p < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
    layers = adapted(model)
    if p > 0:
        base = _mix(torch.tensor([seed & (2**63 - 1)], dtype=torch.int64))
        # one copy of the keys and the salts per device, not one per layer (hundreds of small copies a step)
        on: dict[torch.device, tuple[dict[str, Tensor], Tensor]] = {}
        for i, (name, lin) in enumerate(layers.items()):
            part = name.split(".", 1)[0]
            if part in keys:
                dev = lin.lora_down.device
                if dev not in on:
                    salts = _mix(base + _GOLDEN * torch.arange(1, len(layers) + 1, dtype=torch.int64))
                    on[dev] = {k: v.to(dev, torch.int64) for k, v in keys.items()}, salts.to(dev)
                # the salt a tensor, not a Python int: compiled blocks take it as an input (one graph for all)
                lin.lora_drop = (float(p), on[dev][0][part], on[dev][1][i : i + 1])
    try:
        yield
    finally:
        for lin in layers.values():
            lin.lora_drop = None


# --- the file ---------------------------------------------------------------------------------------


def architecture(config: UniFusionConfig) -> dict:
    """What a LoRA depends on: every setting that shapes the weights (the sampling defaults do not)."""
    return {k: v for k, v in config.to_dict().items() if k != "sampling"}


def config_hash(config: UniFusionConfig) -> str:
    """A short sha256 of architecture(config), recorded in a LoRA file to name its base."""
    text = json.dumps(architecture(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters in the file's layout: `<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    out = {}
    for name, lin in adapted(model).items():
        out[f"{name}.lora_down.weight"] = lin.lora_down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = lin.lora_up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(lin.lora_alpha))
    if not out:
        raise ValueError("the model carries no LoRA adapters (add_lora or load_lora first)")
    return out


def save_lora(model: nn.Module, path: str | os.PathLike, base: str | None = None,
              targets: tuple[str, ...] | None = None) -> Path:
    """Write the model's adapters (kohya's layout, see the module) with metadata: format, rank,
    alpha, targets, the base's config hash and config, and `base` (the file it was trained on)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are .safetensors; use that extension")
    layers = adapted(model)
    tensors = lora_state_dict(model)
    ranks = sorted({lin.lora_down.shape[0] for lin in layers.values()})
    alphas = sorted({lin.lora_alpha for lin in layers.values()})
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "rank": ",".join(map(str, ranks)),
            "alpha": ",".join(f"{a:g}" for a in alphas), "layers": str(len(layers))}
    if targets is not None:
        meta["targets"] = ",".join(parse_targets(targets))
    config = getattr(model, "config", None)
    if isinstance(config, UniFusionConfig):
        meta["base_config_sha256"] = config_hash(config)
        meta["base_config"] = json.dumps(architecture(config))
    if base:
        meta["base"] = Path(base).name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


@dataclass
class LoRAFile:
    """A read LoRA file: its tensors (the file's keys), metadata and the layer names it adapts."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    layers: list[str]

    def rank(self, layer: str) -> int:
        return self.tensors[f"{layer}.lora_down.weight"].shape[0]

    def scale(self, layer: str) -> float:
        """alpha / rank; a layer without an alpha is scaled by 1 (as ComfyUI reads such files)."""
        alpha = self.tensors.get(f"{layer}.alpha")
        return 1.0 if alpha is None else float(alpha) / self.rank(layer)

    def shape(self, layer: str) -> tuple[int, int]:
        """The (out, in) of the Linear the layer's adapter was made for."""
        return self.tensors[f"{layer}.lora_up.weight"].shape[0], self.tensors[f"{layer}.lora_down.weight"].shape[1]


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Read and check a UniFusion LoRA file (never unpickles): ValueError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled files are never opened)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path.name}: not a UniFusion LoRA (metadata 'format' is {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); UniFusion LoRAs are written by the UniFusion trainer "
                                 "(--lora-rank) or unifusion_core.lora.save_lora")
            version = meta.get("format_version", "")
            if not version.isdigit() or int(version) > FORMAT_VERSION:
                raise ValueError(f"{path.name}: LoRA format version {version!r} is newer than this pack reads "
                                 f"({FORMAT_VERSION}); update the UniFusion node pack")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name}: not a readable safetensors file ({e}); it may be truncated") from None
    stray = sorted(k for k in tensors if not k.endswith(_SUFFIXES))
    if stray:
        raise ValueError(f"{path.name}: tensors {stray[:3]} are not LoRA tensors (<layer>.lora_down.weight, "
                         "<layer>.lora_up.weight, <layer>.alpha)")
    layers = sorted({k[: -len(s)] for k in tensors for s in _SUFFIXES if k.endswith(s)})
    for layer in layers:
        down, up = tensors.get(f"{layer}.lora_down.weight"), tensors.get(f"{layer}.lora_up.weight")
        if down is None or up is None:
            raise ValueError(f"{path.name}: layer {layer!r} has no {'lora_down' if down is None else 'lora_up'} "
                             "weight; the file is incomplete")
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path.name}: layer {layer!r} has lora_down {list(down.shape)} and lora_up "
                             f"{list(up.shape)}; expected (rank, in) and (out, rank)")
        for t in (down, up):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path.name}: layer {layer!r} holds NaN or infinite values; the LoRA is broken")
    if not layers:
        raise ValueError(f"{path.name}: the file holds no LoRA layers")
    return LoRAFile(path, tensors, meta, layers)


def check_fits(model: nn.Module, lora: LoRAFile) -> None:
    """ValueError unless every layer of the LoRA is a Linear of the model with its shape, naming
    the first layers that differ and the base the LoRA was trained on. A LoRA of another checkpoint
    of the same shapes is only warned about (fine-tunes of one base share LoRAs)."""
    missing, wrong = [], []
    for layer in lora.layers:
        try:
            lin = model.get_submodule(layer)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            missing.append(layer)
        elif tuple(lin.weight.shape) != lora.shape(layer):
            wrong.append(f"{layer} is {list(lin.weight.shape)} in the model but {list(lora.shape(layer))} in the LoRA")
    base = lora.metadata.get("base")
    trained = f" (trained on {base!r})" if base else ""
    if missing or wrong:
        what = (f"{len(missing)} of its {len(lora.layers)} layers are not Linear layers of this model "
                f"(e.g. {', '.join(missing[:3])})" if missing else f"{len(wrong)} layers differ in shape: "
                + "; ".join(wrong[:3]))
        raise ValueError(f"{lora.path.name} was trained for another model shape{trained}: {what}. Load it with "
                         "the checkpoint it was trained on")
    config = getattr(model, "config", None)
    recorded = lora.metadata.get("base_config_sha256")
    if recorded and isinstance(config, UniFusionConfig) and recorded != config_hash(config):
        log.warning("%s was trained on another checkpoint%s whose settings differ from this model's (same layer "
                    "shapes): it may not do here what it did there", lora.path.name, trained)


def load_lora(model: nn.Module, path: str | os.PathLike | LoRAFile, strength: float = 1.0) -> list[str]:
    """Attach the adapters of a LoRA file to the model (unmerged, frozen; `strength` scales them).
    Returns the adapted layer names. merge_lora folds them in."""
    lora = path if isinstance(path, LoRAFile) else read_lora(path)
    check_fits(model, lora)
    already = [n for n in lora.layers if hasattr(model.get_submodule(n), "lora_hook")]
    if already:
        raise ValueError(f"{already[0]} already carries a LoRA; merge_lora then strip_lora it first to stack another")
    for layer in lora.layers:
        lin = model.get_submodule(layer)
        dtype = lin.weight.dtype if lin.weight.dtype.itemsize > 1 else torch.float32
        down = lora.tensors[f"{layer}.lora_down.weight"].to(lin.weight.device, dtype)
        up = lora.tensors[f"{layer}.lora_up.weight"].to(lin.weight.device, dtype)
        _attach(lin, down, up, lora.scale(layer) * down.shape[0])
        lin.lora_down.requires_grad_(False)
        lin.lora_up.requires_grad_(False)
    set_strength(model, strength, lora.layers)
    return list(lora.layers)


def merge_file(model: nn.Module, lora: str | os.PathLike | LoRAFile, strength: float = 1.0) -> list[str]:
    """Add a LoRA file's term to the model's weights in place (no adapters kept): what ComfyUI's
    patcher does to the weights when it loads a model under a LoRA Loader (stackable)."""
    lora = lora if isinstance(lora, LoRAFile) else read_lora(lora)
    check_fits(model, lora)
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength}")
    with torch.no_grad():
        for layer in lora.layers:
            lin = model.get_submodule(layer)
            up = lora.tensors[f"{layer}.lora_up.weight"].to(lin.weight.device, torch.float32)
            down = lora.tensors[f"{layer}.lora_down.weight"].to(lin.weight.device, torch.float32)
            delta = (strength * lora.scale(layer)) * torch.mm(up, down)
            lin.weight.copy_((lin.weight.float() + delta).to(lin.weight.dtype))
    return list(lora.layers)


# --- training on a checkpoint ------------------------------------------------------------------------


def base_config(path: str | os.PathLike, encoder: EncoderSpec) -> UniFusionConfig:
    """The config a LoRA on checkpoint `path` trains with: the checkpoint's own (a LoRA changes no
    shape), refused when `encoder` (the run's VLM and layers) is not what the checkpoint reads."""
    from .checkpoint import read_config

    config = read_config(path)
    if not config.encoder.same_encoder(encoder):
        enc = config.encoder
        raise ValueError(f"{path} was trained against {enc.name!r} ({enc.family}, hidden {enc.hidden_size}, layers "
                         f"{list(enc.layers)}), but this run's encoder is {encoder.name!r} ({encoder.family}, hidden "
                         f"{encoder.hidden_size}, layers {list(encoder.layers)}): a LoRA adapts the checkpoint as it "
                         "is, so give the --vlm and --layers it was trained with")
    if config.encoder.system_prompt != encoder.system_prompt:
        log.warning("%s was trained with another system prompt (%r...) than this run's VLM encodes with: the LoRA "
                    "learns from features the checkpoint never saw", path, config.encoder.system_prompt[:40])
    return config
