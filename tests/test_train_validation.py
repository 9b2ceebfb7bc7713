"""Gradient accumulation (N micro-batches train what one big batch does) and the validation loss
(a fixed held-out set at fixed timesteps and noise: a function of the model alone)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from test_train import ENC, feature_table, run_cli, tiny_config, write_features

import unifusion_core as uf
from unifusion_core.flow import flow_loss, interpolate
from unifusion_core.train.loop import TrainConfig, Trainer
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.setup import PromptFeatures
from unifusion_core.train.sources import SyntheticScenes
from unifusion_core.train.vae import to_latents
from unifusion_core.train.val_loss import ValidationLoss, split_indices

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a white circle at the bottom", "a yellow square on the left"]


def _trainer(out, model, prompts_per_step: int, grad_accumulation: int, steps: int = 2) -> Trainer:
    src = SyntheticScenes(size=16, prompts=PROMPTS)
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(PROMPTS))
    cfg = TrainConfig(out=str(out), steps=steps, prompts_per_step=prompts_per_step, timesteps_per_prompt=2,
                      grad_accumulation=grad_accumulation, warmup=1, checkpoint_every=1000, cond_dropout=0.3)
    return Trainer(cfg, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, feats)


def test_accumulated_micro_batches_train_what_one_big_batch_does(tmp_path):
    """2 micro-batches of 3 prompts == one batch of 6: the same samples, dropout, timesteps and noise,
    the same loss and the same weights after two optimizer steps (up to float summation order)."""
    runs = []
    for name, (p, n) in {"big": (6, 1), "accumulated": (3, 2)}.items():
        torch.manual_seed(0)
        model = uf.UniFusionModel(tiny_config())
        trainer = _trainer(tmp_path / name, model, p, n)
        outs = [trainer.train_step() for _ in range(2)]
        runs.append((outs, copy.deepcopy(model.state_dict()), trainer.mixture.draws))
    (big, big_sd, big_draws), (acc, acc_sd, acc_draws) = runs
    assert big_draws == acc_draws == 12
    for a, b in zip(big, acc):
        assert a["samples"] == b["samples"] == 12
        torch.testing.assert_close(a["t"], b["t"], rtol=0, atol=0)  # the same timesteps, row for row
        torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k, v in big_sd.items():
        torch.testing.assert_close(acc_sd[k], v, rtol=1e-4, atol=1e-6)
    # and accumulation is not a no-op: a third run of 3 prompts without accumulation trains otherwise
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config())
    small = _trainer(tmp_path / "small", model, 3, 1)
    small_outs = [small.train_step() for _ in range(2)]
    assert small_outs[0]["samples"] == 6
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in big_sd.items()) > 1e-4


def test_grad_accumulation_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="grad_accumulation must be >= 1"):
        TrainConfig(out=str(tmp_path), grad_accumulation=0)


def _samples(n=4, size=16):
    src = SyntheticScenes(size=size, prompts=PROMPTS, seed=3)
    return [src.get(i) for i in range(n)]


def _model(seed: int):
    """A tiny model whose output is not zero (a fresh DiT's final layer is zero-initialised)."""
    torch.manual_seed(seed)
    model = uf.UniFusionModel(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_validation_loss_is_the_plain_flow_loss_at_fixed_times_and_noise():
    model = _model(0)
    samples = _samples(3)
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(PROMPTS))
    encoded = []
    pixel = lambda s, g: encoded.append(len(s)) or to_latents(s, "pixel")
    val = ValidationLoss(samples, feats, pixel, timesteps=4, batch=2)
    got = val(model)
    # the plain reference: one row at a time, with the documented generators
    from unifusion_core.train import val_loss as vl

    per_t = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for i, s in enumerate(samples):
            x0 = to_latents([s], "pixel")
            cond = model.encode(feats([s]))
            for j, t in enumerate([0.125, 0.375, 0.625, 0.875]):
                noise = torch.randn(x0.shape[1:], generator=vl._generator(vl.NOISE, i, j))[None]
                tt = torch.tensor([t])
                v = model(interpolate(x0, noise, tt), tt, cond)
                per_t[j] += flow_loss(v, x0, noise).double().item()
    per_t /= 3
    assert got["val_loss_by_t"] == pytest.approx(per_t.tolist(), rel=1e-5, abs=1e-6)
    assert got["val_loss"] == pytest.approx(per_t.mean().item(), rel=1e-5)
    # a function of the model alone: the batch size and a second call change nothing
    other = ValidationLoss(samples, feats, pixel, timesteps=4, batch=3)(model)
    assert other["val_loss_by_t"] == pytest.approx(got["val_loss_by_t"], abs=2e-6)
    assert val(model) == got
    assert encoded == [2, 1, 3]  # fixed held-out latents: encoded once by val (2 + 1, not again), once by other
    # and it tells models apart
    assert abs(val(_model(1))["val_loss"] - got["val_loss"]) > 1e-3


def test_validation_loss_errors_name_the_problem():
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(PROMPTS))
    with pytest.raises(ValueError, match="no usable samples"):
        ValidationLoss([], feats, None)
    with pytest.raises(ValueError, match="must be >= 1"):
        ValidationLoss(_samples(1), feats, None, timesteps=0)
    with pytest.raises(ValueError, match="fraction in"):
        split_indices(["a", "b"], 1.5)
    with pytest.raises(TypeError, match="expected the samples' ids"):
        split_indices(10, 0.5)


