"""nodes/host.py's ComfyUI seam for the pixel space's previews, the VLM's comfy.ops layers and the device
choice. The ComfyUI parts run in a child process with ComfyUI's modules (tests/in_comfyui.py); they are
skipped without COMFYUI_ROOT, the device choice is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nodes

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")


@pytest.fixture(scope="module")
def in_comfyui(tmp_path_factory):
    if not COMFYUI_ROOT:
        pytest.skip("COMFYUI_ROOT is not set: point it at a ComfyUI checkout to check the host seam in ComfyUI")
    script = Path(__file__).with_name("in_comfyui.py")
    done = subprocess.run([os.environ.get("COMFYUI_PYTHON") or sys.executable, str(script), COMFYUI_ROOT,
                           str(tmp_path_factory.mktemp("in-comfyui"))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pixel_space_previews_are_the_core_decode_of_x0(in_comfyui):
    """Previews on: the JPEG the progress bar gets holds exactly the pixels generate.to_rgb makes of
    x0; off (--preview-method none): no previewer."""
    assert in_comfyui["check_pixel_previews"] == "ok", in_comfyui["check_pixel_previews"]


def test_vlm_in_comfy_ops_layers_encodes_exactly_as_before(in_comfyui):
    """The tiny InternVL with its layers turned into comfy.ops ones (weights untouched) gives the same
    features, fully and partially loaded by ComfyUI's ModelPatcher."""
    assert in_comfyui["check_comfy_layers"] == "ok", in_comfyui["check_comfy_layers"]


def test_compiled_blocks_run_partially_loaded_and_with_fp8_weights(in_comfyui):
    """Sample's compile switch with ComfyUI's low-VRAM partial load (layers cast one by one inside the
    compiled blocks) and fp8 weight storage: the eager latents."""
    assert in_comfyui["check_compiled_partial_load"] == "ok", in_comfyui["check_compiled_partial_load"]


def test_compile_is_held_back_where_comfyui_patches_a_partial_load_layer_by_layer(in_comfyui):
    """Partially loaded with a LoRA, ComfyUI's per-layer patches would give every block its own graph:
    host.compile_blocker says so (and the Sample node then runs eagerly); fully loaded with a LoRA, or
    partially without one, nothing holds compile back."""
    assert in_comfyui["check_compile_blocker"] == "ok", in_comfyui["check_compile_blocker"]


def test_device_choices_are_the_machines():
    found = nodes.host.devices()
    assert found[:2] == ["default", "cpu"]
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert [d for d in found if d.startswith("cuda")] == cuda
    assert nodes.NODE_CLASS_MAPPINGS["UniFusionVLMLoad"].INPUT_TYPES()["required"]["device"][0] == found
    assert nodes.host.chosen_device("cpu", "X") == torch.device("cpu")
    assert nodes.host.chosen_device("default", "X") == nodes.host.load_device(text_encoder=True)


def test_a_device_not_on_this_machine_is_refused_by_name():
    """A workflow saved where cuda:7 existed: VLM Load says which device is missing and what there is."""
    with pytest.raises(ValueError, match=r"UniFusion VLM Load: device 'cuda:7' is not on this machine \(it has "
                                         r"default, cpu.*choose one"):
        nodes.NODE_CLASS_MAPPINGS["UniFusionVLMLoad"]().load("tiny-internvl", device="cuda:7")
