"""The exact synthetic-scene benchmark: detector, scoring, report arithmetic, model sampling, CLI."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_features
from PIL import Image

import unifusion_core as uf
from unifusion_core import scenes as sc
from unifusion_core.eval import (
    detect,
    layer_thirds,
    load_features,
    model_generate_fn,
    run_benchmark,
    save_features,
    score,
    write_grid,
)
from unifusion_core.eval.__main__ import main, pick_scenes

SCENES = sc.all_scenes()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges wrap; objects never touch them)."""
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = img.astype(np.float32)
    x = sum(w * np.roll(x, i - r, 0) for i, w in enumerate(k))
    x = sum(w * np.roll(x, i - r, 1) for i, w in enumerate(k))
    return np.clip(x.round(), 0, 255).astype(np.uint8)


def noisy(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)


# --- detector -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,seed", [(64, 0), (64, 1), (48, 2)])
def test_ground_truth_renders_score_perfectly(size, seed):
    rng = np.random.default_rng(seed)
    for s in SCENES:
        dets = detect(sc.render(s, size, rng))
        result = score(s, dets)
        assert result["all"], (s.prompt, result, dets)
        assert sorted((d.color, d.shape) for d in dets) == sorted((o.color, o.shape) for o in s.objects)
        placed = "position" if s.kind == "single" else "relation"
        expected = {"color": 1.0, "shape": 1.0, "count": True, "all": True, placed: True}
        assert result == expected


@pytest.mark.parametrize("damage", ["noise", "blur"])
def test_detector_survives_mild_noise_and_blur(damage):
    rng = np.random.default_rng(3)
    ok, some = 0, SCENES[::2]
    for s in some:
        img = sc.render(s, 64, rng)
        img = noisy(img, 12.0, rng) if damage == "noise" else blur(img, 0.8)
        ok += score(s, detect(img))["all"]
    assert ok / len(some) >= 0.995


def test_detection_geometry():
    s = sc.parse_prompt("a red square in the center")
    (d,) = detect(sc.render(s, 64))
    side = 2 * 0.85 * sc.OBJECT_SIZE * 64 / 2
    assert d.color == "red" and d.shape == "square"
    assert d.cx == pytest.approx(0.5, abs=0.01) and d.cy == pytest.approx(0.5, abs=0.01)
    assert d.area == pytest.approx(side**2, rel=0.15)
    x0, y0, x1, y1 = d.bbox
    assert x1 - x0 == y1 - y0 == pytest.approx(side, abs=1.5)


def test_dark_and_off_palette_pixels_are_background():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:30, 10:30] = (90, 15, 15)  # red dimmed below half: background
    img[35:55, 5:25] = (40, 200, 200)  # cyan: no palette colour explains it
    img[35:55, 35:55] = (235, 130, 40)  # orange: as near to red as to yellow
    assert detect(img) == []
    img[10:30, 10:30] = (130, 25, 25)  # red above half brightness: an object
    assert [d.color for d in detect(img)] == ["red"]


def test_wrong_colour_is_caught():
    other = {c: next(o for o in sc.COLORS if o != c) for c in sc.COLORS}
    for s in SCENES[::3]:
        a = s.objects[0]
        wrong = replace(s, objects=(sc.SceneObject(other[a.color], a.shape), *s.objects[1:]))
        result = score(s, detect(sc.render(wrong, 64, np.random.default_rng(0))))
        assert result["color"] < 1 and not result["all"], s.prompt


def test_wrong_shape_is_caught():
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    for s in SCENES[::3]:
        a = s.objects[0]
        wrong = replace(s, objects=(sc.SceneObject(a.color, other[a.shape]), *s.objects[1:]))
        result = score(s, detect(sc.render(wrong, 64, np.random.default_rng(0))))
        assert result["shape"] < 1 and result["color"] == 1 and not result["all"], s.prompt


def test_mirrored_pair_is_caught():
    for s in sc.scenes(kind="pair")[::3]:
        mirrored = replace(s, objects=s.objects[::-1])  # same objects, places swapped
        result = score(s, detect(sc.render(mirrored, 64, np.random.default_rng(0))))
        assert result == {"color": 1.0, "shape": 1.0, "count": True, "relation": False, "all": False}, s.prompt


def test_wrong_position_and_blank_image_are_caught():
    s = sc.parse_prompt("a blue triangle on the left")
    result = score(s, detect(sc.render(replace(s, position="on the right"), 64)))
    assert result == {"color": 1.0, "shape": 1.0, "count": True, "position": False, "all": False}
    blank = np.zeros((64, 64, 3), np.uint8)
    for s in (SCENES[0], SCENES[-1]):
        result = score(s, detect(blank))
        assert not result["count"] and not result["all"] and result["color"] == result["shape"] == 0