def test_val_split_is_fixed_disjoint_and_whole():
    ids = [f"img{i:04d}" for i in range(1000)]
    train, held = split_indices(ids, 0.1)
    assert sorted(train + held) == list(range(1000)) and not set(train) & set(held)
    assert 60 < len(held) < 140
    assert split_indices(ids, 0.1) == (train, held)  # the same for every run and seed
    assert set(split_indices(ids + ["more"] * 100, 0.1)[1]) >= set(held)  # more data keeps the samples held out


def test_adding_a_file_that_sorts_first_moves_no_held_out_sample():
    """The split goes by each sample's id, not its position: a file added in front of the sort order
    (it moved 53 of 56 held-out images of 1000 into training) or removed moves no other sample."""
    names = [f"img{i:04d}" for i in range(1, 1001)]

    def held(names: list[str]) -> set[str]:
        return {names[i] for i in split_indices(names, 0.05)[1]}

    before = held(names)
    assert 30 <= len(before) <= 70  # 50 expected, sd 6.9
    for added in (["img0000"], ["img0000", "img0500b", "zzz"]):
        assert held(sorted(names + added)) - set(added) == before
    assert held(names[1:]) == before - {names[0]}
    assert held(names[::-1]) == before  # nor does the order


def _folder(root, n=12):
    root.mkdir()
    colors = ["red", "blue", "green", "white"]
    for i in range(n):
        c = colors[i % 4]
        Image.new("RGB", (20, 20), c).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {c} square in the center")
    return [f"a {c} square in the center" for c in colors]


def test_val_split_and_val_data_in_the_cli(tmp_path):
    """--val-split sets a fixed part of the data aside (never drawn) and logs its validation loss at
    every validation; --val-data scores another dataset; both at once is refused."""
    prompts = _folder(tmp_path / "data")
    features = write_features(tmp_path / "f.safetensors", feature_table(prompts))
    common = ["--data", str(tmp_path / "data"), "--steps", "4", "--validate-every", "2", "--val-loss-samples", "3",
              "--val-loss-timesteps", "2"]
    run_cli(tmp_path / "split", features, *common, "--val-split", "0.3")
    recs = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["validation"] for r in recs if "validation" in r]
    assert [r["step"] for r in recs if "validation" in r] == [2, 4]
    assert all(len(v["val_loss_by_t"]) == 2 and v["val_loss"] > 0 for v in vals)
    assert vals[0]["val_loss"] != vals[1]["val_loss"]
    run_cli(tmp_path / "other", features, *common, "--val-data", str(tmp_path / "data"))
    assert "val_loss" in json.loads((tmp_path / "other" / "metrics.jsonl").read_text().splitlines()[-1])["validation"]
    bad = run_cli(tmp_path / "both", features, *common, "--val-split", "0.3", "--val-data", str(tmp_path / "data"),
                  check=False)
    assert bad.returncode == 1 and "not both" in bad.stderr
    # the scenes hold out their own compositions: a real-data flag there did nothing, and is refused
    from argparse import Namespace

    from unifusion_core.train.setup import ConfigError, make_data

    with pytest.raises(ConfigError, match="--val-split 0.3 sets data aside for the validation loss, which "
                                          "--val-loss-samples 0 turns off"):
        make_data(Namespace(data=str(tmp_path / "data"), resolution=16, mix="t2i=1.0", val_split=0.3,
                            val_loss_samples=0), seed=0)
    for flag in ({"val_split": 0.1}, {"val_data": str(tmp_path / "data")}):
        with pytest.raises(ConfigError, match=f"--val-{next(iter(flag))[4:]} set real data aside; with --data scenes"):
            make_data(Namespace(data="scenes", resolution=16, **flag), seed=0)


def test_val_split_holds_out_samples_the_mixture_never_draws(tmp_path):
    from argparse import Namespace

    from unifusion_core.train.setup import make_data

    _folder(tmp_path / "data", n=20)
    args = Namespace(data=str(tmp_path / "data"), resolution=16, mix="t2i=1.0", val_split=0.25)
    mixture, sources = make_data(args, seed=0)
    held = set(sources["t2i"].held_out.indices)
    assert held and len(sources["t2i"]) + len(held) == 20
    drawn = {sources["t2i"].indices[i] for _, i in mixture.draw(200)}
    assert drawn and not drawn & held
    # the split goes by the samples' ids: a file added in front of the sorted names moves no other one
    names = {sources["t2i"].held_out.get(i).id for i in range(len(held))}
    Image.new("RGB", (20, 20), "red").save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a red square in the center")
    _, again = make_data(args, seed=0)
    assert {again["t2i"].held_out.get(i).id for i in range(len(again["t2i"].held_out))} - {"a"} == names


