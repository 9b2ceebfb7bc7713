"""UniFusion's LAP Encode + Sample nodes against the core's generate() on the same device (`node-overhead`).

Both run the same model, features, seed and settings; the latents are compared too. Without --comfyui
the nodes run on their plain-Python host (no ComfyUI); with --comfyui ROOT they run inside ComfyUI's
modules as in the app (the model under ModelPatcher, loaded by ComfyUI's memory manager, ComfyUI's
progress bar; previews only with --previews), the pack imported as ComfyUI imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from .common import timed

ROOT = Path(__file__).resolve().parents[1]


def _pack(comfyui: str | None, previews: bool):
    """(nodes package, core package): the plain ones, or the pack inside ComfyUI's modules."""
    if comfyui is None:
        import nodes
        import unifusion_core

        return nodes, unifusion_core
    link = Path(tempfile.mkdtemp(prefix="unifusion-bench-")) / "unifusion"
    link.symlink_to(ROOT, target_is_directory=True)
    sys.path[:0] = [comfyui, str(link.parent)]
    import comfy.cli_args as ca

    ca.args.cpu = not torch.cuda.is_available()
    ca.args.preview_method = ca.LatentPreviewMethod.Auto if previews else ca.LatentPreviewMethod.NoPreviews
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    nodes = importlib.import_module("unifusion.nodes")
    assert nodes.host.IN_COMFYUI
    return nodes, importlib.import_module("unifusion.unifusion_core")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description="LAP Encode + Sample nodes vs generate() on the same device")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--cond-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--comfyui", default=None, help="a ComfyUI checkout: run the nodes inside its modules")
    ap.add_argument("--previews", action="store_true", help="with --comfyui: previews on (--preview-method auto)")
    args = ap.parse_args(argv)
    nodes, uf = _pack(args.comfyui, args.previews)
    from importlib import import_module

    generate = import_module(f"{uf.__name__}.generate").generate
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    model = uf.UniFusionModel.from_preset(args.preset, dtype=dtype, device=device).eval()
    spec = model.config.encoder
    g = torch.Generator().manual_seed(0)
    feats = uf.Features(torch.randn(args.cond_tokens, len(spec.layers), spec.hidden_size, generator=g).to(dtype),
                        encoder=spec)
    # What Model Load returns, for this model as built (the load device is the one asked for).
    managed = nodes.host.Managed(model, model, device, nodes.host.offload_device(), partial=True)
    lap, sampler = nodes.NODE_CLASS_MAPPINGS["UniFusionLAPEncode"](), nodes.NODE_CLASS_MAPPINGS["UniFusionSample"]()
    settings = dict(width=args.size, height=args.size, steps=args.steps, cfg=args.cfg, seed=0)

    def node_run():
        (cond,) = _result(lap.encode(managed, feats))
        (latent,) = _result(sampler.sample(managed, cond, shift=0.0, sampler="euler", **settings))
        sync()
        return latent["samples"]

    def core_run():
        out = generate(None, model, "", features=feats, **settings).latent
        sync()
        return out

    with torch.inference_mode():  # as ComfyUI runs nodes
        a, b = node_run(), core_run()
        # interleaved, so that drifts of the machine's speed fall on both alike
        node_t, core_t = [], []
        for _ in range(args.repeats):
            node_t += timed(node_run, 1, warmup=0)
            core_t += timed(core_run, 1, warmup=0)
    node_s, core_s = statistics.median(node_t), statistics.median(core_t)
    result = {
        "bench": "node-overhead",
        "preset": args.preset, "size": args.size, "steps": args.steps, "cfg": args.cfg,
        "cond_tokens": args.cond_tokens, "device": str(device), "dtype": args.dtype,
        "host": "comfyui" if args.comfyui else "plain", "previews": bool(args.comfyui and args.previews),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(),
        # microseconds: a tiny run's milliseconds rounded to 0.1 ms were 2 % off their own ratio
        "node_s": round(node_s, 6), "generate_s": round(core_s, 6),
        "node_over_generate": round(node_s / core_s, 4),
        # best of the runs: steadier than the median on a machine shared with other work
        "best_node_over_generate": round(min(node_t) / min(core_t), 4),
        "node_times_s": [round(t, 6) for t in node_t], "generate_times_s": [round(t, 6) for t in core_t],
        "latents_equal": bool(torch.equal(a.cpu(), b.cpu())),
        "latents_max_abs_diff": float((a.cpu().float() - b.cpu().float()).abs().max()),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


def _result(out):
    return out["result"] if isinstance(out, dict) else out
