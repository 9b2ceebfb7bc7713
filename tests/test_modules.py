"""LAP, refiner and DiT: shapes, numerics against plain references, and their invariances."""

import types

import pytest
import reference as ref
import torch
from conftest import tiny_features
from torch import nn
from torch.testing import assert_close

import unifusion_core as uf
from unifusion_core.dit import patchify, unpatchify
from unifusion_core.layers import apply_rope, rope_angles

HEADS = 2  # the tiny preset's LAP / refiner heads


# --- LAP ----------------------------------------------------------------------------------------


def test_lap_matches_reference(tiny):
    h = tiny_features(B=2, T=3)
    with torch.no_grad():
        out = tiny.lap(h)
        assert out.shape == (2, 3, 32)
        assert_close(out, ref.lap(h, tiny.lap, HEADS), atol=1e-5, rtol=1e-4)


def test_lap_layer_drop_zeroes_that_layer_in_the_pool(tiny):
    h = tiny_features(B=1, T=4)
    with torch.no_grad():
        dropped = tiny.lap(h, layer_drop=[1])
        assert_close(dropped, ref.lap(h, tiny.lap, HEADS, drop=[1]), atol=1e-5, rtol=1e-4)
        # Equivalent to zeroing that layer's block of pooling weights (Fig. 12).
        D = tiny.lap.hidden_size
        tiny.lap.pool.weight[:, D : 2 * D] = 0
        assert_close(tiny.lap(h), dropped)
        assert not torch.allclose(dropped, tiny.lap(h, layer_drop=[0]))


def test_lap_layer_weight_magnitude(tiny):
    mag = tiny.lap.layer_weight_magnitude()
    assert mag.shape == (3,) and torch.isclose(mag.sum(), torch.tensor(1.0))
    D = tiny.lap.hidden_size
    with torch.no_grad():
        tiny.lap.pool.weight[:, 2 * D :] *= 10
    assert tiny.lap.layer_weight_magnitude().argmax() == 2


def test_lap_survives_fp16_with_massive_activations(tiny):
    """VLM residual streams carry values beyond fp16's range; LAP normalises them in fp32."""
    h = tiny_features(B=1, T=3)
    h[0, 1, 2, 5] = 2e5
    with torch.no_grad():
        out = tiny.half().lap(h)  # fp32 states straight from the VLM into an fp16 LAP
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert_close(out.float(), tiny.float().lap(h), atol=5e-2, rtol=5e-2)


def test_lap_rejects_wrong_layer_count(tiny):
    with pytest.raises(ValueError, match=r"\(B, T, 3, 32\)"):
        tiny.lap(torch.randn(1, 2, 4, 32))


# --- refiner ------------------------------------------------------------------------------------


def test_refiner_matches_reference_with_padding(tiny):
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = tiny.refiner(x, mask)
        assert out.shape == (2, 5, 64)
        expected = ref.refiner(x, tiny.refiner, HEADS, mask)
    assert_close(out[mask], expected[mask], atol=1e-5, rtol=1e-4)


