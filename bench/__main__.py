"""python -m bench NAME [args]: one benchmark (see bench/__init__.py); `dit` when no name is given."""

from __future__ import annotations

import importlib
import sys

# name -> (module, its entry point)
BENCHMARKS = {
    "dit": ("dit", "bench_dit"),
    "vlm": ("vlm", "bench_vlm"),
    "encode": ("vlm", "bench_encode"),
    "load": ("vlm", "bench_load"),
    "train": ("train", "bench_train"),
    "lora": ("lora", "main"),
    "train-buckets": ("buckets", "main"),
    "dit-vs-diffusers": ("dit_vs_diffusers", "main"),
    "distributed": ("distributed", "main"),
    "gpu-train": ("gpu_train", "main"),
    "scene-vlm": ("scene_vlm", "main"),
    "node-overhead": ("node_overhead", "main"),
    "dit-ops": ("dit_ops", "main"),
    "rope-precision": ("rope_precision", "main"),
}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and argv[0] in BENCHMARKS else "dit"
    rest = argv[1:] if argv and argv[0] in BENCHMARKS else argv
    module, entry = BENCHMARKS[name]
    return getattr(importlib.import_module(f"bench.{module}"), entry)(rest)


if __name__ == "__main__":
    main()