def test_extra_object_breaks_count_only():
    s = sc.parse_prompt("a green circle at the top")
    img = sc.render(s, 64)
    img[50:60, 50:60] = sc.COLORS["white"]
    result = score(s, detect(img))
    assert result == {"color": 1.0, "shape": 1.0, "count": False, "position": True, "all": False}


def test_detect_rejects_non_images():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        detect(np.zeros((8, 8), np.float32))


# --- report arithmetic ----------------------------------------------------------------------------


def test_benchmark_numbers_by_hand():
    A = sc.scenes("train", "single")[0]
    B = sc.scenes("train", "pair")[0]
    C = sc.scenes("heldout", "pair")[0]
    D = sc.scenes("heldout", "single")[0]
    blank = np.zeros((48, 48, 3), np.uint8)
    a, b = B.objects
    third_colour = next(c for c in sc.COLORS if c not in (a.color, b.color))
    b_wrong_colour = replace(B, objects=(sc.SceneObject(third_colour, a.shape), b))

    def gen(scenes, seed):
        out = []
        for s in scenes:
            if s == A:  # right for seeds 0, 1
                out.append(sc.render(A, 48) if seed in (0, 1) else blank)
            elif s == B:  # right for seed 3; first colour wrong otherwise
                out.append(sc.render(B if seed == 3 else b_wrong_colour, 48))
            elif s == C:
                out.append(blank)
            else:
                out.append(sc.render(D, 48))
        return out

    r = run_benchmark(gen, [A, B, C, D])
    assert r["seeds"] == [0, 1, 2, 3] and r["prompts"] == 4
    assert r["train"]["prompts"] == r["heldout"]["prompts"] == 2
    approx = lambda d: pytest.approx(d, abs=1e-12)
    assert r["train"]["avg"] == approx({"color": 0.5625, "shape": 0.75, "count": 0.75, "position": 0.5, "relation": 1.0,
                                        "micro": 0.375, "macro": 0.7125})
    assert r["train"]["best_of_4"] == approx({"color": 1, "shape": 1, "count": 1, "position": 1, "relation": 1,
                                              "micro": 1, "macro": 1})
    assert r["train"]["all_by_seed"] == [0.5, 0.5, 0.0, 0.5]
    held = {"color": 0.5, "shape": 0.5, "count": 0.5, "position": 1.0, "relation": 0.0, "micro": 0.5, "macro": 0.5}
    assert r["heldout"]["avg"] == approx(held) and r["heldout"]["best_of_4"] == approx(held)
    assert r["overall"]["avg"] == approx({"color": 0.53125, "shape": 0.625, "count": 0.625, "position": 0.75,
                                          "relation": 0.5, "micro": 0.4375, "macro": 0.60625})
    assert r["overall"]["best_of_4"] == approx({"color": 0.75, "shape": 0.75, "count": 0.75, "position": 1.0,
                                                "relation": 0.5, "micro": 0.75, "macro": 0.75})
    single = r["overall"]["by_kind"]["single"]  # A and D
    assert single["prompts"] == 2
    assert single["avg"] == approx({"color": 0.75, "shape": 0.75, "count": 0.75, "position": 0.75, "micro": 0.75,
                                    "macro": 0.75})
    assert r["train"]["by_kind"]["pair"]["avg"]["color"] == pytest.approx(0.625)
    assert [p["all"] for p in r["per_prompt"]] == [[True, True, False, False], [False, False, False, True],
                                                   [False] * 4, [True] * 4]
    json.dumps(r)  # JSON-able


def test_benchmark_checks_the_number_of_images():
    with pytest.raises(ValueError, match="returned 1 images for 2 scenes"):
        run_benchmark(lambda scenes, seed: [np.zeros((8, 8, 3), np.uint8)], SCENES[:2], seeds=(0,))


def test_write_grid_borders(tmp_path):
    imgs = [sc.render(s, 32) for s in SCENES[:3]]
    path = write_grid(tmp_path / "g.png", imgs, [s.prompt for s in SCENES[:3]], [True, False, True], cols=2, cell=64)
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == 2 * (64 + 6) and grid.shape[0] > 2 * (64 + 6)  # two rows, with labels
    assert tuple(grid[1, 30]) == (40, 200, 60) and tuple(grid[1, 70 + 30]) == (220, 40, 40)
    assert np.array_equal(grid[3 : 3 + 64 : 2, 3 : 3 + 64 : 2], imgs[0])  # upscaled x2, NEAREST


