"""tools/gpu_issue22.py, the script a session with a GPU runs once: its dry run (the same code paths,
tiny, on the CPU) must stay green here, because the GPU's minutes are too few to debug it there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")


@pytest.mark.skipif(not COMFYUI_ROOT, reason="the t2i stage runs the nodes inside ComfyUI's modules: set COMFYUI_ROOT")
def test_the_gpu_script_dry_run_measures_what_it_promises(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_issue22.py", "--out", str(tmp_path), "--dry-run",
                           "--comfyui", COMFYUI_ROOT, "--stages", "dit-ops", "t2i-24gb"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s: v["status"] for s, v in summary.items()} == {"dit-ops": "ok", "t2i-24gb": "ok"}, \
        [json.loads((tmp_path / f"{s}.json").read_text()).get("error") for s in summary]
    ops = json.loads((tmp_path / "dit-ops.json").read_text())
    assert [r["variant"] for r in ops["runs"]] == ["previous", "fused", "compiled"]
    t2i = json.loads((tmp_path / "t2i-24gb.json").read_text())
    assert "edit_tile_images" in t2i["nodes"]
    for node in ("verifi_rewrite", "lap_encode", "sample", "edit_verifi_rewrite", "edit_sample",
                 "sample_compiled_first", "sample_compiled_second"):
        assert t2i["nodes"][node]["s"] > 0, node
    assert t2i["features_equal_after_reload"] and t2i["edit_image_tokens"] > 0
    compiled = t2i["sample_compiled"]
    assert compiled["notes"][1] == ["compile: reused the graphs compiled before (nothing compiled)"]
    assert compiled["latent_max_abs_diff_vs_eager"] < 1e-4
