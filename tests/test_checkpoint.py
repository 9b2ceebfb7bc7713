"""Checkpoints: bit-exact round trips and a clear error for every bad file."""

import json
import pickle

import pytest
import torch
from conftest import tiny_features
from safetensors.torch import load_file, save_file

import unifusion_core as uf
from unifusion_core.checkpoint import FORMAT_VERSION


@pytest.fixture
def saved(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    uf.save_model(tiny, path)
    return path


def rewrite(path, tensors=None, metadata=None):
    """Re-save a checkpoint with its tensors and/or metadata changed."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors if tensors is not None else load_file(path), str(path), metadata=metadata or meta)
    return meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tiny, tmp_path, dtype):
    tiny = tiny.to(dtype)
    path = tmp_path / "m.safetensors"
    uf.save_model(tiny, path)
    loaded = uf.load_model(path)
    assert loaded.config == tiny.config and loaded.dtype == dtype
    a, b = tiny.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cond_a, cond_b = tiny.encode(tiny_features(B=1)), loaded.encode(tiny_features(B=1))
    assert torch.equal(tiny.sample(cond_a, 8, 8, steps=2), loaded.sample(cond_b, 8, 8, steps=2))


def test_load_converts_dtype_and_keeps_config(saved):
    m = uf.load_model(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and m.dtype == torch.bfloat16
    assert uf.read_config(saved) == m.config
    assert m.config.encoder.layers == (0, 3, 6)
    assert not m.training


def test_metadata_describes_the_model(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "unifusion" and meta["format_version"] == str(FORMAT_VERSION)
    cfg = json.loads(meta["config"])
    assert cfg["encoder"]["hidden_size"] == 32 and cfg["latent"]["name"] == "pixel"
    assert set(cfg) == {"encoder", "dit", "latent", "lap", "refiner", "sampling"}


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    uf.load_model(saved)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        uf.load_model(tmp_path / "nope.safetensors")


def test_pickle_formats_are_refused(tmp_path, tiny):
    path = tmp_path / "model.ckpt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ValueError, match=r"model.ckpt: only .safetensors .* never opened"):
        uf.load_model(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"vae.safetensors: not a UniFusion checkpoint \(metadata 'format' is None"):
        uf.load_model(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": "99"}, "format version '99' is not supported"),
        ({"config": "{not json"}, "metadata key 'config' is not valid JSON"),
        ({"config": None}, "metadata key 'config' is missing"),
        ({"config": json.dumps({"encoder": {}})}, "metadata key 'config' is invalid"),
    ],
)
def test_bad_metadata(saved, change, message):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = dict(f.metadata())
    for k, v in change.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    rewrite(saved, metadata=meta)
    with pytest.raises(ValueError, match=message) as e:
        uf.load_model(saved)
    assert "tiny.safetensors" in str(e.value)


def test_unknown_config_key(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg["dit"]["flash"] = True
    meta["config"] = json.dumps(cfg)
    rewrite(saved, metadata=meta)
    with pytest.raises(ValueError, match=r"config.dit: unknown keys \['flash'\]"):
        uf.load_model(saved)


def test_missing_and_unexpected_keys(saved):
    tensors = load_file(saved)
    del tensors["dit.final.linear.bias"]
    tensors["dit.extra"] = torch.zeros(1)
    rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError, match=r"missing keys \['dit.final.linear.bias'\], unexpected keys \['dit.extra'\]"):
        uf.load_model(saved)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    tensors = load_file(saved)
    tensors["lap.pool.weight"] = torch.zeros(32, 64)
    rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError,
                       match=r"'lap.pool.weight' has shape \[32, 64\] in the file, but .* needs \[32, 96\]"):
        uf.load_model(saved)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        uf.load_model(saved)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 4, b"\xff" * 64, b"GGUF" + bytes(100)])
def test_garbage_file(tmp_path, garbage):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(garbage)
    with pytest.raises(ValueError, match=r"bad.safetensors: not a readable safetensors file"):
        uf.load_model(path)


def test_save_refuses_other_extensions_and_writes_atomically(tiny, tmp_path):
    with pytest.raises(ValueError, match="use that extension"):
        uf.save_model(tiny, tmp_path / "m.pt")
    uf.save_model(tiny, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