# --- model sampling -----------------------------------------------------------------------------


def tiny_table(prompts, seed=0) -> dict[str, torch.Tensor]:
    """Random features (T, L, D) of varied lengths, shaped like the tiny preset's encoder."""
    return {p: tiny_features(B=1, T=3 + i % 4, seed=seed + i)[0] for i, p in enumerate(prompts)}


def test_model_generate_fn_is_batch_independent(tiny):
    enc = tiny.config.encoder
    scenes = SCENES[:5]
    feats = {p: uf.Features(h, enc.layers, enc) for p, h in tiny_table([s.prompt for s in scenes]).items()}
    gen = model_generate_fn(tiny, feats, steps=2, cfg=3.0, batch_size=4, size=16)
    together = gen(scenes, 7)
    assert len(together) == 5 and all(im.dtype == np.uint8 and im.shape == (16, 16, 3) for im in together)
    for i in (0, 4):  # first of a full batch, and alone in the second batch
        (alone,) = gen([scenes[i]], 7)
        assert np.abs(alone.astype(int) - together[i]).max() <= 1  # batching changes float sums only
    assert not np.array_equal(gen(scenes[:1], 8)[0], together[0])
    with pytest.raises(ValueError, match="no features for 1 of 1"):
        gen([SCENES[-1]], 0)


def test_model_generate_fn_needs_pixel_space():
    model = uf.UniFusionModel.from_preset("tiny", latent="flux")
    with pytest.raises(ValueError, match="'pixel' latent-space checkpoint; this one is 'flux'"):
        model_generate_fn(model, {})


def test_features_file_picks_the_model_layers(tmp_path):
    stored = uf.get_preset("tiny").encoder  # layers (0, 3, 6)
    table = tiny_table(["a red circle on the left", "a blue square at the top"])
    save_features(tmp_path / "f.safetensors", table, stored)
    wanted = replace(stored, layers=(3, 6))
    loaded = load_features(tmp_path / "f.safetensors", wanted)
    for p, h in table.items():
        assert loaded[p].layers == (3, 6) and loaded[p].hidden.dtype == torch.float32
        assert torch.equal(loaded[p].hidden, h[:, 1:].half().float())  # (T, 2, D) of the stored (T, 3, D)
    with pytest.raises(ValueError, match=r"reads VLM layers \[1\]"):
        load_features(tmp_path / "f.safetensors", replace(stored, layers=(1, 3)))
    with pytest.raises(ValueError, match="trained against 'other'"):
        load_features(tmp_path / "f.safetensors", replace(stored, name="other", hidden_size=64))


def test_layer_thirds():
    assert layer_thirds(list(range(0, 31, 3))) == {"none": [], "first third": [0, 3, 6, 9],
                                                   "middle third": [12, 15, 18, 21], "last third": [24, 27, 30]}
    assert layer_thirds([0, 3]) == {"none": [], "first third": [0], "middle third": [3]}


def test_pick_scenes_is_deterministic_and_mixed():
    a, b = pick_scenes("train", 10), pick_scenes("train", 10)
    assert a == b and len(a) == 10 and {s.kind for s in a} == {"single", "pair"} and all(s.split == "train" for s in a)
    assert pick_scenes("heldout", None) == sc.scenes("heldout")


def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize(uf.UniFusionModel.from_preset("tiny")).eval()
    uf.save_model(model, tmp_path / "m.safetensors")
    save_features(tmp_path / "f.safetensors", tiny_table([s.prompt for s in SCENES]))
    out = tmp_path / "out"
    report = main(["--model", str(tmp_path / "m.safetensors"), "--features", str(tmp_path / "f.safetensors"),
                   "--out", str(out), "--limit", "3", "--seeds", "2", "--steps", "2", "--size", "16",
                   "--layer-study", "--device", "cpu"])
    assert json.loads((out / "report.json").read_text()) == report
    assert report["prompts"] == 6 and report["train"]["prompts"] == report["heldout"]["prompts"] == 3
    assert set(report["overall"]) >= {"avg", "best_of_2", "all_by_seed", "by_kind"}
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"] == report["overall"] and "per_prompt" not in printed
    assert set(report["layer_study"]["layer_drop"]) == {"none", "first third", "middle third", "last third"}
    for name in ("grid_train.png", "grid_heldout.png", "layer_weights.png", "layer_drop.png"):
        assert Image.open(out / name).size[0] > 0