def test_val_split_with_buckets_scores_held_out_images_at_their_bucket_sizes(tmp_path):
    """--buckets with --val-split and --grad-accumulation: images of several shapes, smaller than
    --resolution, are held out in the buckets training uses (one size a forward) and scored."""
    root = tmp_path / "data"
    root.mkdir()
    colors, shapes = ["red", "blue", "green", "white"], [(32, 16), (16, 32), (24, 24), (40, 20)]
    for i in range(24):
        Image.new("RGB", shapes[i % 4], colors[i % 4]).save(root / f"i{i:02d}.png")
        (root / f"i{i:02d}.txt").write_text(f"a {colors[i % 4]} square in the center")
    prompts = [f"a {c} square in the center" for c in colors]
    features = write_features(tmp_path / "f.safetensors", feature_table(prompts))
    run_cli(tmp_path / "run", features, "--data", str(root), "--buckets", "16", "--prompts-per-step", "2",
            "--grad-accumulation", "2", "--steps", "2", "--val-split", "0.25", "--validate-every", "2",
            "--val-loss-samples", "6", "--val-loss-timesteps", "2", "--log-every", "1")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {tuple(r["bucket"]) for r in rows if "bucket" in r} <= {(24, 10), (16, 16), (12, 20)}
    val = [r["validation"] for r in rows if "validation" in r][-1]
    assert val["val_loss"] > 0 and len(val["val_loss_by_t"]) == 2


def test_val_data_with_buckets_scores_its_images_at_their_bucket_sizes(tmp_path):
    """--buckets with --val-data: the validation set's images (several shapes, smaller than half of
    --resolution) get the buckets training uses, as --val-split's do, and are scored."""
    colors, shapes = ["red", "blue", "green", "white"], [(32, 16), (16, 32), (24, 24), (40, 20)]
    for name, n in (("data", 16), ("val", 8)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", shapes[i % 4], colors[i % 4]).save(tmp_path / name / f"i{i:02d}.png")
            (tmp_path / name / f"i{i:02d}.txt").write_text(f"a {colors[i % 4]} square in the center")
    prompts = [f"a {c} square in the center" for c in colors]
    features = write_features(tmp_path / "f.safetensors", feature_table(prompts))
    run_cli(tmp_path / "run", features, "--data", str(tmp_path / "data"), "--buckets", "16", "--resolution", "128",
            "--prompts-per-step", "2", "--steps", "2", "--val-data", str(tmp_path / "val"), "--validate-every", "2",
            "--val-loss-samples", "8", "--val-loss-timesteps", "2")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["validation"] for r in rows if "validation" in r][-1]
    assert val["val_loss"] > 0 and len(val["val_loss_by_t"]) == 2


@pytest.mark.parametrize("buckets", [None, "16"])
def test_val_data_samples_get_ids_of_their_own_and_no_latent_cache(tmp_path, buckets):
    """--val-data named like the training data (a.png in both folders): the held-out samples get ids
    of their own, so no cache (latents; an image task's features) hands one set the other's sample,
    and the validation loss encodes its latents without the training run's cache."""
    from argparse import Namespace

    from unifusion_core.train.setup import _validation_loss, make_data

    for name, color in (("data", "black"), ("val", "white")):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (16, 16), color).save(tmp_path / name / f"a{i}.png")
            (tmp_path / name / f"a{i}.txt").write_text(f"a {color} square")
    args = Namespace(data=str(tmp_path / "data"), val_data=str(tmp_path / "val"), resolution=16, mix="t2i=1.0",
                     buckets=buckets, val_split=0.0, val_loss_samples=4, val_loss_timesteps=2)
    _, sources = make_data(args, seed=0, stride=2, batch=2)
    train_ids = {sources["t2i"].get(i).id for i in range(4)}
    calls = []

    def latents(samples, generators):  # the trainer's (cached) latents: must not be used
        raise AssertionError("the validation loss used the training run's cached latents")

    latents.uncached = lambda samples, generators: calls.append([s.id for s in samples]) or to_latents(samples, "pixel")
    val = _validation_loss(args, None, latents, tiny_config(size=16), sources)
    ids = [s.id for s in val.samples]
    assert len(ids) == 4 and all(i.startswith("val-data:") for i in ids) and not set(ids) & train_ids
    assert {i.removeprefix("val-data:") for i in ids} == train_ids  # the same names: they would have collided
    assert all(float(s.target.min()) > 0.99 for s in val.samples)  # the white validation images
    val.latents(val.samples[:1], [None])
    assert calls == [[ids[0]]]
