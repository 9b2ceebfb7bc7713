"""UniFusionModel: presets, encoders, encode() batching and its errors."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_features
from torch.testing import assert_close

import unifusion_core as uf

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_builds_on_meta():
    for name in uf.PRESETS:
        m = uf.UniFusionModel.from_preset(name, device="meta")
        assert m.num_parameters()["total"] > 0


def test_from_preset_follows_the_encoder():
    smol = uf.EncoderSpec("llama", "SmolLM2-135M-Instruct", 576, 30, uf.every_nth_layer(30))
    m = uf.UniFusionModel.from_preset("tiny", vlm=smol, device="meta")
    assert (m.lap.num_layers, m.lap.hidden_size) == (11, 576)
    assert m.config.encoder == smol
    # Features carry their encoder too
    f = uf.Features(torch.zeros(2, 11, 576), smol.layers, encoder=smol)
    assert uf.UniFusionModel.from_preset("tiny", vlm=f, device="meta").config.encoder == smol


def test_overrides_and_their_errors():
    m = uf.UniFusionModel.from_preset("tiny", dit={"depth": 1}, latent="flux", device="meta")
    assert len(m.dit.blocks) == 1 and m.dit.in_channels == 16
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        uf.UniFusionModel.from_preset("huge")
    with pytest.raises(ValueError, match="unknown override 'depth'"):
        uf.UniFusionModel.from_preset("tiny", depth=3)
    with pytest.raises(ValueError, match="unknown latent space 'sd15'"):
        uf.UniFusionModel.from_preset("tiny", latent="sd15")
    with pytest.raises(ValueError, match="hidden_size 64 must be divisible by heads 5"):
        uf.UniFusionModel.from_preset("tiny", dit={"heads": 5})
    with pytest.raises(ValueError, match="lap.heads=3 must divide the encoder hidden size 32"):
        uf.UniFusionModel.from_preset("tiny", lap={"heads": 3})
    with pytest.raises(ValueError, match="layers must be increasing"):
        uf.EncoderSpec("x", "x", 8, 4, (0, 5))


def test_encode_batches_prompts_of_different_lengths(tiny):
    enc = tiny.config.encoder
    a = uf.Features(tiny_features(B=1, T=6, seed=1)[0], enc.layers, enc)
    b = uf.Features(tiny_features(B=1, T=3, seed=2)[0], enc.layers, enc)
    both = tiny.encode([a, b])
    assert both.tokens.shape == (2, 6, 64) and both.mask.tolist()[1] == [True] * 3 + [False] * 3
    assert_close(both.tokens[1, :3], tiny.encode(b).tokens[0], atol=1e-5, rtol=1e-5)
    assert_close(both.tokens[0], tiny.encode(a).tokens[0], atol=1e-5, rtol=1e-5)
    # and the sampled latents of the padded batch item equal those of the item alone
    assert_close(
        tiny.sample(both, 8, 8, steps=2, batch_size=2, seed=0)[1:],
        tiny.sample(tiny.encode(b), 8, 8, steps=2, seed=0, batch_size=2)[1:],
        atol=1e-4, rtol=1e-4,
    )


def test_encode_layer_drop_uses_vlm_layer_indices(tiny):
    h = tiny_features(B=1, T=4)
    with torch.no_grad():
        expected = tiny.refiner(tiny.lap(h, layer_drop=[2]))
    assert_close(tiny.encode(h, layer_drop=[6]).tokens, expected)
    with pytest.raises(ValueError, match=r"layer_drop \[4\] not among the model's VLM layers \[0, 3, 6\]"):
        tiny.encode(h, layer_drop=[4])


def test_encode_errors(tiny):
    with pytest.raises(ValueError, match=r"features must be \(B, T, 3, 32\) for encoder 'tiny-random'"):
        tiny.encode(torch.randn(1, 4, 3, 16))
    with pytest.raises(ValueError, match="hold no tokens"):
        tiny.encode(torch.randn(1, 0, 3, 32))
    with pytest.raises(ValueError, match="at least one unmasked"):
        tiny.encode(torch.randn(2, 3, 3, 32), torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    other = uf.EncoderSpec("qwen2", "Qwen2.5-0.5B", 32, 6, (0, 3, 6))
    f = uf.Features(torch.randn(4, 3, 32), other.layers, encoder=other)
    with pytest.raises(ValueError, match="come from 'Qwen2.5-0.5B'.*trained against 'tiny-random'"):
        tiny.encode(f)


def test_core_never_imports_comfyui():
    banned = {"comfy", "folder_paths", "server", "nodes", "comfy_extras"}
    for path in (ROOT / "unifusion_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in banned for n in names), f"{path.name} imports {names}"


def test_pack_imports_without_comfyui():
    """ComfyUI loads the repository folder as a package; that must work with no ComfyUI around."""
    assert "comfy" not in sys.modules
    spec = importlib.util.spec_from_file_location(
        "unifusion_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["unifusion_pack"] = pack
    try:
        spec.loader.exec_module(pack)
        assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
        assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)
    finally:
        for name in [n for n in sys.modules if n.startswith("unifusion_pack")]:
            del sys.modules[name]
