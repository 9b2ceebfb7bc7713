"""The on-disk feature cache: fp16 round trips keyed by cond_id, refusals, interrupted writes, damage."""

import dataclasses
import logging
import random

import pytest
import tiny_vlms
import torch
from damage import flip
from safetensors import safe_open
from safetensors.torch import save_file
from test_encode_batch import sharpen
from torch.testing import assert_close

from unifusion_core.encoders import load_vlm
from unifusion_core.features import Features
from unifusion_core.train import cache as cache_module
from unifusion_core.train.cache import FeatureCache

SYSTEM = "Describe the image to make."
LAYERS = (0, 3, 6)
PROMPTS = ["a red circle on the left", "a blue square", "Describe", "a green triangle above a white circle",
           "a cat", "a purple square in the center", "a yellow circle at the top"]
ITEMS = [(f"scene-{i}", p) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return sharpen(load_vlm(tiny_vlms.make_tiny_causal_lm(tmp_path_factory.mktemp("vlm") / "qwen2", "qwen2")))


@pytest.fixture(scope="module")
def spec(vlm):
    return vlm.encoder_spec(LAYERS, SYSTEM)


def assert_stored(got: Features, want: Features, spec, exact: bool = True):
    """`got` is `want` through fp16 storage (exact: `want` is what was stored, else recomputed in fp32)."""
    assert got.hidden.dtype == torch.float32 and got.layers == LAYERS and got.encoder == spec
    assert got.text == want.text and got.sequence_ids == want.sequence_ids
    for name in ("positions", "is_image", "image_index"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    if exact:
        assert torch.equal(got.hidden, want.hidden.half().float())
    else:  # fp32 round-off may round the other way in fp16 (2^-11 relative)
        assert_close(got.hidden, want.hidden, atol=1e-3, rtol=1e-3)


def test_round_trip_in_fp16_shards(tmp_path, vlm, spec):
    cache = FeatureCache.create(tmp_path / "feats", spec, rewrite=False, shard_size=3)
    assert cache.build(vlm, ITEMS, batch_size=2) == len(ITEMS)
    shards = sorted((tmp_path / "feats").glob("shard-*.safetensors"))
    assert len(shards) == 3  # 3 + 3 + 1 items
    with safe_open(str(shards[0]), "pt") as f:
        meta = f.metadata()
        key = next(k for k in f.keys() if k.startswith("hidden/"))
        assert f.get_tensor(key).dtype == torch.float16
    assert meta["format"] == "unifusion-feature-cache" and meta["rewrite"] == "false"
    assert '"layers": [0, 3, 6]' in meta["encoder"] and SYSTEM in meta["encoder"]

    again = FeatureCache.open(tmp_path / "feats", spec, rewrite=False)
    assert len(again) == len(ITEMS) and "scene-3" in again and "scene-99" not in again
    for cid, prompt in ITEMS:
        assert_stored(again.get(cid), vlm.encode(prompt, rewrite=False, system_prompt=SYSTEM, layers=LAYERS), spec,
                      exact=False)
    with pytest.raises(KeyError, match="scene-99"):
        again.get("scene-99")


def test_keyed_by_id_not_by_position(tmp_path, vlm, spec):
    feats = dict(zip([cid for cid, _ in ITEMS], vlm.encode_batch(PROMPTS, system_prompt=SYSTEM, layers=LAYERS)))
    order = list(feats)
    random.Random(0).shuffle(order)
    with FeatureCache.create(tmp_path, spec, rewrite=False, shard_size=2) as cache:
        for cid in order:
            cache.put(cid, feats[cid])
        assert_stored(cache.get(order[-1]), feats[order[-1]], spec)  # buffered: the same as stored
    reopened = FeatureCache.open(tmp_path, spec, rewrite=False)
    for cid, prompt in ITEMS:
        got = reopened.get(cid)
        assert got.text == prompt
        assert_stored(got, feats[cid], spec)


def test_build_encodes_only_what_is_missing(tmp_path, vlm, spec):
    cache = FeatureCache.create(tmp_path, spec, rewrite=False)
    assert cache.build(vlm, ITEMS[:3]) == 3
    assert cache.missing(["scene-5", "scene-1", "scene-5", "scene-6"]) == ["scene-5", "scene-6"]
    assert cache.build(vlm, ITEMS + ITEMS[:2]) == len(ITEMS) - 3
    assert len(FeatureCache.open(tmp_path, spec, rewrite=False)) == len(ITEMS)
    with pytest.raises(ValueError, match="'scene-0' is given two prompts"):
        cache.build(vlm, [("scene-0", "a dog"), ("scene-0", "a cat")])


def test_rewrites_are_teacher_forced_and_their_text_round_trips(tmp_path, vlm, spec):
    cache = FeatureCache.create(tmp_path, spec, rewrite=True, max_new_tokens=6)
    cache.build(vlm, ITEMS[:3], rewrite=True, batch_size=2)
    reopened = FeatureCache.open(tmp_path, spec, rewrite=True, max_new_tokens=6)
    for cid, prompt in ITEMS[:3]:
        want = vlm.encode(prompt, rewrite=True, system_prompt=SYSTEM, layers=LAYERS, max_new_tokens=6)
        got = reopened.get(cid)
        assert got.text == want.text and got.text != prompt
        assert got.sequence_ids == want.sequence_ids and torch.equal(got.positions, want.positions)
        assert_close(got.hidden, want.hidden, atol=1e-3, rtol=1e-3)  # fp16


def test_a_cache_of_another_setting_is_refused(tmp_path, vlm, spec):
    FeatureCache.create(tmp_path / "feats", spec, rewrite=True, max_new_tokens=6).build(vlm, ITEMS[:1])
    where = str(tmp_path / "feats")
    others = {
        "rewrite": (spec, False, 6, r"rewrite=True, this run uses .* rewrite=False"),
        "layers": (dataclasses.replace(spec, layers=(0, 6)), True, 6, r"layers \[0, 3, 6\] vs \[0, 6\]"),
        "system prompt": (dataclasses.replace(spec, system_prompt="Draw it."), True, 6,
                          r"system prompt .* vs 'Draw it.'"),
        "encoder": (dataclasses.replace(spec, name="SmolLM2", hidden_size=576), True, 6,
                    r"encoder 'qwen2/qwen2' vs 'qwen2/SmolLM2'"),
        "length": (spec, True, 64, r"max_new_tokens 6 vs 64"),
    }
    for what, (other, rewrite, n, match) in others.items():
        with pytest.raises(ValueError, match=match) as e:
            FeatureCache.open(tmp_path / "feats", other, rewrite=rewrite, max_new_tokens=n)
        assert f"feature cache {where} was built with" in str(e.value) and f"delete {where}" in str(e.value), what
    cache = FeatureCache.open(tmp_path / "feats", spec, rewrite=True, max_new_tokens=6)
    with pytest.raises(ValueError, match="holds rewrite=True features, asked to build rewrite=False"):
        cache.build(vlm, ITEMS, rewrite=False)
    with pytest.raises(ValueError, match=r"holds .* but the encoder given is .*layers \[0, 2, 4, 6\]"):
        FeatureCache.create(
            tmp_path / "other", dataclasses.replace(spec, layers=(0, 2, 4, 6), name="x"), False).build(vlm, ITEMS)
    with pytest.raises(FileNotFoundError, match="FeatureCache.create"):
        FeatureCache.open(tmp_path / "nowhere", spec, rewrite=False)


def test_an_interrupted_write_leaves_a_cache_that_opens(tmp_path, vlm, spec, monkeypatch, caplog):
    feats = vlm.encode_batch(PROMPTS[:4], system_prompt=SYSTEM, layers=LAYERS)
    cache = FeatureCache.create(tmp_path, spec, rewrite=False, shard_size=2)
    cache.put("a", feats[0])
    cache.put("b", feats[1])  # a complete shard
    good = next(tmp_path.glob("shard-*.safetensors"))

    def killed_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(good.read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", killed_mid_write)
    cache.put("c", feats[2])
    with pytest.raises(KeyboardInterrupt):
        cache.put("d", feats[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no partial file left
    # A process killed outright leaves its temporary file; a damaged shard is skipped with a warning.
    (tmp_path / ".partial-0123.tmp").write_bytes(good.read_bytes()[:100])
    (tmp_path / "shard-damaged.safetensors").write_bytes(good.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="unifusion_core.train.cache"):
        reopened = FeatureCache.open(tmp_path, spec, rewrite=False)
    assert "shard-damaged.safetensors" in caplog.text
    assert len(reopened) == 2 and reopened.missing(["a", "b", "c", "d"]) == ["c", "d"]
    assert_stored(reopened.get("b"), feats[1], spec)


def test_features_that_do_not_fit_are_refused(tmp_path, vlm, spec):
    cache = FeatureCache.create(tmp_path, spec, rewrite=False)
    f = vlm.encode_batch(["a cat"], system_prompt=SYSTEM, layers=LAYERS)[0]
    with pytest.raises(ValueError, match=r"exceed the fp16 range .* 7e\+04"):
        cache.put("big", dataclasses.replace(f, hidden=f.hidden * 0 + 7e4))
    with pytest.raises(ValueError, match=r"with layers \[0, 6\]"):
        cache.put("other", dataclasses.replace(f, hidden=f.hidden[:, [0, 2]], layers=(0, 6), encoder=None))
    with pytest.raises(ValueError, match="non-empty string"):
        cache.put("", f)
    assert len(cache) == 0


def test_a_damaged_shard_is_encoded_again_by_build_and_refused_by_get(tmp_path, vlm, spec, caplog):
    """Before: damaged features were read back as they were, without a word."""
    FeatureCache.create(tmp_path, spec, rewrite=False, shard_size=3).build(vlm, ITEMS[:3])
    (shard,) = tmp_path.glob("shard-*.safetensors")
    flip(shard, "hidden/scene-1")
    with caplog.at_level(logging.WARNING, logger="unifusion_core.train.cache"):
        cache = FeatureCache.open(tmp_path, spec, rewrite=False)
        assert cache.build(vlm, ITEMS[:3]) == 3  # all three encoded again: their shard is set aside
    assert f"the features of 'scene-1' in {shard} do not match the checksum written with them" in caplog.text
    assert f"set aside as damaged-{shard.name}, its 3 items are encoded again by build()" in caplog.text
    assert (tmp_path / f"damaged-{shard.name}").is_file() and not shard.exists()
    reopened = FeatureCache.open(tmp_path, spec, rewrite=False)
    for cid, prompt in ITEMS[:3]:
        assert_stored(reopened.get(cid), vlm.encode(prompt, rewrite=False, system_prompt=SYSTEM, layers=LAYERS),
                      spec, exact=False)

    (shard,) = tmp_path.glob("shard-*.safetensors")
    flip(shard, "positions/scene-2", n=2)
    cache = FeatureCache.open(tmp_path, spec, rewrite=False)
    assert_stored(cache.get("scene-0"), reopened.get("scene-0"), spec)  # its own bytes are intact
    with pytest.raises(ValueError, match=rf"'scene-2' in {shard} do not match the checksum .*build\(\) encodes"):
        cache.get("scene-2")
    assert cache.missing(["scene-0", "scene-2"]) == ["scene-0", "scene-2"]


def test_a_shard_without_checksums_is_read_with_a_warning(tmp_path, vlm, spec, caplog):
    FeatureCache.create(tmp_path, spec, rewrite=False).build(vlm, ITEMS[:1])
    shard = next(tmp_path.glob("shard-*"))
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksums"]  # as an older version wrote it
    save_file(tensors, str(shard), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="unifusion_core.train.cache"):
        cache = FeatureCache.open(tmp_path, spec, rewrite=False)
    assert "was written without checksums (an older version), so damage to it cannot be found" in caplog.text
    assert cache.get("scene-0").text == PROMPTS[0]