def test_refiner_padding_changes_nothing(tiny):
    x = torch.randn(1, 4, 32)
    padded = torch.cat([x, 100 * torch.randn(1, 3, 32)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        assert_close(tiny.refiner(padded, mask)[:, :4], tiny.refiner(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_complex_rotation(dtype):
    x = torch.randn(2, 6, 3, 16)  # (B, S, heads, Dh)
    pos = torch.randint(0, 500, (2, 6, 3)).float()
    out = apply_rope(x.to(dtype), rope_angles(pos, [4, 6, 6], 10_000.0))
    assert out.dtype == dtype
    for b in range(2):
        for h in range(3):
            want = ref.rotate(x.to(dtype)[b, :, h].float(), pos[b], [4, 6, 6], 10_000.0)
            # fp32 math, one rounding at the end: within half a bf16 step of the exact rotation
            tol = 1e-5 if dtype == torch.float32 else 2**-8
            assert_close(out[b, :, h].float(), want, atol=tol, rtol=tol)
    # any number of middle axes ((B, S, 2, heads, Dh): q and k at once) rotate alike
    both = apply_rope(torch.stack([x, 2 * x], dim=2), rope_angles(pos, [4, 6, 6], 10_000.0))
    assert_close(both[:, :, 0], apply_rope(x, rope_angles(pos, [4, 6, 6], 10_000.0)), atol=0, rtol=0)
    assert_close(both[:, :, 1], 2 * both[:, :, 0], atol=1e-5, rtol=1e-5)


# --- DiT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,H,W", [(1, 3, 5), (2, 4, 6), (2, 8, 2), (4, 8, 12)])
def test_patchify_round_trip_is_exact(p, H, W):
    x = torch.randn(2, 3, H, W)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (H // p) * (W // p), 3 * p * p)
    assert torch.equal(unpatchify(tokens, p, H // p, W // p), x)
    # token 1 is the patch at row 0, column 1
    if W // p > 1:
        assert torch.equal(tokens[0, 1], x[0, :, :p, p : 2 * p].reshape(-1))


def test_dit_matches_reference_with_padded_mixed_batch(tiny):
    x = torch.randn(2, 3, 4, 6)
    t = torch.tensor([0.3, 0.9])
    cond = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        v = tiny.dit(x, t, cond, mask)
        assert v.shape == x.shape
        assert_close(v, ref.dit(tiny.dit, x, t, cond, mask), atol=1e-4, rtol=1e-4)


def test_dit_padding_changes_nothing(tiny):
    x, t = torch.randn(1, 3, 4, 4), torch.tensor([0.5])
    cond = torch.randn(1, 3, 64)
    padded = torch.cat([cond, 50 * torch.randn(1, 4, 64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        assert_close(tiny.dit(x, t, padded, mask), tiny.dit(x, t, cond), atol=1e-5, rtol=1e-5)


def test_adaln_zero_blocks_are_identity_at_init():
    model = uf.UniFusionModel.from_preset("tiny")
    dit = model.dit
    seq, mod = torch.randn(2, 9, 64), dit.time_mod(torch.randn(2, 64)).unflatten(-1, (6, -1))
    rope = rope_angles(torch.zeros(2, 9, 3), dit.params.axes_dim, 1e4)
    with torch.no_grad():
        for block in dit.blocks:
            assert torch.equal(block(seq, mod, None, rope), seq)
        v = dit(torch.randn(1, 3, 4, 4), torch.tensor([0.5]), torch.randn(1, 2, 64))
    assert torch.equal(v, torch.zeros_like(v))


def test_dit_rejects_sizes_off_the_patch_grid(tiny):
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        tiny.dit(torch.randn(1, 3, 5, 4), torch.tensor([0.5]), torch.randn(1, 2, 64))


def test_gradient_checkpointing_gives_same_gradients(tiny, monkeypatch):
    import unifusion_core.dit as dit_module

    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, cond = torch.randn(2, 3, 4, 4), torch.tensor([0.2, 0.7]), torch.randn(2, 3, 64)
    grads, counts = [], []
    # off; every block; every other block (blocks 0, 2, ...: the trainer's gradient_checkpointing_every)
    for ckpt in (False, True, 2):
        tiny.zero_grad()
        tiny.dit.gradient_checkpointing = ckpt
        calls.clear()
        tiny.dit(x, t, cond).square().mean().backward()
        counts.append(len(calls))
        grads.append([p.grad.clone() for n, p in tiny.dit.named_parameters() if n != "null_cond"])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert_close(a, b)
    n = len(tiny.dit.blocks)
    assert n >= 2 and counts == [0, n, (n + 1) // 2]  # each chosen block checkpointed once
    calls.clear()
    with torch.no_grad():
        tiny.dit(x, t, cond)
    assert not calls  # and never without gradients


def test_operations_namespace_builds_every_layer():
    """ComfyUI passes its own layer classes; no plain torch layer may slip through."""
    made = []

    class Linear(nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    class RMSNorm(nn.RMSNorm):
        pass

    class LayerNorm(nn.LayerNorm):
        pass

    ops = types.SimpleNamespace(Linear=Linear, RMSNorm=RMSNorm, LayerNorm=LayerNorm)
    model = uf.UniFusionModel.from_preset("tiny", operations=ops, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.RMSNorm, nn.LayerNorm)):
            assert type(m) in (Linear, RMSNorm, LayerNorm), type(m)
    assert made and all(p.dtype == torch.float64 for p in model.parameters())


def test_meta_device_paper_preset_reports_its_size():
    model = uf.UniFusionModel.from_preset("paper-5b", device="meta")
    n = model.num_parameters()
    assert 4.9e9 < n["dit"] < 5.5e9  # "a 5 Billion parameter model" (Sec. 2.2)
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert model.dit.params.depth == 32 and model.dit.params.heads == 32 and model.dit.params.hidden_size == 4096
    assert model.lap.num_layers == 10 and model.lap.hidden_size == 3584  # every 3rd of 28 layers


def test_randomize_helper_really_changes_zero_init(tiny):
    # guards the fixture the numeric tests rely on
    assert tiny.dit.final.linear.weight.abs().sum() > 0
    assert all(b.modulation.abs().sum() > 0 for b in tiny.dit.blocks)
