"""Aspect-ratio buckets (train/buckets.py): the bucket table, the assignment of image sizes, one
bucket per batch, determinism, exact resume of a bucketed run, the same batches on 1 and 2
processes, and the errors of --buckets."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import ENC, feature_table, tiny_config, write_features

import unifusion_core as uf
from unifusion_core import scenes
from unifusion_core.train import __main__ as cli
from unifusion_core.train.buckets import (
    Bucket,
    BucketMixture,
    assign,
    bucket_table,
    bucketize,
    merge_small,
    parse_buckets,
)
from unifusion_core.train.loop import TrainConfig, Trainer
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.setup import PromptFeatures
from unifusion_core.train.sources import ImageFolder, Manifest, preprocess, read_image_size
from unifusion_core.train.state import read_tensors, state_path

PROMPTS = [s.prompt for s in scenes.all_scenes()][:24]
# (width, height): landscape 2.2:1, portrait 1:2.2, square, and 3 wide 3.5:1 ones (fewer than a batch of 4)
SIZES = [(44, 20)] * 6 + [(20, 44)] * 6 + [(24, 24)] * 6 + [(56, 16)] * 3


def image_folder(root: Path, sizes=SIZES) -> Path:
    """Images of the given sizes (a colour gradient, so crops and resizes show), captions from the scenes."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        rgb = np.concatenate([x.repeat(h, 0), y.repeat(w, 1), np.full((h, w, 1), 40.0 * (i % 6))], axis=2)
        Image.fromarray(rgb.astype(np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(PROMPTS[i % len(PROMPTS)])
    return root


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feat") / "features.safetensors", feature_table(PROMPTS))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "imgs")


# --- the table and the assignment ----------------------------------------------------------------


@pytest.mark.parametrize("side,stride,area_tol", [(1024, 16, 0.025), (512, 16, 0.055), (1024, 8, 0.012),
                                                  (64, 2, 0.055), (16, 2, 0.1)])
def test_bucket_table_sizes_areas_and_ratios(side, stride, area_tol):
    table = bucket_table((side,), stride)
    assert all(b.height % stride == 0 and b.width % stride == 0 and b.tier == side for b in table)
    assert all((1 - area_tol) * side * side <= b.height * b.width <= side * side for b in table)  # never above
    keys = {(b.height, b.width) for b in table}
    assert all((w, h) in keys for h, w in keys)  # portrait mirrors landscape
    r = np.log([b.ratio for b in table])
    assert math.isclose(r.min(), -math.log(4)) and math.isclose(r.max(), math.log(4))  # 1:4 and 4:1 themselves
    assert (round(side / stride) * stride,) * 2 in keys  # the square
    # every ratio from 1:4 to 4:1 has a bucket within 7 % (16 px tiers: 25 %, the stride is 1/8 of the side)
    grid = np.log(np.linspace(0.25, 4, 4001))
    assert math.exp(np.abs(grid[:, None] - r[None]).min(axis=1).max()) < (1.07 if side >= 64 else 1.26)


def test_bucket_table_of_two_tiers_and_a_vae_stride():
    """flux-like: patch 2 x downscale 8 = 16 px."""
    table = bucket_table(parse_buckets("1024, 512"), 16)
    assert {b.tier for b in table} == {512, 1024} and len(table) == 66
    assert Bucket(1024, 1024, 1024) in table and Bucket(512, 2048, 1024) in table and Bucket(256, 1024, 512) in table


def test_assignment_picks_the_largest_tier_without_upscaling_and_the_nearest_ratio():
    table = bucket_table((512, 1024), 16)
    sizes = np.array([[1024, 1024], [3000, 1400], [1400, 3000], [700, 700], [300, 300], [200, 200], [5000, 400],
                      [0, 0], [1024, 1023]])
    got = assign(sizes, table)
    keys = [table[i].key if i >= 0 else int(i) for i in got]
    assert keys[:4] == ["1024x1024", "704x1472", "1472x704", "512x512"]
    assert keys[4] == "512x512"  # 1.7x upscaling for the smallest tier: allowed (<= 2x)
    assert keys[5:8] == [-1, "256x1024", -2]  # too small; 12.5:1 -> the 4:1 bucket; unreadable
    assert keys[8] == "512x512"  # 1024x1023 does not cover 1024x1024: the smaller tier, never upscaled
    # against a plain loop over random sizes
    rng = np.random.default_rng(0)
    sizes = rng.integers(150, 3000, size=(300, 2))
    for (w, h), i in zip(sizes, assign(sizes, table)):
        cover = {b: max(b.width / w, b.height / h) for b in table}
        best = {}
        for tier in (512, 1024):
            cands = [b for b in table if b.tier == tier]
            best[tier] = min(cands, key=lambda b: (abs(math.log(b.ratio * h / w)), table.index(b)))
        want = (best[1024] if cover[best[1024]] <= 1 else best[512] if cover[best[512]] <= 2 else None)
        assert (table[i] if i >= 0 else None) == want


def test_preprocess_fills_a_bucket_with_the_least_crop(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8))  # 80 wide, 40 high
    x = preprocess(img, (20, 40))  # the same ratio: a plain resize, nothing cropped
    ref = np.asarray(img.resize((40, 20), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(ref).permute(2, 0, 1))
    y = preprocess(img, (20, 20))  # square from a 2:1 image: height scaled to 20, the middle 20 columns
    mid = np.asarray(img.resize((40, 20), Image.Resampling.BICUBIC), dtype=np.float32)[:, 10:30] / 255
    torch.testing.assert_close(y, torch.from_numpy(mid).permute(2, 0, 1))
    assert torch.equal(preprocess(img, 20), y)  # a square resolution is the (R, R) bucket
    # a JPEG stored landscape with EXIF orientation 6 (rotate 90) is portrait, and read as such
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "rot.txt").write_text(PROMPTS[0])
    assert read_image_size(tmp_path / "rot.jpg", "rot") == (40, 80)
    s = ImageFolder(tmp_path, resolution=16)
    assert s.image_size(0) == (40, 80) and s.get(0, size=(40, 20)).target.shape == (3, 40, 20)


def test_manifest_width_and_height_skip_the_image_header(tmp_path):
    Image.new("RGB", (30, 10)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "prompt": "x"}, {"image": "a.png", "prompt": "y", "width": 10, "height": 30},
            {"image": "missing.png", "prompt": "z", "width": 64, "height": 32}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    m = Manifest(tmp_path / "m.jsonl", resolution=16)
    assert [m.image_size(i) for i in range(3)] == [(30, 10), (10, 30), (64, 32)]  # the third file is never opened


def test_small_buckets_merge_into_the_nearest():
    table = [Bucket(16, 16, 16), Bucket(12, 20, 16), Bucket(10, 26, 16), Bucket(32, 32, 32)]
    # 3 images at 10x26 -> its neighbour 12x20 (same tier, nearest ratio); the 32 tier bucket stays
    assert merge_small({0: 8, 1: 4, 2: 3, 3: 5}, table, 4) == {2: 1}
    # chained: 10x26 -> 12x20, which is still small -> 16x16
    assert merge_small({0: 8, 1: 1, 2: 1}, table, 4) == {1: 0, 2: 0}
    # a small bucket of the larger tier goes down, not up; a last bucket stays whatever its size
    assert merge_small({0: 2, 3: 1}, table, 4) == {3: 0}


# --- the mixture -------------------------------------------------------------------------------


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _mixture(seed=0, ratios=None) -> BucketMixture:
    a, b, c = Bucket(16, 16, 16), Bucket(12, 20, 16), Bucket(20, 12, 16)
    groups = {a: {"t2i": np.arange(0, 10), "edit": np.arange(0, 3)}, b: {"t2i": np.arange(10, 16)},
              c: {"t2i": np.arange(16, 20), "edit": np.arange(3, 6)}}
    return BucketMixture({"t2i": _Sized(20), "edit": _Sized(6)}, ratios or {"t2i": 0.8, "edit": 0.2}, seed, groups)


def test_each_batch_comes_from_one_bucket_with_the_plain_mixtures_marginals():
    m = _mixture()
    where = {}  # (task, index) -> bucket key
    for b, g in zip(m.buckets, m.members):
        where |= {(t, int(i)): b.key for t, idx in g.items() for i in idx}
    drawn, buckets = Counter(), Counter()
    for _ in range(3000):
        picks = m.draw(4)
        picks += m.refill(2)  # a bad sample's refill stays in the batch's bucket
        assert len({where[p] for p in picks}) == 1 and where[picks[0]] == m.bucket.key
        drawn.update(picks)
        buckets[m.bucket.key] += 1
    n = sum(drawn.values())
    # each task's share is its ratio, each of its samples equally likely: as without buckets
    assert abs(sum(v for (t, _), v in drawn.items() if t == "edit") / n - 0.2) < 0.01
    per = [v for (t, _), v in drawn.items() if t == "t2i"]
    assert len(per) == 20 and max(per) / min(per) < 1.15
    # a bucket is drawn with the probability of its samples under the plain mixture
    want = {"16x16": 0.8 * 10 / 20 + 0.2 * 3 / 6, "12x20": 0.8 * 6 / 20, "20x12": 0.8 * 4 / 20 + 0.2 * 3 / 6}
    assert all(abs(buckets[k] / 3000 - p) < 0.03 for k, p in want.items())


def test_bucket_draws_are_deterministic_and_walk_each_bucket_without_repeats():
    a, b = _mixture(), _mixture()
    seq = [a.draw(4) for _ in range(50)]
    assert seq == [b.draw(4) for _ in range(50)]
    assert seq != [_mixture(seed=1).draw(4) for _ in range(50)]
    # within a (bucket, task), an epoch is a permutation: every sample once before any repeats
    m = _mixture(ratios={"t2i": 1.0, "edit": 0.0})
    seen: dict[str, list[int]] = {}
    for _ in range(40):
        picks = m.draw(4)
        seen.setdefault(m.bucket.key, []).extend(i for _, i in picks)
    members = {b.key: sorted(g["t2i"].tolist()) for b, g in zip(m.buckets, m.members)}
    for key, idx in seen.items():
        size = len(members[key])
        assert len(idx) >= 2 * size
        for e in range(len(idx) // size):
            assert sorted(idx[e * size:(e + 1) * size]) == members[key]


def test_a_saved_bucket_state_continues_the_same_sequence_and_refuses_other_data():
    a = _mixture()
    for _ in range(7):
        a.draw(4)
    state = json.loads(json.dumps(a.state_dict()))  # what the state file holds
    b = _mixture()
    b.load_state_dict(state)
    assert [a.draw(4) for _ in range(20)] == [b.draw(4) for _ in range(20)]
    with pytest.raises(ValueError, match="seed 0 -> 1"):
        _mixture(seed=1).load_state_dict(state)
    plain = TaskMixture({"t2i": _Sized(20)}, {"t2i": 1.0})
    assert any("buckets -> none" in d for d in plain.differences({**state, "ratios": {"t2i": 1.0}}))
    assert "no aspect-ratio buckets -> --buckets" in a.differences(plain.state_dict())


# --- the trainer -------------------------------------------------------------------------------


ARGS = ["--resolution", "16", "--preset", "tiny", "--dit-width", "32", "--dit-depth", "1", "--dit-heads", "2",
        "--patch", "2", "--shift", "1.0", "--prompts-per-step", "4", "--timesteps-per-prompt", "2", "--lr", "1e-3",
        "--warmup", "2", "--val-prompts", "0", "--val-loss-samples", "0", "--log-every", "1", "--buckets", "16"]


class _Killed(Exception):
    pass


def _cli(out: Path, features: Path, folder: Path, *extra: str, kill_after: int | None = None, monkeypatch=None):
    if kill_after is not None:  # a crash after that step (tests/train_killed.py SIGKILLs; here in-process)
        def stop(trainer):
            if trainer.step == kill_after:
                raise _Killed

        class KilledTrainer(cli.Trainer):
            def __init__(self, *a, **k):
                super().__init__(*a, on_step_end=stop, **k)

        monkeypatch.setattr(cli, "Trainer", KilledTrainer)
    try:
        return cli.main(["--out", str(out), "--features", str(features), "--data", str(folder), *ARGS, *extra])
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_bucketed_run_killed_and_resumed_is_bit_identical(tmp_path, features, folder, monkeypatch, caplog):
    steps = ["--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "10"]
    with caplog.at_level(logging.INFO):
        _cli(tmp_path / "a", features, folder, *steps)
    # the histogram at start; the three 3:1 images (fewer than a batch) merged into their nearest bucket
    assert "images per bucket: 24x10 6, 16x16 6, 10x24 9" in caplog.text, caplog.text
    assert "merged into their nearest: 8x30 (3) -> 10x24" in caplog.text
    with pytest.raises(_Killed):
        _cli(tmp_path / "b", features, folder, *steps, kill_after=3, monkeypatch=monkeypatch)
    _cli(tmp_path / "b", features, folder, *steps, "--resume")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_tensors(state_path(tmp_path / "a", 6)), read_tensors(state_path(tmp_path / "b", 6))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # optimizer moments, EMA
    ra, rb = _records(tmp_path / "a"), _records(tmp_path / "b")
    by_step = lambda rows: {r["step"]: (r["bucket"], r["loss"]) for r in rows if "bucket" in r}
    assert by_step(ra) == by_step(rb) and len(by_step(ra)) == 6
    assert len({tuple(r["bucket"]) for r in ra if "bucket" in r}) > 1  # the steps did use several buckets
    assert all(r["buckets"] == {"x".join(map(str, r["bucket"])): 1} for r in ra if "bucket" in r)


def test_tokens_per_s_counts_every_step_since_the_last_log(tmp_path, features, folder):
    """With buckets each step has its own image size: a record's image tokens per sample are the mean
    over the steps it covers, not the last step's (which swung tokens/s, TFLOP/s and MFU by the
    ratio of the sizes)."""
    _cli(tmp_path / "w", features, folder, "--steps", "6", "--log-every", "3")
    recs = [r for r in _records(tmp_path / "w") if "buckets" in r]
    assert len(recs) == 2
    for r in recs:
        tokens = {k: (int(k.split("x")[0]) // 2) * (int(k.split("x")[1]) // 2) for k in r["buckets"]}  # patch 2
        mean = sum(n * tokens[k] for k, n in r["buckets"].items()) / sum(r["buckets"].values())
        assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(mean, rel=2e-3), r
    assert any(len(set(tokens_of)) > 1 for tokens_of in (  # a window mixed sizes of different token counts
        [(int(k.split("x")[0]) // 2) * (int(k.split("x")[1]) // 2) for k in r["buckets"]] for r in recs))


def test_the_batches_do_not_depend_on_the_number_of_processes(tmp_path, features, folder):
    """Two processes under torchrun train the bucketed batches one process does (each rank its
    half of each step's bucket), to float32 rounding."""
    from test_distributed import ARGS as DIST_ARGS
    from test_distributed import ok, train

    args = ["--data", str(folder), "--buckets", "16", "--dit-width", "32", "--dit-depth", "1", "--dit-heads", "2",
            "--val-prompts", "0", "--val-loss-samples", "0", "--steps", "4"]
    i = DIST_ARGS.index("--threads")  # in this process: its thread count stays
    cli.main(["--out", str(tmp_path / "one"), "--features", str(features), *DIST_ARGS[:i], *DIST_ARGS[i + 2:], *args])
    ok(train(tmp_path / "two", features, *args, procs=2))
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    steps = lambda rows: [(r["step"], r["bucket"]) for r in rows if "bucket" in r]
    assert steps(one) == steps(two) and len(steps(one)) == 4 and two[-1]["world_size"] == 2
    torch.testing.assert_close([r["loss"] for r in one if "bucket" in r], [r["loss"] for r in two if "bucket" in r],
                               rtol=1e-4, atol=1e-5)


def test_bucket_samples_have_their_bucket_size(tmp_path, folder):
    src = ImageFolder(folder, resolution=16)
    mixture, sources = bucketize({"t2i": src}, {"t2i": 1.0}, 0, (16,), 2, 4)
    for _ in range(6):
        picks = mixture.draw(4)
        shapes = {tuple(sources[t].get(i).target.shape) for t, i in picks}
        assert shapes == {(3, mixture.bucket.height, mixture.bucket.width)}


def test_buckets_errors_name_the_fix(tmp_path, features, folder):
    base = ["--out", str(tmp_path / "r"), "--features", str(features), "--resolution", "16", "--dit-width", "32",
            "--dit-depth", "1", "--dit-heads", "2", "--patch", "4"]
    for value, message in [("big", "--buckets 'big': expected comma-separated image sides in pixels, e.g. 512,1024"),
                           ("0", "--buckets '0': expected positive image sides in pixels"),
                           ("16,16", "--buckets '16,16': a tier is given twice"),
                           ("2", "--buckets 2: smaller than the model's pixel stride (4 px")]:
        with pytest.raises(SystemExit) as e:
            cli.main([*base, "--data", str(folder), "--buckets", value])
        assert str(e.value.code).startswith(message), e.value.code
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--buckets", "16"])  # --data scenes
    assert "the synthetic scenes are square" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--data", str(folder), "--buckets", "64"])
    assert "no image fits any bucket" in str(e.value.code)
    from types import SimpleNamespace

    from unifusion_core.train.setup import make_data

    # --latent-cache with --buckets: the cache keys each latent by its size (test_train_data.py)
    args = SimpleNamespace(data=str(folder), buckets="16", latent_cache="x", mix="t2i=1", resolution=16)
    mixture, _ = make_data(args, 0, stride=2)
    assert mixture.histogram()


def test_a_bad_image_is_replaced_from_the_same_bucket(tmp_path, caplog):
    """A truncated image (its header reads, its pixels do not) is drawn, skipped, counted, and its
    slot refilled from the batch's bucket."""
    root = image_folder(tmp_path / "imgs", [(44, 20)] * 5 + [(20, 44)] * 5)
    for name in ("img00.png", "img05.png"):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    mixture, sources = bucketize({"t2i": ImageFolder(root, resolution=16)}, {"t2i": 1.0}, 0, (16,), 2, 4)
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(PROMPTS, ENC))
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, prompts_per_step=4, max_bad_fraction=0.9)
    trainer = Trainer(cfg, uf.UniFusionModel(tiny_config()), mixture, sources, feats)
    with caplog.at_level(logging.WARNING):
        for _ in range(8):
            batch = trainer.draw(4)
            assert {tuple(s.target.shape) for s in batch} == {(3, mixture.bucket.height, mixture.bucket.width)}
    assert trainer.bad >= 2 and "img00.png" in caplog.text and "img05.png" in caplog.text
