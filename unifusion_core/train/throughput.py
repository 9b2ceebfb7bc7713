"""What the training loop reports about its speed: model FLOPs of a step, the device's peak (for
MFU), peak memory, and the progress bar."""

from __future__ import annotations

import logging

import torch

from ..config import UniFusionConfig
from ..model import UniFusionModel

log = logging.getLogger(__name__)

PER_ROW = ("time_in.", "time_mod.", "final.adaLN.")  # DiT parameters applied once per row (to t)

# Dense bf16 / fp32 peak of the GPUs users train on (vendor datasheets, without sparsity).
PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
         "B200": (2250e12, 80e12), "4090": (165e12, 82.6e12)}


def parameter_counts(model: UniFusionModel) -> dict[str, int]:
    """model.num_parameters() plus what the FLOP count needs: LAP's blocks, and the DiT's per-row part."""
    def lora(part) -> int:  # LoRA adapters' weights (lora.py), the only trainable ones when present
        return sum(p.numel() for n, p in part.named_parameters() if n.endswith((".lora_down", ".lora_up")))

    return model.num_parameters() | {
        "lap_blocks": sum(p.numel() for p in model.lap.blocks.parameters()),
        # run once per row, not per token: the timestep embedder and the adaLN projections
        "dit_per_row": sum(p.numel() for n, p in model.dit.named_parameters() if n.startswith(PER_ROW)),
        "lora_dit": lora(model.dit),
        "lora_dit_per_row": sum(p.numel() for n, p in model.dit.named_parameters()
                                if n.startswith(PER_ROW) and n.endswith((".lora_down", ".lora_up"))),
        "lora_lap": lora(model.lap),
        "lora_refiner": lora(model.refiner),
    }


def train_flops(counts: dict[str, int], config: UniFusionConfig, image_tokens: int, cond_tokens: int,
                k: int) -> float:
    """Training FLOPs of one (prompt, timestep) row, forward + backward (3x forward): 2 per
    parameter and token in the matmuls, plus attention's 4 * S * D per token and block; LAP +
    refiner run once per prompt, shared by its k rows, and LAP's blocks once for each of the
    L layers of every token. (The PaLM appendix's count.) counts: `parameter_counts(model)`.

    With LoRA adapters (counts' lora_*) the base is frozen: the backward pass
    computes the activations' gradients (1x the matmuls, 2x attention) and the adapters' weight
    gradients, not the base weights', and only back to the first adapter: LAP and the refiner run
    forward only unless they (LAP: or the refiner after it) hold adapters."""
    c, dit = counts, config.dit
    s = image_tokens + cond_tokens
    dit_mm = 2 * (c["dit"] - c["dit_per_row"]) * s + 2 * c["dit_per_row"]
    attention = 4 * dit.depth * s * s * dit.hidden_size
    L, t, d_vlm = config.num_layers, cond_tokens, config.encoder.hidden_size
    # LAP (per token, across its L layers) and the refiner (across the T tokens): matmuls and attention
    lap = (2 * (c["lap_blocks"] * L + c["lap"] - c["lap_blocks"]) * t, 4 * config.lap.depth * L * L * t * d_vlm)
    refiner = (2 * c["refiner"] * t, 4 * config.refiner.depth * t * t * d_vlm)
    lora_dit, lora_lap, lora_refiner = c.get("lora_dit", 0), c.get("lora_lap", 0), c.get("lora_refiner", 0)
    if not (lora_dit or lora_lap or lora_refiner):
        return 3 * (dit_mm + attention + (sum(lap) + sum(refiner)) / k)
    # backward: activations' gradients (1x the matmuls, 2x attention) back to the first adapter,
    # and the adapters' weight gradients (2 FLOPs per adapter weight and token, or row)
    per_row = c.get("lora_dit_per_row", 0)
    dit_total = 2 * dit_mm + 3 * attention + 2 * (lora_dit - per_row) * s + 2 * per_row
    if not (lora_lap or lora_refiner or per_row):
        # nothing before the blocks trains: block 0's first layer (qkv) needs no input gradient
        dit_total -= 2 * 3 * dit.hidden_size * dit.hidden_size * s

    def backward(part: tuple[float, float], adapter_weights: int) -> float:
        """The matmuls' input gradients, attention's, and the adapters' weight gradients."""
        return part[0] + 2 * part[1] + 2 * adapter_weights * t

    adapters = sum(lap) + sum(refiner)
    if lora_lap or lora_refiner:  # back through the refiner, and through LAP when it holds adapters
        adapters += backward(refiner, lora_refiner) + (backward(lap, lora_lap) if lora_lap else 0)
    return dit_total + adapters / k


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s at this precision; None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def peak_memory_gib(device: torch.device) -> torch.Tensor:
    """(1,) this process's peak memory in GiB, on `device` (GPU: allocated by torch; CPU: the resident set)."""
    if device.type == "cuda":
        return torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    import resource

    return torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])


def progress(total: int, initial: int, enabled: bool = True):
    """A tqdm bar over the steps; without tqdm, log lines are the progress."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0,
                    disable=not enabled)
    except ImportError:  # tqdm comes with transformers
        class _Null:
            def update(self, n): ...
            def set_postfix(self, shown): log.info("%s", shown)
            def close(self): ...

        return _Null()
