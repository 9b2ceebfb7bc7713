"""Sample images during training (train/samples.py) and TensorBoard (train/board.py): a tiny run
writes a grid per step from the EMA weights at fixed seeds (equal to sampling the exported model
again), logs it, and its TensorBoard event files hold the losses metrics.jsonl holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image
from test_train import ENC, feature_table, save_tiny_vae, tiny_config, write_features

import unifusion_core as uf
from unifusion_core import scenes
from unifusion_core.eval import write_grid
from unifusion_core.generate import generate
from unifusion_core.train.__main__ import main, parse, resolved
from unifusion_core.train.board import scalars
from unifusion_core.train.samples import Samples, read_sample_prompts
from unifusion_core.train.setup import PromptFeatures, load_features_file

PROMPTS = ["a red circle on the left", "a blue square on the right"]


@pytest.fixture(scope="module")
def scene_features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feat") / "features.safetensors",
                          feature_table([s.prompt for s in scenes.all_scenes()]))


def tiny_run(out: Path, features: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--features", str(features), "--resolution", "16", "--preset", "tiny",
            "--dit-width", "64", "--dit-depth", "2", "--dit-heads", "4", "--patch", "2", "--shift", "1.0",
            "--prompts-per-step", "4", "--timesteps-per-prompt", "2", "--lr", "1e-3", "--warmup", "2",
            "--val-prompts", "2", "--sample-steps", "4", "--threads", "1", *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_prompts_files_txt_jsonl_toml(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ref.png")
    (tmp_path / "p.txt").write_text("# a comment\na red circle\n\n  a blue square  \n")
    txt = read_sample_prompts(tmp_path / "p.txt")
    assert [(p.prompt, p.seed, p.images, p.task) for p in txt] == [("a red circle", 0, (), "t2i"),
                                                                   ("a blue square", 1, (), "t2i")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "make it blue", "seed": 7, "images": ["ref.png"]}\n\n'
                                      '{"images": ["ref.png"]}\n{"prompt": "a cat"}\n')
    jl = read_sample_prompts(tmp_path / "p.jsonl")
    assert [(p.prompt, p.seed, p.task) for p in jl] == [("make it blue", 7, "edit"), ("", 1, "reconstruction"),
                                                        ("a cat", 2, "t2i")]
    assert jl[0].images == (tmp_path / "ref.png",)  # relative to the prompts file
    assert jl[0].label == "make it blue +1 image (seed 7)"
    (tmp_path / "p.toml").write_text('[[sample]]\nprompt = "a cat"\nseed = 3\n[[sample]]\nprompt = "a dog"\n')
    assert [(p.prompt, p.seed) for p in read_sample_prompts(tmp_path / "p.toml")] == [("a cat", 3), ("a dog", 1)]
    for name, text, message in [
        ("e.jsonl", '{"prompt": "x", "sede": 1}\n', r"line 1: unknown keys \['sede'\]; a sample takes"),
        ("e.jsonl", '{"prompt": "x", "images": ["nope.png"]}\n', r"no such image .*nope.png"),
        ("e.jsonl", '{"prompt": "x", "seed": -1}\n', r"seed must be an integer >= 0, got -1"),
        ("e.jsonl", '{"prompt": "x"\n', r"line 1: not JSON"),
        ("e.jsonl", '{"prompt": ""}\n', r"an empty prompt needs reference images"),
        ("e.toml", 'prompt = "x"\n', r"expected \[\[sample\]\] tables only"),
        ("e.txt", "# only a comment\n\n", r"no prompts in it"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_sample_prompts(tmp_path / name)
    for name in ("p.txt", "p.jsonl"):  # UTF-8 with a byte-order mark (Notepad's): read as without it
        (tmp_path / f"bom-{name}").write_text((tmp_path / name).read_text(), encoding="utf-8-sig")
        assert read_sample_prompts(tmp_path / f"bom-{name}") == read_sample_prompts(tmp_path / name)


def test_a_run_samples_the_ema_weights_every_n_steps_and_logs_them_to_tensorboard(tmp_path, scene_features):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    argv = tiny_run(out, scene_features, "--steps", "4", "--log-every", "1", "--validate-every", "2",
                    "--sample-prompts", str(prompts), "--sample-every", "2", "--tensorboard",
                    "--checkpoint-every", "2", "--keep-checkpoints", "5")
    main(argv)
    rows = records(out)
    sampled = [r for r in rows if "samples" in r]
    assert [(r["step"], r["samples"]["grid"], r["samples"]["prompts"]) for r in sampled] == \
        [(2, "samples/step-0000002.png", 2), (4, "samples/step-0000004.png", 2)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    # the last grid is the exported EMA model sampled at each prompt's seed (its line: 0, 1), with
    # the checkpoint's --sample-steps: generate() with that model draws the same images
    model = uf.load_model(out / "model.safetensors")
    table, _ = load_features_file(scene_features)
    feats = PromptFeatures(model.config.encoder, ENC.layers, table=table)
    ref = [generate(None, model, p, features=feats.features(table[p], p), seed=s).images[0]
           for s, p in enumerate(PROMPTS)]
    write_grid(tmp_path / "ref.png", ref, labels=[f"{p} (seed {s})" for s, p in enumerate(PROMPTS)], cols=2)
    assert np.array_equal(pixels(out / "samples" / "step-0000004.png"), pixels(tmp_path / "ref.png"))
    assert not np.array_equal(pixels(out / "samples" / "step-0000002.png"), pixels(tmp_path / "ref.png"))

    # TensorBoard: the same numbers as metrics.jsonl (stored as float32), and the grids as images
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/samples_per_s", "samples_per_s"), ("train/tokens_per_s", "tokens_per_s")):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag
        assert [np.float32(e.value) for e in events] == [np.float32(r[key]) for r in logged], tag
    quarter = ea.Scalars("train/loss_by_t/t0.75-1.00")
    assert [np.float32(e.value) for e in quarter] == [np.float32(r["loss_by_t"][3]) for r in logged]
    assert [e.step for e in ea.Scalars("train/memory_gib_per_rank/0")] == [1, 2, 3, 4]
    validated = [r for r in rows if "validation" in r]
    assert validated and all(f"validation/{k}" in ea.Tags()["scalars"]
                             for r in validated for k, v in r["validation"].items() if isinstance(v, float))
    images = ea.Images("samples")
    assert [e.step for e in images] == [2, 4]
    # the scenes' validation grid (val-*.png, named in the record) as an image of its own
    assert [e.step for e in ea.Images("validation")] == [r["step"] for r in validated]
    assert all((out / r["validation"]["grid"]).is_file() for r in validated)
    h, w = pixels(out / "samples" / "step-0000004.png").shape[:2]
    assert (images[-1].height, images[-1].width) == (h, w)

    # resumed from step 2: TensorBoard drops what the run wrote after it, so each step shows once
    main([*argv, "--resume", str(out / "checkpoints" / "step-00000002")])
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    assert [(e.step, np.float32(e.value)) for e in ea.Scalars("train/loss")] == \
        [(r["step"], np.float32(r["loss"])) for r in logged]  # an exact resume: the same losses again
    assert [e.step for e in ea.Images("samples")] == [2, 4]

    # the run folder keeps its resolved settings: config.toml trains the same run again
    again, first = resolved(parse(["--config", str(out / "config.toml")])), resolved(parse(argv))
    # (the resumed run rewrote it: --resume itself is command-line only, never in the file)
    assert again.pop("config") == out / "config.toml" and first.pop("config") is None
    assert again == first


def test_samples_are_fixed_by_their_seeds_and_need_features_from_the_start(tmp_path, scene_features):
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config()).eval()
    table = feature_table(PROMPTS)
    feats = PromptFeatures(ENC, ENC.layers, table=table)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "seed": 5}) + "\n" for p in PROMPTS))
    samples = Samples(read_sample_prompts(tmp_path / "p.jsonl"), feats, every=2)
    a, b = samples.images(model), samples.images(model)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # fixed seeds: the same images every time
    alone = generate(None, model, PROMPTS[1], features=feats([_sample(PROMPTS[1])])[0], seed=5).images[0]
    assert np.array_equal(a[1], alone)  # a prompt's image does not depend on the others of its batch
    # the CLI: a prompt without features, and --sample-every without prompts, fail before training
    (tmp_path / "q.txt").write_text("a red circle on the left\nan elephant in the fog\n")
    for extra, message in ((["--sample-prompts", str(tmp_path / "q.txt")], "an elephant in the fog"),
                           (["--sample-every", "5"], r"--sample-every 5 needs --sample-prompts")):
        with pytest.raises(SystemExit, match=message):
            main(tiny_run(tmp_path / "r", scene_features, "--steps", "2", *extra))
        assert not (tmp_path / "r" / "checkpoints").exists()


def _sample(prompt: str):
    from unifusion_core.train.data import Sample
    from unifusion_core.train.tasks import text_id

    return Sample(id=prompt, task="t2i", prompt=prompt, cond_id=text_id(prompt))


def test_reference_images_condition_the_samples(tmp_path):
    """A prompt with reference images is sampled as an edit: the VLM reads them (tiny InternVL)."""
    from tiny_vlms import make_tiny_internvl

    vlm = uf.load_vlm(make_tiny_internvl(tmp_path / "vlm"))
    torch.manual_seed(0)
    config = uf.UniFusionModel.from_preset("tiny", vlm=vlm, latent="pixel").config
    # random weights everywhere: a fresh model's zero-initialised gates would ignore any conditioning
    model = randomize(uf.UniFusionModel(config.replace(sampling={"size": (16, 16), "steps": 2}))).eval()
    spec = model.config.encoder
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "make it green", "images": ["red.png"], "seed": 0}\n'
                                      '{"prompt": "make it green", "images": ["blue.png"], "seed": 0}\n')
    samples = Samples(read_sample_prompts(tmp_path / "p.jsonl"), PromptFeatures(spec, spec.layers, vlm=vlm))
    red, blue = samples.images(model)
    assert not np.array_equal(red, blue)  # the same prompt and seed: the reference image made the difference
    f = vlm.encode("make it green", images=[Image.open(tmp_path / "red.png").convert("RGB")], rewrite=False,
                   layers=spec.layers, system_prompt=spec.system_prompt)
    assert np.array_equal(red, generate(None, model, "", features=f, seed=0).images[0])


def test_tensorboard_missing_is_a_clear_error(tmp_path, scene_features, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(SystemExit, match=r"--tensorboard needs the tensorboard package: pip install -c "
                                         r"constraints.txt tensorboard"):
        main(tiny_run(tmp_path / "r", scene_features, "--steps", "1", "--tensorboard"))
    assert not (tmp_path / "r").exists()


def test_every_number_of_a_record_becomes_a_tag():
    rec = {"step": 3, "loss": 0.5, "loss_by_t": [1, 2, 3, 4], "memory_gib_per_rank": [1.5, 2.5], "mfu": 0.4,
           "nonfinite": "skipped", "finite": True, "grad_norm": None, "validation": {"train": 0.9, "x": {"y": 2}},
           "samples": {"grid": "samples/step-0000003.png", "prompts": 2}}
    assert scalars(rec) == {"train/loss": 0.5, "train/loss_by_t/t0.00-0.25": 1.0, "train/loss_by_t/t0.25-0.50": 2.0,
                            "train/loss_by_t/t0.50-0.75": 3.0, "train/loss_by_t/t0.75-1.00": 4.0,
                            "train/memory_gib_per_rank/0": 1.5, "train/memory_gib_per_rank/1": 2.5,
                            "train/mfu": 0.4, "validation/train": 0.9, "validation/x/y": 2.0}


def test_samples_in_a_vae_latent_space_are_decoded_by_its_vae(tmp_path):
    from unifusion_core.pixels import signed_to_uint8
    from unifusion_core.train.samples import vae_decoder
    from unifusion_core.train.vae import load_vae

    save_tiny_vae(tmp_path / "vae")
    space = uf.LatentSpace("tiny-vae", channels=4, downscale=2, scale=0.5, shift=0.1)
    vae = load_vae(tmp_path / "vae", space)
    model = randomize(uf.UniFusionModel(tiny_config().replace(latent=space))).eval()
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(PROMPTS))
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    image, = Samples(read_sample_prompts(tmp_path / "p.txt"), feats, decode=vae_decoder(vae)).images(model)
    z = generate(None, model, PROMPTS[0], features=feats([_sample(PROMPTS[0])])[0], seed=0).latent  # (1, 4, 8, 8)
    with torch.no_grad():
        want = signed_to_uint8(vae.model.decode(z / 0.5 + 0.1).sample)[0].numpy()
    assert image.shape == (16, 16, 3) and np.array_equal(image, want)
    # the CLI asks for the VAE it needs
    from types import SimpleNamespace

    from unifusion_core.train.samples import make_samples

    with pytest.raises(ValueError, match="--latent tiny-vae needs --vae"):
        make_samples(SimpleNamespace(sample_prompts=tmp_path / "p.txt", sample_every=0, vae=None), feats,
                     model.config)
