"""Guards for a long-lived host: memory refusal before allocation, Cancel between DiT blocks,
non-finite inputs named where they enter (no silent black image)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import unifusion_core as uf
from unifusion_core import guard, sampling
from unifusion_core import model as model_mod
from unifusion_core.config import EncoderSpec, every_nth_layer

ENC = EncoderSpec("tiny", "tiny-random", hidden_size=32, num_layers=6, layers=every_nth_layer(6))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    config = uf.get_preset("tiny").replace(
        encoder=ENC, latent="pixel", dit={"hidden_size": 64, "depth": 4, "heads": 4, "patch_size": 2, "axes_dim": None},
        sampling={"size": (16, 16), "shift": 1.0, "steps": 4, "cfg": 2.0, "rewrite": False})
    return uf.UniFusionModel(config).eval()


def cond(net, tokens=3):
    return net.encode(torch.randn(1, tokens, len(ENC.layers), ENC.hidden_size))


def test_cancel_is_honoured_between_dit_blocks_inside_the_first_step(net):
    calls = []

    class Cancelled(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    c = cond(net)
    with pytest.raises(Cancelled), guard.interruptible(check):
        net.sample(c, 16, 16, steps=50)
    assert len(calls) == 3 < net.config.dit.depth  # the third block of the first model call
    net.sample(c, 16, 16, steps=1)  # outside the block the check is gone
    assert len(calls) == 3


def test_a_request_that_cannot_fit_is_refused_before_anything_is_allocated(net, monkeypatch):
    monkeypatch.setattr(guard, "available_memory", lambda device: 1 << 20)  # 1 MiB free

    def no_noise(*a, **k):
        raise AssertionError("noise was allocated before the memory check")

    monkeypatch.setattr(sampling, "make_noise", no_noise)
    need = net.memory_required(4, 3, 4096, 4096, True)
    with pytest.raises(MemoryError) as e:
        net.sample(cond(net), 4096, 4096, batch_size=4)
    msg = str(e.value)
    assert f"{need / 2**30:.1f} GiB" in msg and "0.0 GiB is free" in msg and "batch_size" in msg


def test_the_real_memory_reading_refuses_the_node_maximum(net):
    assert guard.available_memory("cpu") > 0
    with pytest.raises(MemoryError, match="16384x16384"):
        net.sample(cond(net), 16384, 16384)


@pytest.mark.parametrize("name", ["cfg", "shift", "switch_at"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_sampling_settings_are_named(net, name, bad):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        net.sample(cond(net), 16, 16, steps=1, **{name: bad})


def test_non_finite_features_are_named(net):
    hidden = torch.randn(1, 3, len(ENC.layers), ENC.hidden_size)
    hidden[0, 1, 2, 5] = math.nan
    with pytest.raises(ValueError, match="VLM features holds 1 non-finite"):
        net.encode(hidden)


def test_features_are_checked_once_where_they_are_made(net, monkeypatch):
    hidden = torch.randn(3, len(ENC.layers), ENC.hidden_size)
    hidden[2, 0, 0] = math.inf
    with pytest.raises(ValueError, match="VLM features holds 1 non-finite"):
        uf.Features(hidden, ENC.layers, ENC, "x")
    f = uf.Features(torch.randn(3, len(ENC.layers), ENC.hidden_size), ENC.layers, ENC, "x")
    checked = []
    monkeypatch.setattr(model_mod, "require_finite_features", lambda h: checked.append(h))
    net.encode([f])  # made (and checked) once: encoding it again does not re-check
    assert not checked
    net.encode(f.hidden)  # a plain tensor is checked where it enters
    assert len(checked) == 1


def test_nan_weights_are_refused_at_load_with_the_tensor_named(net, tmp_path):
    path = tmp_path / "m.safetensors"
    uf.save_model(net, path)
    sd = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd["dit.final.linear.weight"][0, 0] = math.inf
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"m.safetensors: tensor 'dit.final.linear.weight' holds NaN or infinite"):
        uf.load_model(path)


def test_nan_latents_raise_instead_of_a_black_image(net):
    broken = uf.UniFusionModel(net.config)
    broken.load_state_dict(net.state_dict())
    with torch.no_grad():
        broken.dit.final.linear.bias.fill_(math.nan)
    with pytest.raises(ValueError, match="sampled latents holds .* non-finite"):
        broken.sample(cond(broken), 16, 16, steps=2)


def test_cancel_reaches_inside_one_attention_call_at_large_sizes(monkeypatch):
    from unifusion_core import layers

    monkeypatch.setattr(layers, "CANCEL_SCORES", 64 * 100)  # chunks of 64 queries over 100 keys
    q, k, v = (torch.randn(2, 3, 300, 8) for _ in range(3))  # 300 x 300 > 4 x 6400 scores: chunked
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 250:] = False
    plain = layers.attention(q, k, v, mask)
    calls = []
    with torch.no_grad(), guard.interruptible(lambda: calls.append(1)):
        chunked = layers.attention(q, k, v, mask)
    assert len(calls) == 5  # 300 queries in chunks of 6400 // 300 -> 64 (the floor): 5 chunks
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.no_grad(), guard.interruptible(stop):
        layers.attention(q, k, v, mask)


def test_attention_runs_the_same_algorithm_with_and_without_a_cancel_check(monkeypatch):
    """Whether a host listens for Cancel changes nothing in the result: only sizes and grad mode pick the path."""
    from unifusion_core import layers

    monkeypatch.setattr(layers, "CANCEL_SCORES", 64 * 100)
    q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
    chunks = []
    monkeypatch.setattr(guard, "check_cancel", lambda: chunks.append(1))  # counts the chunks, host or not
    with torch.no_grad():
        alone = layers.attention(q, k, v)
        assert len(chunks) == 5  # chunked without any host check installed
        with guard.interruptible(lambda: None):
            hosted = layers.attention(q, k, v)
    assert len(chunks) == 10 and torch.equal(hosted, alone)


def test_a_non_float_dtype_is_refused_by_every_way_of_building_a_model(net, tmp_path):
    message = r"dtype must be a floating-point torch.dtype \(e.g. torch.float32, torch.bfloat16\), got torch.int8"
    with pytest.raises(ValueError, match=message):
        uf.UniFusionModel.from_preset("tiny", dtype=torch.int8)
    with pytest.raises(ValueError, match=message):
        uf.UniFusionModel(net.config, dtype=torch.int8)
    uf.save_model(net, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=message):
        uf.load_model(tmp_path / "m.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match="weight_dtype must be a floating-point torch.dtype"):
        uf.load_model(tmp_path / "m.safetensors", weight_dtype=torch.int8, operations=torch.nn)


def test_wrong_kinds_of_inputs_get_messages_that_say_what_to_pass(net, tmp_path):
    c = cond(net)
    with pytest.raises(ValueError, match="conditioning must be a Conditioning .* got Tensor"):
        net.sample(c.tokens, 16, 16, steps=1)
    with pytest.raises(ValueError, match="negative must be a Conditioning"):
        net.sample(c, 16, 16, steps=1, negative=torch.zeros(1, 3, 64))
    other = uf.Conditioning(torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="second conditioning has 32-wide tokens but this model's DiT takes 64"):
        net.sample(c, 16, 16, steps=1, next_cond=other)
    f = uf.Features(torch.randn(3, len(ENC.layers), ENC.hidden_size), ENC.layers, ENC, "x")
    with pytest.raises(ValueError, match=r"features\[1\] is a Tensor; a list holds Features only"):
        net.encode([f, f.hidden])
    uf.save_model(net, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        uf.load_model(tmp_path / "m.safetensors", dtype=torch.int8)


def test_prompts_no_tokenizer_should_see_are_refused_first(monkeypatch, tmp_path):
    import tiny_vlms

    from unifusion_core.encoders import chat

    enc = uf.load_vlm(tiny_vlms.make_tiny_causal_lm(tmp_path / "q"))
    with pytest.raises(ValueError, match="not valid Unicode .* lone surrogate"):
        enc.encode("a red \ud800 circle", rewrite=False)
    called = []
    monkeypatch.setattr(chat, "render", lambda *a, **k: called.append(1))  # the chat template, then the tokenizer
    huge = "a" * (chat.MAX_CHARS_PER_TOKEN * enc.context_length + 1)
    with pytest.raises(ValueError, match="characters: far beyond"):
        enc.encode(huge, rewrite=False)
    with pytest.raises(ValueError, match="system prompt must be text"):
        enc.encode("a cat", rewrite=False, system_prompt=b"bytes")
    assert not called
    with pytest.raises(AttributeError):  # the patched template returns None
        enc.encode("a cat", rewrite=False)  # a good prompt does reach the template step
    assert called


def test_broken_vlm_files_are_named_with_what_to_do(tmp_path):
    import tiny_vlms

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.gguf: the file is empty \(0 bytes\).*fetch it again"):
        uf.load_vlm(empty)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=r"corrupt.gguf: not a readable GGUF file .* truncated or corrupt"):
        uf.load_vlm(corrupt)
    folder = tiny_vlms.make_tiny_causal_lm(tmp_path / "q")
    (weights,) = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"q: a weights file cannot be read .* truncated or corrupt"):
        uf.load_vlm(folder)
