"""The synthetic scenes as training data for every task: reconstruction and edit sources whose
targets are exact, what stays put in an edit stays put, and --data scenes builds the mixture."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from unifusion_core import scene_edits
from unifusion_core.eval.detect import detect, score
from unifusion_core.train.setup import ConfigError, make_data
from unifusion_core.train.sources import SceneEdits, SceneReconstructions


def pixels(x) -> np.ndarray:
    return np.asarray(x)


def test_a_reconstruction_sample_is_its_own_target():
    s = SceneReconstructions("train", 64, seed=3).get(17)
    assert s.task == "reconstruction" and s.prompt == ""
    assert np.array_equal((s.target.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), pixels(s.images[0]))
    assert SceneReconstructions("train", 64, seed=3).get(17).id == s.id


def test_edit_samples_draw_exact_targets_and_keep_what_the_instruction_leaves():
    source = SceneEdits("train", 64, seed=1)
    edits = {e.instruction: e for e in scene_edits.edits("train")}
    for i in range(0, 4000, 97):
        s = source.get(i)
        e = source.edits[i % len(source.edits)]
        assert s.task == "edit" and s.prompt == e.instruction and len(s.images) == 1 and edits.get(s.prompt)
        target = (s.target.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert score(e.target, detect(target))["all"], (e, i)
        assert score(e.source, detect(pixels(s.images[0])))["all"], (e, i)
        if e.kind == "recolor":  # the same jitter: only the recoloured object's pixels differ
            changed = (target != pixels(s.images[0])).any(-1)
            assert 0 < changed.mean() < 0.2


def test_references_are_a_share_of_edit_samples():
    source = SceneEdits("train", 64, seed=0, references=0.25)
    two = [len(source.get(i).images) == 2 for i in range(400)]
    assert 0.2 < np.mean(two) < 0.3
    with pytest.raises(ValueError, match="share"):
        SceneEdits(references=2)


def args(**kw):
    base = dict(data="scenes", resolution=64, scene_kinds="single,pair", scene_tasks="t2i",
                scene_references=0.0, mix="t2i=0.85,reconstruction=0.05,edit=0.10")
    return SimpleNamespace(**{**base, **kw})


def test_data_scenes_builds_the_mixture_of_the_tasks_asked_for():
    mixture, sources = make_data(args(), 0)
    assert set(sources) == {"t2i"}
    mixture, sources = make_data(args(scene_tasks="t2i,reconstruction,edit"), 0)
    assert set(sources) == {"t2i", "reconstruction", "edit"}
    drawn = [task for task, _ in mixture.draw(2000)]
    assert 0.07 < drawn.count("edit") / 2000 < 0.13
    with pytest.raises(ConfigError, match="expected some of"):
        make_data(args(scene_tasks="t2i,inpaint"), 0)
    with pytest.raises(ConfigError, match="no ratio"):
        make_data(args(scene_tasks="t2i,edit", mix="t2i=1"), 0)


def test_held_out_edits_never_reach_training():
    held = {(e.source, e.instruction) for e in scene_edits.edits("heldout")}
    source = SceneEdits("train", 64)
    assert not {(e.source, e.instruction) for e in source.edits} & held


def test_the_trainer_trains_on_scene_edits_with_a_vlm_that_reads_images(tmp_path, monkeypatch):
    """Three steps of t2i + reconstruction + edit on the scenes with a tiny InternVL read online:
    the image samples reach the VLM with their images (one or two each), batched, and train
    exactly as when each is encoded alone."""
    import json

    from tiny_vlms import make_tiny_internvl

    from unifusion_core.encoders.encoder import VLMEncoder
    from unifusion_core.train.__main__ import main

    seen = []
    encode_batch = VLMEncoder.encode_batch

    def counting(self, prompts, *a, images=None, **kw):
        seen.extend(len(im or []) for im in images or [])
        return encode_batch(self, prompts, *a, images=images, **kw)

    monkeypatch.setattr(VLMEncoder, "encode_batch", counting)
    vlm = make_tiny_internvl(tmp_path / "vlm")

    def run(out):
        main(["--out", str(out), "--vlm", str(vlm), "--data", "scenes", "--scene-tasks", "t2i,reconstruction,edit",
              "--scene-references", "0.5", "--mix", "t2i=0.4,reconstruction=0.3,edit=0.3", "--resolution", "16",
              "--preset", "tiny", "--dit-width", "64", "--dit-depth", "2", "--dit-heads", "4", "--patch", "2",
              "--prompts-per-step", "4", "--timesteps-per-prompt", "2", "--steps", "3", "--val-prompts", "2",
              "--sample-steps", "2", "--threads", "1", "--log-every", "1"])
        assert (out / "model.safetensors").is_file()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    batched = run(tmp_path / "batched")
    assert len(batched) == 3 and all(np.isfinite(batched))
    assert 1 in seen and 2 in seen  # single-image edits and reconstructions, two-image references
    monkeypatch.setattr(VLMEncoder, "batches_images", property(lambda self: False))
    assert run(tmp_path / "alone") == pytest.approx(batched, rel=1e-5)
