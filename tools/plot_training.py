"""Plot a run's validation scores and loss against training time (PNG, drawn with PIL).

    python tools/plot_training.py RUN_DIR [--out FILE.png]

Reads RUN_DIR/metrics.jsonl: the all-correct rate (micro) and per-category scores of the train and
held-out validation prompts at each validation, and the training loss, against training seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = {  # (split, key) -> colour
    ("train", "micro"): (220, 40, 40),
    ("heldout", "micro"): (40, 90, 220),
    ("train", "color"): (240, 150, 150),
    ("train", "position"): (150, 200, 150),
    ("train", "shape"): (200, 160, 230),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [json.loads(x) for x in (args.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    kept: list[dict] = []
    for r in rows:  # a resume recomputes the steps after its state: the later rows replace the earlier
        while kept and (kept[-1]["step"] > r["step"] or (kept[-1]["step"] == r["step"] and "validation" not in r)):
            kept.pop()
        kept.append(r)
    rows = kept
    offset, last = 0.0, 0.0
    for r in rows:  # runs resumed by versions before 2026-11-25 restarted the clock at the resume
        if r["train_seconds"] + offset < last - 1:
            offset = last
        r["train_seconds"] += offset
        last = r["train_seconds"]
    vals = [r for r in rows if "validation" in r]
    losses = [r for r in rows if "loss" in r]
    W, H, pad = 720, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    tmax = max(r["train_seconds"] for r in rows) or 1
    x = lambda t: pad + (W - 2 * pad) * t / tmax
    y = lambda v: H - pad - (H - 2 * pad) * v
    d.rectangle([pad, pad, W - pad, H - pad], outline=(0, 0, 0))
    for v in (0.25, 0.5, 0.75):
        d.line([pad, y(v), W - pad, y(v)], fill=(225, 225, 225))
        d.text((8, y(v) - 6), f"{v:.2f}", fill=(0, 0, 0))
    lmax = max(r["loss"] for r in losses)
    d.line([(x(r["train_seconds"]), y(r["loss"] / lmax)) for r in losses], fill=(160, 160, 160), width=1)
    legend = [("loss (scaled)", (160, 160, 160))]
    for (split, key), colour in SERIES.items():
        pts = [(x(r["train_seconds"]), y(r["validation"][split][key]))
               for r in vals if key in r["validation"].get(split, {})]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        legend.append((f"{split} {key}", colour))
    for i, (name, colour) in enumerate(legend):
        d.rectangle([W - pad - 150, pad + 8 + 14 * i, W - pad - 140, pad + 18 + 14 * i], fill=colour)
        d.text((W - pad - 135, pad + 6 + 14 * i), name, fill=(0, 0, 0))
    d.text((pad, H - pad + 10), f"training time: 0 .. {tmax / 60:.0f} min (validation and checkpoints excluded)",
           fill=(0, 0, 0))
    d.text((pad, 15), f"{args.run.name}: validation scores (exact detector) and loss", fill=(0, 0, 0))
    out = args.out or args.run / "score_vs_time.png"
    img.save(out)
    print(out)


if __name__ == "__main__":
    main()
