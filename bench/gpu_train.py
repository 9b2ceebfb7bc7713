"""The trainer's bf16 throughput (MFU) and memory on one GPU: FSDP2, activation checkpointing, 1024^2.

    python -m bench gpu-train [--gpu-gib 79] [--deadline 420] [--out results.jsonl]

What it runs is the real `Trainer.train_step` (LAP + refiner + DiT forward and backward, AdamW,
gradient clipping, the fp32 EMA) under FSDP2 with one process (`fully_shard` per block, bf16
parameters, fp32 gradient reduction), on stand-in data of the paper's shapes: InternVL3-8B
features (every third of 28 layers, width 3584) of 512 conditioning tokens, and flux latents of a
1024 x 1024 image (16 x 128 x 128: 4096 image tokens after 2 x 2 patches). The VLM itself is not
run: it is frozen and its features are cached for training at scale.

Each configuration runs in a fresh process (an out-of-memory probe leaves nothing behind), in
this order, until the deadline (seconds) passes:
  1. a bf16 matmul of 8192^3: the ceiling this GPU reaches;
  2. throughput of a DiT of the paper's width (4096, 32 heads, MLP ratio 4) of `--depth` blocks,
     one configuration per `--variants` entry, `ac<N>[-padded][-compiled]`: activation
     checkpointing of every N-th block (0: none), every other prompt half as long (so the batch
     needs an attention mask), the DiT's blocks compiled (`--compile` of the trainer);
  3. `--fits DEPTH:PROMPTS`: chosen depths and batches within `--gpu-gib` of GPU memory (an 80 GB
     card by default, emulated on a larger one with torch's per-process memory fraction);
  4. the deepest such DiT that trains within `--gpu-gib` at batch 1 (`--depth-search FROM TO`);
  5. the paper-5b preset with the whole card.
MFU counts the model's FLOPs (3 x forward, the PaLM appendix's count; recomputation under
checkpointing is not counted) against the datasheet's dense bf16 peak (989 TFLOP/s for H100 and
H200 SXM). One JSON object a line, to stdout and `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def stand_ins(config, cond_tokens: int, resolution: int, device, padded: bool = False):
    """The mixture, sources, features and latents of a Trainer, fixed tensors of the right shapes.
    padded: every other prompt has half the tokens (the batch then needs an attention mask)."""
    import torch

    from unifusion_core.features import Features
    from unifusion_core.train.data import Sample

    class Mixture:
        def draw(self, n: int) -> list[tuple[str, int]]:
            return [("t2i", i) for i in range(n)]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None: ...

    class Source:
        def get(self, index: int) -> Sample:
            return Sample(id=str(index), task="t2i", prompt="bench")

    spec, g = config.encoder, torch.Generator(device=device).manual_seed(0)
    feat = Features(torch.randn(cond_tokens, len(spec.layers), spec.hidden_size, generator=g, device=device),
                    spec.layers, spec)
    space = config.latent
    side = resolution // space.downscale
    latent = torch.randn(1, space.channels, side, side, generator=g, device=device)
    short = Features(feat.hidden[: max(1, cond_tokens // 2)], spec.layers, spec)
    return (Mixture(), {"t2i": Source()},
            lambda samples: [short if padded and i % 2 else feat for i in range(len(samples))],
            lambda samples, generators: latent.expand(len(samples), -1, -1, -1))


def measure(c: dict) -> dict:
    """One configuration, in this process (launched by `run_one`)."""
    import torch

    from unifusion_core import UniFusionModel
    from unifusion_core.presets import get_preset
    from unifusion_core.train import dist as udist
    from unifusion_core.train.loop import TrainConfig, Trainer
    from unifusion_core.train.throughput import peak_flops

    if c["what"] == "matmul":
        return matmul_ceiling(c["device"])
    d, device = udist.setup(c["device"])
    if device.type == "cuda" and c.get("gpu_gib"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, c["gpu_gib"] * GIB / total), device)
    config = get_preset(c["preset"])
    if c.get("width"):
        config = config.replace(dit={"hidden_size": c["width"], "heads": c["heads"], "depth": c["depth"],
                                     "mlp_ratio": c["mlp_ratio"]})
    out = {**c, "dit_width": config.dit.hidden_size, "dit_depth": config.dit.depth, "mlp_ratio": config.dit.mlp_ratio}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        model = UniFusionModel(config, device=device)
        out["parameters_b"] = {k: round(v / 1e9, 3) for k, v in model.num_parameters().items()}
        mixture, sources, features, latents = stand_ins(config, c["cond_tokens"], c["resolution"], device, c["padded"])
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(out=tmp, steps=10**6, prompts_per_step=c["prompts"], timesteps_per_prompt=c["k"],
                              precision=c["precision"], gradient_checkpointing=c["checkpointing"] > 0,
                              gradient_checkpointing_every=max(1, c["checkpointing"]), compile=c["compile"],
                              device=device.type, warmup=1,
                              # none: a dropped prompt brings an attention mask, so another kernel
                              # and (compiled) another graph mid-measurement; the padded variant
                              # measures masks
                              cond_dropout=0.0)
            trainer = Trainer(cfg, model, mixture, sources, features, latents=latents, dist=d, device=device)
            out["setup_s"] = round(time.perf_counter() - t0, 1)

            def sync():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            for _ in range(max(c["warmup"], 3 if c["compile"] else 0)):  # compiling takes the first steps
                loss = trainer.train_step()["loss"]
            sync()
            t0 = time.perf_counter()
            for _ in range(c["steps"]):
                loss = trainer.train_step()["loss"]
            sync()
            step_s = (time.perf_counter() - t0) / c["steps"]
    except torch.OutOfMemoryError as e:
        out.update(fits=False, error=str(e).splitlines()[0][:300])
        return out
    rows = c["prompts"] * c["k"]
    flops = trainer.flops_per_sample * rows  # model FLOPs of one step
    out.update(fits=True, loss=round(loss, 4), step_s=round(step_s, 4), samples_per_s=round(rows / step_s, 3),
               image_tokens_per_s=round(rows * trainer.image_tokens / step_s, 1),
               model_tflops_per_step=round(flops / 1e12, 2), achieved_tflops=round(flops / step_s / 1e12, 1))
    peak = peak_flops(device, c["precision"])
    if peak:
        out["mfu"] = round(flops / step_s / peak, 4)
    if device.type == "cuda":
        out.update(device_name=torch.cuda.get_device_name(device),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 2))
    del trainer, model
    gc.collect()
    udist.close()
    return out


def run_one(c: dict, timeout: float) -> dict:
    """`measure(c)` in a fresh single-process 'torchrun' world (FSDP2 with one rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**c, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {**c, "error": f"exit {p.returncode}: {p.stderr.strip()[-800:]}"}
    return {**json.loads(lines[-1]), "process_s": round(time.perf_counter() - t0, 1)}


def matmul_ceiling(device: str) -> dict:
    import torch

    from bench.common import matmul_gflops

    if device != "cuda":
        return {"what": "matmul", "device": device}
    n = 8192
    tf = matmul_gflops(n, torch.bfloat16, "cuda", 10, torch.cuda.synchronize) / 1e3
    return {"what": "matmul", "n": n, "dtype": "bf16", "tflops": round(tf, 1),
            "device_name": torch.cuda.get_device_name()}


def plan(args) -> list[dict]:
    base = dict(what="throughput", device=args.device, preset=args.preset, width=args.width, heads=args.heads,
                mlp_ratio=args.mlp_ratio, depth=args.depth, resolution=args.resolution, cond_tokens=args.cond_tokens,
                padded=False, prompts=args.prompts, k=1, precision="bf16", checkpointing=1, compile=False, warmup=2,
                steps=args.steps, gpu_gib=0)
    out = [{"what": "matmul", "device": args.device}]
    for v in args.variants:  # ac<N>[-padded][-compiled]
        m = re.fullmatch(r"ac(\d+)(-padded)?(-compiled)?", v)
        if not m:
            raise SystemExit(f"--variants: {v!r} is not ac<N>[-padded][-compiled] "
                             f"(N: checkpoint every N-th block, 0: none)")
        out.append({**base, "what": f"throughput {v}", "checkpointing": int(m[1]), "padded": bool(m[2]),
                    "compile": bool(m[3])})
    small = dict(steps=2, warmup=1, gpu_gib=args.gpu_gib, compile=args.fit_compiled)
    for fit in args.fits:  # DEPTH:PROMPTS in gpu_gib, all measured
        depth, prompts = map(int, fit.split(":"))
        out.append({**base, **small, "what": f"in {args.gpu_gib:g} GiB", "depth": depth, "prompts": prompts,
                    "steps": args.steps})
    if args.depth_search:
        lo, hi = args.depth_search
        out += [{**base, **small, "what": "fits_in_gpu_gib", "depth": n, "prompts": 1} for n in range(lo, hi + 1)]
    if args.paper_5b:
        out.append({**base, "what": "paper-5b", "preset": "paper-5b", "width": 0, "prompts": 1, "steps": 2, "warmup": 1,
                    "compile": args.fit_compiled})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="paper-5b", help="encoder and latent space (the DiT: --width etc.)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--depth", type=int, default=8, help="blocks of the throughput configurations")
    ap.add_argument("--prompts", type=int, default=4, help="samples per step of the throughput configurations")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--cond-tokens", type=int, default=512)
    ap.add_argument("--gpu-gib", type=float, default=79.0, help="GPU memory of the depth search (80 GB card: 79)")
    ap.add_argument("--depth-search", type=int, nargs=2, default=(14, 19), metavar=("FROM", "TO"),
                    help="depths tried in order; stops at the first that does not fit")
    ap.add_argument("--no-depth-search", dest="depth_search", action="store_const", const=None)
    ap.add_argument("--no-paper-5b", dest="paper_5b", action="store_false")
    ap.add_argument("--variants", nargs="*", default=["ac1", "ac0", "ac1-padded", "ac1-compiled"],
                    help="throughput configurations: ac<N>[-padded][-compiled], "
                         "N: checkpoint every N-th block (0: none)")
    ap.add_argument("--fits", nargs="*", default=[], metavar="DEPTH:PROMPTS",
                    help="configurations measured within --gpu-gib (e.g. 14:4)")
    ap.add_argument("--fit-compiled", action="store_true",
                    help="compile the DiT in --fits, the depth search and paper-5b")
    ap.add_argument("--deadline", type=float, default=420, help="seconds; later configurations are skipped")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(measure(json.loads(args.one))) + "\n")
        return
    t0 = time.perf_counter()
    sink = args.out.open("w") if args.out else None

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if sink:
            sink.write(line + "\n")
            sink.flush()

    searching = True
    for c in plan(args):
        left = args.deadline - (time.perf_counter() - t0)
        if left <= 0:
            emit({**c, "skipped": "deadline"})
            continue
        if c["what"] == "fits_in_gpu_gib" and not searching:
            continue
        rec = run_one(c, timeout=left)
        emit(rec)
        if c["what"] == "fits_in_gpu_gib" and not rec.get("fits"):
            searching = False  # deeper ones do not fit either


if __name__ == "__main__":
    main()
