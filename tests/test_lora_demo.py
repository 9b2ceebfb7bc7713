"""The LoRA demo's data and scoring: a colour the embedded model never saw, read exactly."""

from __future__ import annotations

import numpy as np
import pytest

from unifusion_core import scenes as sc
from unifusion_core.eval import lora_demo
from unifusion_core.eval.detect import detect, score
from unifusion_core.train.sources import ImageFolder


def test_new_colour_scenes_and_their_split():
    allof = lora_demo.new_color_scenes()
    assert len(allof) == 15 + 216 and len(set(s.prompt for s in allof)) == len(allof)
    assert all(sum(o.color == "cyan" for o in s.objects) == 1 for s in allof)
    train, held = lora_demo.new_color_scenes("train"), lora_demo.new_color_scenes("heldout")
    assert len(train) + len(held) == len(allof) and held and not {s.prompt for s in train} & {s.prompt for s in held}


def test_the_detector_reads_the_new_colour_and_still_the_six():
    rng = np.random.default_rng(0)
    for s in lora_demo.new_color_scenes()[::7]:
        img = sc.render(s, 64, rng, palette=lora_demo.PALETTE)
        assert score(s, detect(img, palette=lora_demo.PALETTE))["all"], s.prompt
        assert all(d.color != "cyan" for d in detect(img))  # the grammar's palette does not see it
    for s in sc.all_scenes()[::11]:  # the extended palette reads the grammar's renders as before
        img = sc.render(s, 64, rng)
        assert detect(img, palette=lora_demo.PALETTE) == detect(img)
    with pytest.raises(KeyError):
        sc.render(lora_demo.new_color_scenes()[0], 64)  # the grammar's palette has no cyan


def test_demo_data_is_an_image_folder_the_trainer_reads(tmp_path):
    summary = lora_demo.make_data(tmp_path / "d", n=12, replay=0.5)
    assert summary["new"] + summary["replay"] == 12 and summary["new"] > 0 and summary["replay"] > 0
    src = ImageFolder(tmp_path / "d", resolution=64)
    assert len(src) == 12
    held = {s.prompt for s in lora_demo.new_color_scenes("heldout")} | {s.prompt for s in sc.scenes("heldout")}
    for i in range(12):
        sample = src.get(i)
        assert sample.prompt not in held and sample.target.shape == (3, 64, 64)
    assert lora_demo.make_data(tmp_path / "e", n=12, replay=0.5) == summary  # deterministic
    assert (tmp_path / "d" / "00003.png").read_bytes() == (tmp_path / "e" / "00003.png").read_bytes()
