"""Soak benchmark: many headless runs of the pack in a real ComfyUI, the server's memory sampled.

    python tools/soak_comfyui.py --runs 200 [--comfyui ../shared/comfyui]

Starts ComfyUI (CPU) with the tiny test models (tests/comfyui_harness.py), warms it up, then
queues `--runs` prompts one after another: text to image and image editing with a new rewrite seed
and a new noise seed each time (so the VLM writes and the DiT samples on every run; only the model
loads are cached), and every tenth run one of the bad inputs (an error path). After each run it
reads the server's resident memory (VmRSS) from /proc. Prints one JSON object: growth from the
first sample after warm-up to the end, in MiB and percent, the slope over the second half (MiB
per 100 runs; a leak shows here even when the first runs settle), and seconds per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from comfyui_harness import Server, build_base, messages, node_id, tiny_prompt

PROMPTS = ("UniFusion text to image", "UniFusion edit an image")
BAD = (("UniFusionSample", "cfg", float("nan")), ("UniFusionLAPEncode", "layer_drop", "999"),
       ("UniFusionVERIFIRewrite", "sample", False))  # the last: an empty rewrite, refused


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one(server: Server, i: int) -> str | None:
    """Run prompt i; None when it ran as expected (success, or the error a bad input must give),
    else what happened."""
    prompt = tiny_prompt(PROMPTS[i % 2], seed=1000 + i)
    prompt[node_id(prompt, "UniFusionVERIFIRewrite")]["inputs"]["seed"] = 1000 + i
    bad = BAD[(i // 10) % len(BAD)] if i % 10 == 9 else None
    if bad:
        prompt[node_id(prompt, bad[0])]["inputs"][bad[1]] = bad[2]
    entry = server.run(prompt)
    status = entry["status"]["status_str"]
    err = messages(entry).get("execution_error") or {}
    if (status == "error" and err.get("node_type") == bad[0]) if bad else status == "success":
        return None
    return (f"run {i} ({PROMPTS[i % 2]}{', bad ' + bad[1] if bad else ''}): {status}: "
            f"{err.get('exception_message', '')[:160]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=str(ROOT.parent / "shared" / "comfyui"), help="a ComfyUI source tree")
    ap.add_argument("--python", default=sys.executable, help="the Python of ComfyUI's environment")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_base(tmp / "base", tmp / "work")
        server = Server(tmp / "base", tmp / "server.log", args.comfyui, args.python)
        try:
            server.wait_ready()
            idle = rss_mib(server.proc.pid)
            for i in range(args.warmup):
                one(server, -1 - i)
            samples, unexpected, t0 = [], [], time.perf_counter()
            for i in range(args.runs):
                if (what := one(server, i)) is not None:
                    unexpected.append(what)
                samples.append(rss_mib(server.proc.pid))
                if (i + 1) % 50 == 0:
                    print(f"run {i + 1}: {samples[-1]:.0f} MiB", file=sys.stderr)
            seconds = time.perf_counter() - t0
        finally:
            server.stop()

    half = samples[len(samples) // 2:]
    xs = range(len(half))
    mx, my = (len(half) - 1) / 2, sum(half) / len(half)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, half)) / sum((x - mx) ** 2 for x in xs)
    print(json.dumps({
        "runs": args.runs, "warmup_runs": args.warmup, "unexpected_results": unexpected,
        "bad_inputs": args.runs // 10,
        "rss_idle_mib": round(idle, 1), "rss_after_warmup_mib": round(samples[0], 1),
        "rss_end_mib": round(samples[-1], 1), "rss_max_mib": round(max(samples), 1),
        "growth_mib": round(samples[-1] - samples[0], 1),
        "growth_percent": round(100 * (samples[-1] / samples[0] - 1), 2),
        "second_half_slope_mib_per_100_runs": round(100 * slope, 2),
        "seconds_per_run": round(seconds / args.runs, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
