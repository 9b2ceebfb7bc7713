"""Draw the pack's registry icon, docs/icon.png: the demo prompt's scene ("a red circle to the left
of a blue square") rendered by the synthetic-scene renderer the embedded model was trained on.

    python tools/make_icon.py            # writes docs/icon.png (256 x 256, about 1 KB)

pyproject.toml's [tool.comfy] Icon points at this file's raw URL in the repository.
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unifusion_core import scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "icon.png")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    img = scenes.render(scenes.parse_prompt("a red circle to the left of a blue square"), size=4 * args.size)
    img = Image.fromarray(img).resize((args.size, args.size), Image.LANCZOS)  # smooth edges
    img.quantize(colors=32).save(args.out, optimize=True)  # a palette PNG: flat colours stay small
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
