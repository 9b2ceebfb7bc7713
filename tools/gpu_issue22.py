"""Issue 22's GPU measurements in one run (one H200, under 9 minutes), JSON under OUT/.

    python tools/gpu_issue22.py --out $OUT [--comfyui ../shared/comfyui]     # on the GPU machine
    python tools/gpu_issue22.py --out /tmp/o --dry-run                       # the same code paths, tiny, on CPU

Stages, each in a child process with its own time limit, each writing OUT/<stage>.json (an error
is recorded there and the next stage runs):
  dit-ops           bench dit-ops at the issue's configuration (paper-5b width, 8 blocks, 1024², 512
                    conditioning tokens, bf16): the previous eager ops, the fused ones and the compiled
                    blocks, with MFU, the share of device time outside GEMMs and attention, and what
                    compiling cost on the first call
  dit-ops-full      the same at paper-5b's full depth (fused and compiled): one 1024² image's 28 guided
                    steps
  dit-vs-flux       bench dit-vs-diffusers at the issue's configuration (paper-5b width, 8 blocks, 1024²,
                    512 conditioning tokens, bf16, Flux single-stream peer)
  node-overhead     bench node-overhead on cuda: LAP Encode + Sample against generate(), plainly and
                    inside ComfyUI's modules (ModelPatcher, progress bar, previews off)
  t2i-24gb, t2i-16gb
                    the text-to-image chain of nodes (VLM Load's managed VLM -> VERIFI Rewrite -> LAP Encode
                    -> Sample), then the edit chain (Tile Images of a 1024² reference, 10 tiles and the
                    thumbnail -> VERIFI Rewrite with it -> LAP Encode -> Sample) inside ComfyUI's memory
                    manager with random weights of the paper's shapes (an InternVL3-8B-shaped VLM,
                    paper-5b), the GPU capped at the budget (ComfyUI's
                    reserved VRAM = card - budget, and torch's per-process memory fraction): per-node
                    time, peak VRAM, what ComfyUI's memory manager did (its "loaded completely / partially"
                    lines, the models it holds after each node), the VLM's features against a full load;
                    at 24 GB also Sample with compile on, twice (the first run compiles)
The nodes run in-process, not through the HTTP server: 26 GB of random checkpoints would not be
written and read back in the time. The VAE decode is left out (no Flux VAE weights here).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["dit-ops", "dit-ops-full", "dit-vs-flux", "node-overhead", "t2i-24gb", "t2i-16gb"]
# A command may run 10 minutes: run the DiT stages in one call (dit-ops dit-ops-full dit-vs-flux, at most
# 7 min) and the ComfyUI stages in a second (node-overhead t2i-24gb t2i-16gb, at most 9 min).
LIMITS = {"dit-ops": 150, "dit-ops-full": 150, "dit-vs-flux": 120, "node-overhead": 140, "t2i-24gb": 240,
          "t2i-16gb": 150}


def bench(argv: list[str], limit: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout[done.stdout.index("{"):])


def stage_dit_vs_flux(a) -> dict:
    if a.dry_run:
        argv = ["--device", "cpu", "--dtype", "float32", "--preset", "tiny", "--sizes", "32", "--cond-tokens", "8",
                "--peers", "flux", "--repeats", "1"]
    else:
        argv = ["--device", "cuda", "--dtype", "bfloat16", "--preset", "paper-5b", "--depth", "8", "--sizes", "1024",
                "--cond-tokens", "512", "--peers", "flux", "--peak-tflops", "989", "--repeats", "5"]
    return bench(["dit-vs-diffusers", *argv], LIMITS["dit-vs-flux"] - 10)


def stage_dit_ops(a, full: bool) -> dict:
    if a.dry_run:
        argv = ["--device", "cpu", "--dtypes", "float32", "--preset", "tiny", "--size", "32", "--cond-tokens", "8",
                "--repeats", "1", "--profile"]
    else:
        argv = ["--device", "cuda", "--dtypes", "bfloat16", "--preset", "paper-5b", "--size", "1024",
                "--cond-tokens", "512", "--peak-tflops", "989", "--repeats", "5", "--profile"]
    if full:
        argv += ["--variants", "fused", "compiled"]
    elif not a.dry_run:
        argv += ["--depth", "8"]
    return bench(["dit-ops", *argv], LIMITS["dit-ops-full" if full else "dit-ops"] - 10)


def stage_node_overhead(a) -> dict:
    if a.dry_run:
        argv = ["--device", "cpu", "--preset", "tiny", "--size", "32", "--steps", "2", "--repeats", "2"]
    else:
        argv = ["--device", "cuda", "--dtype", "bfloat16", "--preset", "paper-5b", "--size", "512", "--steps", "4",
                "--cond-tokens", "256", "--repeats", "3"]
    out = {"plain": bench(["node-overhead", *argv], 60)}
    out["comfyui"] = bench(["node-overhead", *argv, "--comfyui", a.comfyui], LIMITS["node-overhead"] - 70)
    return out


def stage_t2i(a, budget_gb: float) -> dict:
    """Runs in this (child) process: ComfyUI's modules are imported here, once."""
    import torch

    cuda = not a.dry_run
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    link = Path(tempfile.mkdtemp(prefix="uf-gpu22-")) / "unifusion"
    link.symlink_to(ROOT, target_is_directory=True)
    sys.path[:0] = [a.comfyui, str(link.parent), str(ROOT / "tests")]
    import comfy.cli_args as ca

    ca.args.cpu = not cuda
    if cuda:
        ca.args.reserve_vram = max(0.0, total_gb - budget_gb)  # ComfyUI plans for the budget...
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb / total_gb))  # ...and torch enforces it
    import comfy.model_management as mm
    import folder_paths  # noqa: F401

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith(("loaded completely", "loaded partially", "Requested to load", "Unloading")):
                lines.append(msg)

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    nodes = importlib.import_module("unifusion.nodes")
    uf = importlib.import_module("unifusion.unifusion_core")
    host = nodes.host
    N = nodes.NODE_CLASS_MAPPINGS
    dtype = torch.bfloat16 if cuda else torch.float32
    record: dict = {"budget_gb": budget_gb, "card_gb": round(total_gb, 1),
                    "machine": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "nodes": {}}

    def held():
        return [{"model": type(m.model.model.module).__name__ if hasattr(m.model.model, "module") else "?",
                 "loaded_mb": round(m.model.loaded_size() / 2**20), "size_mb": round(m.model.model_size() / 2**20),
                 "lowvram": bool(getattr(m.model.model, "model_lowvram", False))} for m in mm.current_loaded_models]

    def run(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, first = time.perf_counter(), len(lines)
        with torch.inference_mode():
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        record["nodes"][name] = {"s": round(time.perf_counter() - start, 3), "manager": lines[first:],
                                 "held_after": held()}
        if cuda:
            record["nodes"][name]["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out

    def randomized(module):
        """A module built on the meta device -> in RAM with random weights of a sane scale (norms 1,
        biases 0), drawn on the GPU when there is one (a CPU draws 13 G numbers in minutes)."""
        if next(module.parameters()).is_meta:  # (no buffers to lose: UniFusionModel has none)
            assert next(module.buffers(), None) is None
            module = module.to_empty(device="cpu")
        module = module.eval().requires_grad_(False)
        g = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=g.device).normal_(0, 0.02, generator=g))
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
        return module

    # The VLM: the tiny InternVL's tokenizer and chat template over a model of InternVL3-8B's shapes.
    import tiny_vlms
    from transformers import InternVLForConditionalGeneration

    small = uf.load_vlm(tiny_vlms.make_tiny_internvl(link.parent / "tiny-internvl"))

    def build_vlm():
        config = small.model.config
        if cuda:  # InternVL3-8B: InternViT-300M + Qwen2.5-7B
            v, t = config.vision_config, config.text_config
            v.update(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=448, patch_size=14))
            t.update(dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=151674))
            config.image_seq_length = 256
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:  # in RAM, no init (its buffers, the rotary tables, are computed as usual)
            with no_init_weights():
                big = InternVLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
        big = randomized(big)
        encoder = uf.VLMEncoder(big, small.tokenizer, type(small.adapter)(big, small.tokenizer),
                                name="InternVL3-8B-random" if cuda else small.name, chat_template=small.chat_template)
        # What VLM Load does with a loaded encoder (nodes/vlm_load.py)
        run_on, offload = host.load_device(text_encoder=True), host.offload_device(text_encoder=True)
        partial = host.comfy_layers(big) > 0
        big.compute_device = run_on
        return host.Managed(encoder, big, run_on, offload, partial=partial)

    def build_model():
        preset = "paper-5b" if cuda else "tiny"
        model = randomized(uf.UniFusionModel.from_preset(preset, vlm=vlm.obj, dtype=dtype, device="meta"))
        return host.Managed(model, model, host.load_device(), host.offload_device(), partial=True)

    # Both built before anything loads (built in RAM, the random numbers drawn on the GPU: fast).
    vlm = run("vlm_build_random", build_vlm)
    model = run("model_build_random", build_model)
    record["vlm_params_b"] = round(sum(p.numel() for p in vlm.module.parameters()) / 1e9, 2)
    prompt = "a red fox sitting in fresh snow under a pine tree at dawn, soft light"
    feats, _ = run("verifi_rewrite", lambda: N["UniFusionVERIFIRewrite"]()._run(
        vlm, prompt, False, "", 0, False, 0, None))
    record["cond_tokens"] = feats.num_tokens

    record["dit_params_b"] = round(sum(p.numel() for p in model.module.parameters()) / 1e9, 2)
    out = run("lap_encode", lambda: N["UniFusionLAPEncode"]().encode(model, feats))
    (cond,) = out["result"] if isinstance(out, dict) else out
    size, steps = (1024, a.steps) if cuda else (32, 2)
    out = run("sample", lambda: N["UniFusionSample"]().sample(model, cond, size, size, steps, 4.0, 0.0, "euler", 0))
    (latent,) = out["result"] if isinstance(out, dict) else out
    record["sample"] = {"size": size, "steps": steps, "latent": list(latent["samples"].shape),
                        "s_per_step": round(record["nodes"]["sample"]["s"] / steps, 3),
                        "est_28_steps_s": round(record["nodes"]["sample"]["s"] / steps * 28, 1)}
    # The VLM encoded again after the DiT took the room (offloaded / partial as ComfyUI decides), against
    # the first encode: the comfy.ops layers must give the same features however they are loaded.
    again, _ = run("verifi_rewrite_after_sample", lambda: N["UniFusionVERIFIRewrite"]()._run(
        vlm, prompt, False, "", 0, False, 0, None))
    record["features_equal_after_reload"] = bool(torch.equal(again.hidden, feats.hidden))

    if budget_gb >= 24:  # Sample's compile switch in ComfyUI: what the first run costs, and the second
        def compiled():
            return N["UniFusionSample"]().sample(model, cond, size, size, steps, 4.0, 0.0, "euler", 0, compile=True)

        first = run("sample_compiled_first", compiled)
        second = run("sample_compiled_second", compiled)
        (clatent,) = second["result"] if isinstance(second, dict) else second
        record["sample_compiled"] = {
            "first_s": record["nodes"]["sample_compiled_first"]["s"],
            "second_s": record["nodes"]["sample_compiled_second"]["s"],
            "eager_s": record["nodes"]["sample"]["s"],
            "notes": [first.get("ui", {}).get("text"), second.get("ui", {}).get("text")],
            "latent_max_abs_diff_vs_eager": float((clatent["samples"] - latent["samples"]).abs().max()),
        }

    # The edit workflow's chain: a 1024² reference tiled as InternVL reads it (10 tiles + thumbnail),
    # the instruction and its image tokens through the VLM, LAP Encode, Sample at the same size.
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(1, size, size, 3, generator=g) if cuda else torch.rand(1, 64, 64, 3, generator=g)
    (refs,) = run("edit_tile_images", lambda: N["UniFusionTileImages"]().add(reference, 10, True))
    edit = "make the sky a deep orange sunset and keep everything else"
    efeats, _ = run("edit_verifi_rewrite", lambda: N["UniFusionVERIFIRewrite"]()._run(
        vlm, edit, False, "", 0, False, 0, refs))
    record["edit_cond_tokens"] = efeats.num_tokens
    record["edit_image_tokens"] = 0 if efeats.is_image is None else int(efeats.is_image.sum())
    out = run("edit_lap_encode", lambda: N["UniFusionLAPEncode"]().encode(model, efeats))
    (econd,) = out["result"] if isinstance(out, dict) else out
    out = run("edit_sample", lambda: N["UniFusionSample"]().sample(model, econd, size, size, steps, 4.0, 0.0, "euler",
                                                                    0))
    (elatent,) = out["result"] if isinstance(out, dict) else out
    record["edit_sample"] = {"latent": list(elatent["samples"].shape),
                             "s_per_step": round(record["nodes"]["edit_sample"]["s"] / steps, 3),
                             "est_28_steps_s": round(record["nodes"]["edit_sample"]["s"] / steps * 28, 1)}
    record["peak_vram_gb"] = max((n.get("peak_vram_gb", 0) for n in record["nodes"].values()), default=0)
    record["total_s"] = round(sum(n["s"] for n in record["nodes"].values()), 2)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--comfyui", default=str(ROOT.parent / "shared" / "comfyui"))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code paths")
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--steps", type=int, default=8, help="sampling steps of the t2i stages (28 is extrapolated)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # a child process running one t2i stage
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage:  # child: one t2i stage, its JSON on stdout's last line
        print(json.dumps(stage_t2i(a, float(a.stage.removeprefix("t2i-").removesuffix("gb")))))
        return
    summary = {}
    for stage in a.stages:
        start = time.perf_counter()
        try:
            if stage.startswith("t2i"):
                argv = [sys.executable, __file__, "--out", a.out, "--comfyui", a.comfyui, "--stage", stage,
                        "--steps", str(a.steps)] + (["--dry-run"] if a.dry_run else [])
                done = subprocess.run(argv, capture_output=True, text=True, timeout=LIMITS[stage],
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-4000:])
                result = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                result = {"dit-ops": lambda a: stage_dit_ops(a, full=False),
                          "dit-ops-full": lambda a: stage_dit_ops(a, full=True),
                          "dit-vs-flux": stage_dit_vs_flux, "node-overhead": stage_node_overhead}[stage](a)
            status = "ok"
        except Exception as e:
            result, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}, "error"
        result["stage_s"] = round(time.perf_counter() - start, 1)
        (out / f"{stage}.json").write_text(json.dumps(result, indent=2))
        summary[stage] = {"status": status, "s": result["stage_s"]}
        print(stage, status, result["stage_s"], "s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
