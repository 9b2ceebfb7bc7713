"""The image side of the benchmark (eval/edits.py): fixed cases whose targets are exact, a
drawer that draws the target scores 1, one that draws the source scores what the kind allows,
and the CLI runs a checkpoint against a VLM that reads images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion_core import scene_edits, scenes
from unifusion_core.eval import edits


@pytest.mark.parametrize("task", edits.TASKS)
def test_cases_are_fixed_and_of_their_split(task):
    a, b = edits.cases(task, "heldout", 12), edits.cases(task, "heldout", 12)
    assert [(c.text, c.target) for c in a] == [(c.text, c.target) for c in b]
    assert all(np.array_equal(x, y) for c, d in zip(a, b) for x, y in zip(c.images, d.images))
    assert {len(c.images) for c in a} == ({2} if task == "multiref" else {1})
    assert all(c.split == "heldout" for c in a)
    if task == "edit":  # kind by kind in turn, none drawn twice
        assert [c.kind for c in a] == list(scene_edits.EDIT_KINDS) * 2 and len({c.text for c in a}) == 12
        # more than the rarest kind holds (54 held-out swaps): a kind used up drops out of the turn
        many = [c.kind for c in edits.cases("edit", "heldout", 400, size=8)]
        assert len(many) == 400 and many.count("swap") == 54 and len(set(many)) == 6


def test_drawing_the_target_scores_one_and_drawing_the_source_only_what_is_unchanged():
    case_list = edits.cases("edit", "train", 40) + edits.cases("reconstruct", "heldout", 10)
    by_id = {id(c): c for c in case_list}
    features = [id(c) for c in case_list]  # the drawer below reads the case back from its "features"

    def target(feats, seed):
        return [scenes.render(by_id[f].target, 64, np.random.default_rng(seed)) for f in feats]

    def source(feats, seed):
        return [by_id[f].images[0] for f in feats]

    best = edits.evaluate(target, case_list, features, [0, 1])
    assert best["train"]["all"]["avg"] == 1.0 and best["heldout"]["reconstruct"]["best_of_2"] == 1.0
    lazy = edits.evaluate(source, case_list, features, [0])
    assert lazy["heldout"]["reconstruct"]["avg"] == 1.0  # a reconstruction is its source
    assert lazy["train"]["all"]["avg"] < 0.2  # an edit is not


def test_the_cli_scores_a_checkpoint_with_a_vlm_that_reads_images(tmp_path, tiny):
    from tiny_vlms import make_tiny_internvl

    import unifusion_core as uf
    from unifusion_core.eval.__main__ import main

    vlm_path = make_tiny_internvl(tmp_path / "vlm")
    vlm = uf.load_vlm(vlm_path)
    model = uf.UniFusionModel.from_preset("tiny", vlm=vlm, latent="pixel")
    uf.save_model(model, tmp_path / "m.safetensors")
    report = main(["--task", "multiref", "--model", str(tmp_path / "m.safetensors"), "--vlm", str(vlm_path),
                   "--out", str(tmp_path / "out"), "--limit", "2", "--seeds", "2", "--steps", "2", "--size", "16",
                   "--split", "heldout", "--no-rewrite"])
    assert report["heldout"]["reference"]["n"] == 2 and 0 <= report["heldout"]["all"]["avg"] <= 1
    assert json.loads((tmp_path / "out" / "report.json").read_text())["settings"]["task"] == "multiref"
    with pytest.raises(SystemExit, match="needs --model"):
        main(["--task", "edit", "--out", str(tmp_path / "x")])


def test_the_schedule_at_its_ends_is_either_conditioning_alone(tiny):
    """sample_features with next_features: switch_at 1 draws from the first conditioning only,
    0 from the second only (Sec. 5.2's schedule between them)."""
    import torch
    from conftest import tiny_features

    from unifusion_core.features import Features
    from unifusion_core.generate import sample_features

    spec = tiny.config.encoder
    a, b = (Features(tiny_features(1, 5, seed=s)[0], spec.layers, spec, "x") for s in (1, 2))
    kw = dict(steps=3, cfg=2.0, width=16, height=16)
    first, second = sample_features(tiny, [a], [0], **kw), sample_features(tiny, [b], [0], **kw)
    assert torch.equal(sample_features(tiny, [a], [0], next_features=[b], switch_at=1.0, **kw), first)
    assert torch.equal(sample_features(tiny, [a], [0], next_features=[b], switch_at=0.0, **kw), second)
    mixed = sample_features(tiny, [a], [0], next_features=[b], switch_at=0.5, **kw)
    assert not torch.equal(mixed, first) and not torch.equal(mixed, second)


def test_the_cli_runs_the_schedule_with_the_vlms_own_rewrite(tmp_path):
    from tiny_vlms import make_tiny_internvl

    import unifusion_core as uf
    from unifusion_core.eval.__main__ import main

    vlm_path = make_tiny_internvl(tmp_path / "vlm")
    model = uf.UniFusionModel.from_preset("tiny", vlm=uf.load_vlm(vlm_path), latent="pixel")
    uf.save_model(model, tmp_path / "m.safetensors")
    report = main(["--task", "edit", "--model", str(tmp_path / "m.safetensors"), "--vlm", str(vlm_path),
                   "--out", str(tmp_path / "out"), "--limit", "2", "--seeds", "1", "--steps", "2", "--size", "16",
                   "--split", "heldout", "--switch-at", "0.2"])
    assert report["settings"]["switch_at"] == 0.2 and 0 <= report["rewrites_exact"] <= 1
    assert report["heldout"]["all"]["n"] == 2


def test_the_schedules_image_tokens_are_an_image_only_encodes(tmp_path):
    """encode_schedule reads each case once: the image tokens of its rewriting pass equal those of
    encoding the images alone."""
    from tiny_vlms import make_tiny_internvl

    import unifusion_core as uf

    vlm = uf.load_vlm(make_tiny_internvl(tmp_path / "vlm"))
    spec = vlm.encoder_spec()
    case_list = edits.cases("multiref", "heldout", 2, size=16)
    first, then, rewrites = edits.encode_schedule(vlm, case_list, spec)
    assert len(then) == len(rewrites) == 2
    for c, f in zip(case_list, first):
        alone = vlm.encode("", images=[Image.fromarray(im) for im in c.images], rewrite=False,
                           layers=spec.layers).image_tokens()
        assert bool(f.is_image.all()) and torch.equal(f.image_index, alone.image_index)
        torch.testing.assert_close(f.hidden, alone.hidden, atol=1e-4, rtol=1e-4)
