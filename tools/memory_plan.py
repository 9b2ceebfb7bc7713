"""Memory per GPU for training the paper's configuration with FSDP2, from the model's own counts.

    python tools/memory_plan.py [--depth 39 --mlp-ratio 4] [--gpu-gib 80]

The paper's final model: InternVL3-8B, frozen, and an 8B DiT at 1024 x 1024 (flux latents, 2x2
patches: 4096 image tokens) with up to 512 conditioning tokens. The paper gives the 8B DiT's size
but not its layout; by default this takes its 5B ablation DiT's width and heads (4096, 32) with
MLP ratio 4 and as many blocks as make 8B (39). Parameter counts come from building the model on
PyTorch's meta device (no memory); the rest is arithmetic, per GPU:

- sharded training state, 20 bytes per trainable parameter over the shard group: fp32 weights (4),
  fp32 gradients (4), AdamW moments (8), fp32 EMA (4);
- unsharded bf16 working copies: the root group (embedders, LAP, final layers) for the whole step,
  two blocks at a time (the one running and the one prefetched), one block's bf16 gradients;
- the frozen VLM replicated in bf16 (7.9 B parameters: InternVL3-8B), each rank its own copy;
- activations with every block checkpointed: each block's input kept (S x D in bf16) and one
  block recomputed at a time, 34 x S x D bytes per sample (Korthikanti et al. 2022's count for a
  transformer layer with flash attention, no S^2 term).

Prints a JSON list: for each cluster (8 x 80 GB; 64 GPUs over 8 nodes, fully sharded and as HSDP
8 x 8) the GiB per GPU at batch 1 and the largest per-GPU batch that leaves 10 % free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
VLM_PARAMS = 7.94e9  # InternVL3-8B: Qwen2.5-7B language model + InternViT-300M + projector


def counts(depth: int, mlp_ratio: float) -> dict:
    import torch

    from unifusion_core import UniFusionModel
    from unifusion_core.presets import get_preset

    config = get_preset("paper-5b").replace(dit={"depth": depth, "mlp_ratio": mlp_ratio})
    with torch.device("meta"):
        model = UniFusionModel(config, device="meta")
    n = model.num_parameters()
    block = sum(p.numel() for p in model.dit.blocks[0].parameters())
    in_blocks = sum(p.numel() for part in (model.lap, model.refiner, model.dit)
                    for b in part.blocks for p in b.parameters())
    return {"total": n["total"], "dit": n["dit"], "lap": n["lap"], "refiner": n["refiner"], "dit_block": block,
            "root": n["total"] - in_blocks, "width": config.dit.hidden_size, "depth": depth}


def plan(c: dict, shard: int, gpu_gib: float, image_tokens: int = 4096, cond_tokens: int = 512) -> dict:
    s, d = image_tokens + cond_tokens, c["width"]
    state = 20 * c["total"] / shard
    working = 2 * c["root"] + 2 * 2 * c["dit_block"] + 2 * c["dit_block"]
    vlm = 2 * VLM_PARAMS
    per_sample = 2 * s * d * c["depth"] + 34 * s * d
    fixed = state + working + vlm
    fits = int((0.9 * gpu_gib * GIB - fixed) // per_sample)
    return {"shard_group": shard, "state_gib": round(state / GIB, 1), "working_copies_gib": round(working / GIB, 1),
            "vlm_gib": round(vlm / GIB, 1), "activations_gib_per_sample": round(per_sample / GIB, 2),
            "total_gib_at_batch_1": round((fixed + per_sample) / GIB, 1), "largest_batch_per_gpu": max(fits, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=39)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--gpu-gib", type=float, default=80)
    args = ap.parse_args()
    c = counts(args.depth, args.mlp_ratio)
    rows = [
        {"cluster": "8 GPUs, 1 node, fully sharded", **plan(c, 8, args.gpu_gib)},
        {"cluster": "64 GPUs, 8 nodes, fully sharded", **plan(c, 64, args.gpu_gib)},
        {"cluster": "64 GPUs, 8 nodes, HSDP 8 replicas x 8 shards (all-gathers stay in the node)",
         **plan(c, 8, args.gpu_gib)},
        {"cluster": "1 GPU (no sharding)", **plan(c, 1, args.gpu_gib)},
    ]
    print(json.dumps({"parameters": c, "gpu_gib": args.gpu_gib, "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
