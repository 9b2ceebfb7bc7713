"""Copy a trained checkpoint into the pack as the embedded model, weights in fp16 (half the size).

    python tools/ship_model.py runs/scenes64/model.safetensors

Writes unifusion_core/assets/unifusion-scenes-64.safetensors; CPUs load it back in fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    import unifusion_core as uf
    from unifusion_core.assets import BUNDLED_MODEL

    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    model = uf.load_model(sys.argv[1], dtype=torch.float32)
    BUNDLED_MODEL.parent.mkdir(parents=True, exist_ok=True)
    uf.save_model(model.half(), BUNDLED_MODEL)
    BUNDLED_MODEL.chmod(0o644)
    print(BUNDLED_MODEL, f"{BUNDLED_MODEL.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
