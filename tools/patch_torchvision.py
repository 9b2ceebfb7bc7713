"""Make PyPI's torchvision importable next to a CPU-only torch, for the real-ComfyUI tests.

ComfyUI imports torchvision. PyPI's torchvision 0.28 is a CUDA build; with a CPU torch its C++ ops
do not load, and two fake-kernel registrations (nms, qnms) in _meta_registrations.py then fail at
import time. This guards those two so they apply only when the ops exist. Idempotent; does
nothing when torchvision already imports.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        sys.exit("torchvision is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    text = path.read_text()
    patched = re.sub(
        r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$',
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))",
        text,
        flags=re.M,
    )
    path.write_text(patched)
    subprocess.run([sys.executable, "-c", "import torchvision"], check=True)


if __name__ == "__main__":
    main()
