"""UniFusion Scene Render, called directly (no ComfyUI): the IMAGE is the core's exact render."""

from pathlib import Path

import numpy as np
import pytest
import torch

import nodes
import unifusion_core.paraphrase as paraphrase
import unifusion_core.scenes as scenes

NODE = nodes.NODE_CLASS_MAPPINGS["UniFusionSceneRender"]
PAGE = Path(__file__).resolve().parents[1] / "web" / "docs" / "UniFusionSceneRender.md"


def expected(prompt: str, size: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """scenes.render as a ComfyUI IMAGE: [1, size, size, 3], float 0..1."""
    return torch.from_numpy(scenes.render(scenes.parse_prompt(prompt), size, rng)).float().div(255)[None]


def test_seed_0_draws_the_nominal_scene_exactly():
    (image,) = NODE().render(scenes.EXAMPLE, 64, 0)
    assert image.dtype == torch.float32 and image.shape == (1, 64, 64, 3)
    assert torch.equal(image, expected(scenes.EXAMPLE, 64))


def test_another_seed_draws_the_renderers_jitter_from_that_seed():
    (image,) = NODE().render("a green triangle at the top", 64, 7)
    assert torch.equal(image, expected("a green triangle at the top", 64, np.random.default_rng(7)))
    assert not torch.equal(image, NODE().render("a green triangle at the top", 64, 0)[0])


def test_a_paraphrase_draws_its_canonical_scene():
    text = "A blue square to the right of a red circle."
    assert paraphrase.canonical(text).prompt == scenes.EXAMPLE
    for seed in (0, 3):
        assert torch.equal(NODE().render(text, 64, seed)[0], NODE().render(scenes.EXAMPLE, 64, seed)[0])


def test_the_size_is_honoured():
    for size in (16, 96):
        (image,) = NODE().render("a white circle in the center", size, 0)
        assert torch.equal(image, expected("a white circle in the center", size))


def test_a_prompt_outside_the_grammar_says_what_the_grammar_accepts():
    with pytest.raises(ValueError, match=r"'a fox in the snow' is not a synthetic-scene prompt or paraphrase "
                                         r"\(unknown words \['fox', 'snow'\]\): the grammar accepts"):
        NODE().render("a fox in the snow", 64, 0)


def test_the_schema_and_the_help_page():
    spec = NODE.INPUT_TYPES()["required"]
    assert spec["prompt"][1]["default"] == scenes.EXAMPLE
    assert {k: spec["size"][1][k] for k in ("default", "min", "max", "step")} == dict(default=64, min=16, max=1024,
                                                                                      step=8)
    assert spec["seed"][1]["default"] == 0
    assert spec["seed"][1]["control_after_generate"] is False  # else the frontend randomizes a "seed" after each run
    page = PAGE.read_text(encoding="utf-8")
    groups = [g.strip().split(" ", 1)[1] for g in scenes.describe_vocabulary().split(";")]  # "colours red, ..."
    assert [w.strip() for g in groups for w in g.split(",") if w.strip() not in page] == []
