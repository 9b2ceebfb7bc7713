"""Does a VERIFI rewrite keep what the prompt asks for? Checked exactly on the benchmark's prompts.

    python tools/verifi_fidelity.py --out runs/verifi [--limit 40] [--max-new-tokens 160]

Under VERIFI only the rewritten text tokens condition the DiT (paper Sec. 3.3), so a word the
rewrite drops or changes cannot reach the model: the share of rewrites that keep every attribute
of the prompt bounds the all-correct rate of any model trained and sampled on rewrites. For each
of the benchmark's prompts (the eval CLI's --limit per split) the embedded SmolLM2 rewrites it
greedily with the VERIFI system prompt (batched, as the trainer's --rewrite does) and this checks
that the rewrite names each object's colour and shape, with the colour within three words before
its shape, and the position or the relation. Prints JSON; writes every rewrite to OUT/rewrites.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSITION_WORDS = {"on the left": ("left",), "on the right": ("right",), "at the top": ("top", "upper", "above"),
                  "at the bottom": ("bottom", "lower", "below"), "in the center": ("center", "centre", "middle")}
RELATION_WORDS = {"to the left of": ("left",), "above": ("above", "over", "on top of")}


def check(scene, text: str) -> dict[str, bool]:
    """Which of the scene's attributes the text still names."""
    words = re.findall(r"[a-z]+", text.lower())
    joined = " ".join(words)

    def near(colour: str, shape: str) -> bool:  # the colour within three words before its shape
        return any(w.startswith(shape[:5]) and colour in words[max(0, i - 3):i] for i, w in enumerate(words))

    out = {
        "color": all(o.color in words for o in scene.objects),
        "shape": all(any(w.startswith(o.shape[:5]) for w in words) for o in scene.objects),
        "binding": all(near(o.color, o.shape) for o in scene.objects),
    }
    if scene.position is not None:
        out["position"] = any(w in joined for w in POSITION_WORDS[scene.position])
    if scene.relation is not None:
        out["relation"] = any(w in joined for w in RELATION_WORDS[scene.relation])
    out["all"] = all(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=40, help="prompts per split (the eval CLI's choice)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="the system prompt asks for at most 120 words")
    ap.add_argument("--vlm", help="default: the embedded SmolLM2-135M-Instruct GGUF")
    args = ap.parse_args()

    from unifusion_core import load_vlm
    from unifusion_core.assets import bundled_vlm
    from unifusion_core.eval.__main__ import pick_scenes

    scenes = [s for split in ("train", "heldout") for s in pick_scenes(split, args.limit)]
    vlm = load_vlm(args.vlm or bundled_vlm())
    t0 = time.perf_counter()
    rewrites = vlm.rewrite_batch([s.prompt for s in scenes], max_new_tokens=args.max_new_tokens, batch_size=16)
    seconds = time.perf_counter() - t0
    rows = [{"prompt": s.prompt, "split": s.split, "rewrite": r.text, "tokens": len(r.ids), **check(s, r.text)}
            for s, r in zip(scenes, rewrites)]
    keys = ["color", "shape", "binding", "position", "relation", "all"]
    summary = {"prompts": len(rows), "vlm": vlm.name, "max_new_tokens": args.max_new_tokens,
               "rewrite_seconds": round(seconds, 1),
               "mean_rewrite_tokens": round(sum(r["tokens"] for r in rows) / len(rows), 1),
               "hit_token_limit": sum(r["tokens"] >= args.max_new_tokens for r in rows)}
    for split in ("train", "heldout", None):
        part = [r for r in rows if split is None or r["split"] == split]
        summary[split or "overall"] = {
            k: round(sum(r[k] for r in part if k in r) / max(1, sum(k in r for r in part)), 4) for k in keys}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rewrites.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
