"""Checks of nodes/host.py that need ComfyUI's own modules in the process (comfy.ops, ModelPatcher,
latent_preview), run in a child process by tests/test_host_comfyui.py: ComfyUI's root has a `nodes`
module of its own, so the pack is imported as ComfyUI imports it, as the package `unifusion`.

    python tests/in_comfyui.py COMFYUI_ROOT WORK_DIR  -> one JSON line {check: "ok" | traceback}
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check_pixel_previews(host, uf, ca, work: Path) -> None:
    import latent_preview
    import numpy as np
    import torch
    from unifusion.unifusion_core.generate import to_rgb

    x0 = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(0)) * 0.8  # beyond -1..1 too
    ca.args.preview_method = ca.LatentPreviewMethod.NoPreviews
    assert host.previewer("pixel", torch.device("cpu")) is None, "previews are off: no previewer"
    for method in (ca.LatentPreviewMethod.Auto, ca.LatentPreviewMethod.Latent2RGB, ca.LatentPreviewMethod.TAESD):
        ca.args.preview_method = method
        fmt, image, max_size = host.previewer("pixel", torch.device("cpu"))(x0)
        assert fmt == "JPEG" and image.mode == "RGB" and image.size == (32, 24), (fmt, image)
        assert max_size == latent_preview.MAX_PREVIEW_RESOLUTION
        expected = to_rgb(uf.get_latent_space("pixel").to_raw(x0))[0]  # the core's decode of the first image
        got = torch.tensor(np.array(image))
        assert torch.equal(got, torch.from_numpy(expected)), (got.float() - torch.tensor(expected).float()).abs().max()
        assert host.previewer("flux", torch.device("cpu")) is not None  # the other spaces keep theirs


def check_comfy_layers(host, uf, ca, work: Path) -> None:
    import comfy.model_management as mm
    import comfy.ops
    import tiny_vlms
    import torch

    path = tiny_vlms.make_tiny_internvl(work / "tiny-internvl")
    encoder = uf.load_vlm(path)
    image = torch.rand(1, 70, 90, 3, generator=torch.Generator().manual_seed(1))
    tiled = encoder.tile(image, max_tiles=2, thumbnail=True)

    def features():
        f = encoder.encode("a red square beside a blue circle", tiled, rewrite=False)
        return f.hidden  # (T, L, D)

    torch.manual_seed(0)
    before = features()
    params = {n: (p.data_ptr(), p.dtype) for n, p in encoder.model.named_parameters()}
    linears = [n for n, m in encoder.model.named_modules() if type(m) is torch.nn.Linear]
    converted = host.comfy_layers(encoder.model)
    assert converted >= len(linears) > 0, (converted, len(linears))
    kinds = dict(encoder.model.named_modules())
    assert all(type(kinds[n]) is comfy.ops.disable_weight_init.Linear for n in linears)
    after = {n: (p.data_ptr(), p.dtype) for n, p in encoder.model.named_parameters()}
    assert after == params, "the weights must stay the same tensors (no copy, same dtype)"
    encoder.model.compute_device = torch.device("cpu")
    assert torch.equal(features(), before), "fully loaded, the converted VLM must encode exactly as before"
    # ComfyUI's low-VRAM path: a budget smaller than the model leaves the larger layers to be cast
    # layer by layer (comfy_cast_weights on); the features stay exactly the same.
    managed = host.Managed(encoder, encoder.model, torch.device("cpu"), torch.device("cpu"), partial=True)
    managed.patcher.load(torch.device("cpu"), lowvram_model_memory=managed.patcher.model_size() // 3)
    cast = [m for m in encoder.model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert 0 < len(cast) < converted, f"{len(cast)} of {converted} layers cast: not a partial load"
    assert torch.equal(features(), before), "partially loaded, the converted VLM must encode exactly as before"
    managed.patcher.detach()
    assert mm.module_size(encoder.model) > 0


def check_compiled_partial_load(host, uf, ca, work: Path) -> None:
    """Sample's compile switch where ComfyUI loads the DiT partially (its low-VRAM path: the larger
    layers cast layer by layer inside the compiled blocks) and with fp8 weight storage: the eager
    latents, fully and partially loaded."""
    import torch

    torch.manual_seed(0)
    start = uf.dit.graphs_compiled()
    for storage in (None, torch.float8_e4m3fn):
        model = uf.UniFusionModel.from_preset("tiny", operations=host.operations(storage, torch.float32))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
            if storage is not None:
                for m in model.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.data = m.weight.data.to(storage)
        managed = host.Managed(model, model, torch.device("cpu"), torch.device("cpu"), partial=True)
        hidden = torch.randn(1, 6, model.config.num_layers, model.config.encoder.hidden_size)
        with torch.no_grad():
            cond = model.encode(hidden)
        args = dict(width=32, height=32, steps=2, cfg=3.0, seed=1)
        with torch.no_grad():
            eager = model.sample(cond, **args)
        managed.patcher.load(torch.device("cpu"), lowvram_model_memory=managed.patcher.model_size() // 3)
        cast = [m for m in model.dit.modules() if getattr(m, "comfy_cast_weights", False)]
        assert cast, f"{storage}: not a partial load"
        model.dit.compile_blocks(True)
        with torch.no_grad(), uf.dit.compile_errors():
            compiled = model.sample(cond, **args)
        model.dit.compile_blocks(False)
        managed.patcher.detach()
        diff = float((compiled - eager).abs().max())
        assert diff < 1e-4, f"{storage}: compiled and partially loaded, {diff} from the eager latents"
    assert uf.dit.graphs_compiled() > start, "nothing was compiled"


def check_compile_blocker(host, uf, ca, work: Path) -> None:
    """host.compile_blocker names the one load state that would compile every block on its own: the
    model partially loaded with a LoRA (ComfyUI's LowVramPatch per layer); a LoRA fully loaded
    (patched in place) or a partial load without one compile as usual."""
    import copy

    import torch

    torch.manual_seed(0)
    model = uf.UniFusionModel.from_preset("tiny", dit={"depth": 3}, operations=host.operations(None, torch.float32))
    source = copy.deepcopy(model)
    uf.lora.add_lora(source, uf.lora.LoRAConfig(4, 0, "dit"))
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("lora_up"):
                p.normal_(0, 0.1)
    lora = uf.lora.read_lora(uf.lora.save_lora(source, work / "blocker-lora.safetensors"))
    managed = host.Managed(model, model, torch.device("cpu"), torch.device("cpu"), partial=True)
    patched = host.with_lora(managed, lora, 1.0)
    third = managed.patcher.model_size() // 3
    for patcher, budget, blocked in ((managed.patcher, third, False), (patched.patcher, None, False),
                                     (patched.patcher, third, True)):
        if budget is None:
            patcher.load(torch.device("cpu"), full_load=True)
        else:
            patcher.load(torch.device("cpu"), lowvram_model_memory=budget)
        why = host.compile_blocker(model.dit)
        assert (why is not None) == blocked, (budget, why)
        if blocked:
            assert "LoRA" in why and "eagerly" in why
        patcher.detach()


CHECKS = [check_pixel_previews, check_comfy_layers, check_compiled_partial_load, check_compile_blocker]


def main() -> None:
    comfyui_root, work = sys.argv[1], Path(sys.argv[2])
    (work / "pack").mkdir(parents=True, exist_ok=True)
    link = work / "pack" / "unifusion"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    sys.path[:0] = [comfyui_root, str(work / "pack"), str(ROOT / "tests")]
    import comfy.cli_args as ca

    ca.args.cpu = True  # before anything imports comfy.model_management
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    host = importlib.import_module("unifusion.nodes.host")
    uf = importlib.import_module("unifusion.unifusion_core")
    assert host.IN_COMFYUI
    results = {}
    for check in CHECKS:
        try:
            check(host, uf, ca, work)
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