def test_cli_encodes_prompts_with_the_vlm_as_the_model_was_trained(tmp_path, monkeypatch):
    model = randomize(uf.UniFusionModel.from_preset("tiny")).eval()
    uf.save_model(model, tmp_path / "m.safetensors")
    enc, calls = model.config.encoder, []

    class FakeVLM:
        def encode_batch(self, prompts, **kw):
            calls.append(kw)
            return [uf.Features(h, enc.layers, enc) for h in tiny_table(prompts).values()]

    devices = []
    monkeypatch.setattr(uf.encoders, "load_vlm", lambda path, device=None: devices.append(device) or FakeVLM())
    argv = ["--model", str(tmp_path / "m.safetensors"), "--vlm", "fake.gguf", "--out", str(tmp_path / "out"),
            "--split", "heldout", "--limit", "2", "--seeds", "1", "--steps", "1", "--size", "8", "--device", "cpu"]
    main(argv)
    main(argv + ["--no-rewrite"])
    expected = {"layers": enc.layers, "system_prompt": enc.system_prompt}
    assert calls == [{"rewrite": model.config.sampling.rewrite, **expected}, {"rewrite": False, **expected}]
    assert devices == ["cpu", "cpu"]  # the VLM on --device, as the other tasks load it (it ran on the CPU always)


def test_verifi_fidelity_check_names_what_a_rewrite_lost():
    """tools/verifi_fidelity.py: a rewrite keeps a scene only if every colour, shape (bound to its
    colour) and the position / relation are still named."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from verifi_fidelity import check

    pair = sc.parse_prompt("a red circle to the left of a blue square")
    assert check(pair, "A bright red circle sits to the left of a blue square on white.")["all"]
    swapped = check(pair, "A red square to the left of a blue circle.")
    assert swapped["color"] and swapped["shape"] and not swapped["binding"] and not swapped["all"]
    assert not check(pair, "Two circles, one red and one blue.")["shape"]
    single = sc.parse_prompt("a green triangle at the top")
    assert check(single, "A green triangle near the top edge.")["all"]
    assert not check(single, "Green triangles in the middle.")["position"]


@pytest.mark.parametrize("task", ["t2i", "describe", "edit", "reconstruct", "multiref"])
@pytest.mark.parametrize("flag", ["--seeds", "--limit", "--batch-size"])
def test_counts_below_one_are_refused_before_anything_loads(tmp_path, task, flag):
    """Before: --seeds 0 failed with an IndexError after the model and VLM had loaded and every case
    was encoded (edit, reconstruct, multiref); --limit 0 silently became 60 (100 for describe), or a
    ValueError traceback for t2i. The paths do not exist: nothing is loaded before the check."""
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match=f"^{flag} must be >= 1, got 0"):
        main(["--task", task, "--model", missing + ".safetensors", "--vlm", missing + ".gguf",
              "--out", str(tmp_path / "out"), flag, "0"])


def _killed_while_writing(monkeypatch, name: str):
    """Path.write_text that dies halfway through writing a file whose name starts with `name`."""
    write_text = Path.write_text

    def dying(self, data, *args, **kwargs):
        if not self.name.startswith(name):
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the process killed mid-write

    monkeypatch.setattr(Path, "write_text", dying)


def test_a_killed_run_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    """Before: report.json was written in place; a run killed while writing it left a truncated
    JSON where the previous good report was."""
    model = randomize(uf.UniFusionModel.from_preset("tiny")).eval()
    uf.save_model(model, tmp_path / "m.safetensors")
    save_features(tmp_path / "f.safetensors", tiny_table([s.prompt for s in SCENES]))
    args = ["--model", str(tmp_path / "m.safetensors"), "--features", str(tmp_path / "f.safetensors"),
            "--out", str(tmp_path / "out"), "--split", "heldout", "--limit", "1", "--seeds", "1", "--steps", "1",
            "--size", "8", "--device", "cpu"]
    first = main(args)
    _killed_while_writing(monkeypatch, "report.json")
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--steps", "2"])
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == first


def test_a_killed_write_leaves_the_previous_features_file_whole(tmp_path, monkeypatch):
    """Before: save_features_file wrote in place; a kill mid-write (tools/encode_scene_prompts.py, the
    eval's save_features) left a truncated file that the trainer and the eval refuse."""
    import safetensors.torch

    path = tmp_path / "f.safetensors"
    table = tiny_table(["a red circle on the left", "a blue square at the top"])
    save_features(path, table)

    def dying(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt  # the process killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        save_features(path, tiny_table(["a green triangle at the top"]))
    loaded, _ = uf.features.read_features_file(path)
    assert list(loaded) == list(table) and all(torch.equal(loaded[p], table[p].half()) for p in table)
