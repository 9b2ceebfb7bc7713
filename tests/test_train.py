"""The trainer: the flow objective, exact resume after SIGKILL, handoff, bad data, and a tiny
model that really learns to draw scenes (scored by the exact detector)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_killed
from PIL import Image
from safetensors.torch import load_file

import unifusion_core as uf
from unifusion_core import flow, scenes
from unifusion_core.config import EncoderSpec, every_nth_layer
from unifusion_core.eval import detect, score
from unifusion_core.eval.model_gen import model_generate_fn
from unifusion_core.generate import generate, sample_features
from unifusion_core.train.data import Sample
from unifusion_core.train.loop import (
    POSTERIOR,
    TrainConfig,
    Trainer,
    build_model,
    lr_at,
    param_groups,
    row_generators,
    row_noise,
    step_generator,
)
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.setup import PromptFeatures
from unifusion_core.train.sources import ImageFolder, SyntheticScenes
from unifusion_core.train.state import list_states, read_tensors, state_path

ROOT = Path(__file__).resolve().parents[1]
ENC = EncoderSpec("tiny", "tiny-random", hidden_size=32, num_layers=6, layers=every_nth_layer(6))


def tiny_config(encoder: EncoderSpec = ENC, size: int = 16, patch: int = 2, **dit):
    return uf.get_preset("tiny").replace(
        encoder=encoder, latent="pixel",
        dit={"hidden_size": 64, "depth": 2, "heads": 4, "patch_size": patch, "axes_dim": None, **dit},
        sampling={"size": (size, size), "shift": 1.0, "steps": 10, "cfg": 2.0, "rewrite": False},
    )


def feature_table(prompts: list[str], encoder: EncoderSpec = ENC, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct fixed random 'VLM features' per prompt (T tokens = words of the prompt)."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(len(p.split()), len(encoder.layers), encoder.hidden_size, generator=g) for p in prompts}


def write_features(path: Path, table: dict[str, torch.Tensor], encoder: EncoderSpec = ENC) -> Path:
    from safetensors.torch import save_file

    prompts = list(table)
    save_file({str(i): table[p].half().contiguous() for i, p in enumerate(prompts)}, str(path),
              metadata={"prompts": json.dumps(prompts), "encoder": json.dumps(dataclasses.asdict(encoder))})
    return path


# --- the objective ------------------------------------------------------------------------------


def test_flow_convention_against_plain_math():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.rand(3, generator=g)
    xt = flow.interpolate(x0, noise, t)
    for i in range(3):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    # the velocity target is the time derivative of the path
    eps = 1e-3
    d = (flow.interpolate(x0, noise, t + eps) - flow.interpolate(x0, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(d, flow.velocity_target(x0, noise), rtol=1e-3, atol=1e-3)
    v = torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(flow.flow_loss(v, x0, noise), ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))


def test_timesteps_logit_normal_with_shift():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(200_000, 1.0, g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01  # logit-normal(0, 1) is symmetric about 0.5
    shifted = flow.sample_timesteps(200_000, 3.0, torch.Generator().manual_seed(0))
    # the shift maps the median through time_shift: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(shifted.median().item() - 0.75) < 0.01


@pytest.mark.parametrize("space", sorted(uf.LATENT_SPACES))
def test_resolution_shift_is_finite_and_clamped_at_every_size(space):
    p = uf.SamplingParams()
    ls = uf.get_latent_space(space)
    for side in (8, 64, 256, 1024, 4096, 16384, 65536):
        h, w = ls.latent_size(side, side)
        s = flow.resolution_shift((h // 2) * (w // 2), p)
        assert math.isfinite(s) and p.shift_range[0] <= s <= p.shift_range[1]
    assert flow.resolution_shift(4096, p) == pytest.approx(math.exp(1.15))  # Flux's own range is untouched
    assert flow.resolution_shift(10**9, dataclasses.replace(p, shift=1.5)) == 1.5  # a fixed shift wins


def test_lr_schedule_and_step_generators():
    cfg = TrainConfig(out="x", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    a, b = step_generator(0, 5), step_generator(0, 5)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    assert not torch.equal(torch.randn(4, generator=step_generator(0, 6)),
                           torch.randn(4, generator=step_generator(1, 5)))


def test_row_noise_is_a_function_of_the_row_alone():
    """A rank draws only its rows' noise: rows 2..3 drawn alone equal rows 2..3 of the whole
    batch's noise; every row, step, seed and purpose has its own stream."""
    whole = row_noise(row_generators(7, 3, range(4)), (2, 5, 5))
    assert whole.shape == (4, 2, 5, 5)
    assert torch.equal(row_noise(row_generators(7, 3, range(2, 4)), (2, 5, 5)), whole[2:])
    flat = whole.flatten(1)
    assert torch.corrcoef(flat).sub(torch.eye(4)).abs().max() < 0.3  # distinct rows (50 values each)
    for other in (row_generators(7, 4, range(4)), row_generators(8, 3, range(4)),
                  row_generators(7, 3, range(4), POSTERIOR)):
        assert not torch.equal(row_noise(other, (2, 5, 5)), whole)
    assert abs(float(row_noise(row_generators(0, 0, range(64)), (32, 32)).std()) - 1) < 0.02


# --- one path for generation ----------------------------------------------------------------------


def test_adapter_matrices_learn_at_a_fan_in_scaled_lr(tmp_path):
    """LAP's pooling FC reads L x D inputs; its lr is scaled by DiT width / fan-in (muP-style), the
    DiT keeps lr, and adapter_lr multiplies every LAP and refiner parameter (0 freezes them)."""
    wide = EncoderSpec("tiny", "wide", hidden_size=128, num_layers=6, layers=every_nth_layer(6))  # pool fan-in 384
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config(wide))
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, TrainConfig(out="x")) for p in g["params"]}
    assert scale_of[id(model.lap.pool.weight)] == pytest.approx(64 / 384)
    assert scale_of[id(model.lap.blocks[0].attn.qkv.weight)] == pytest.approx(64 / 128)
    assert scale_of[id(model.refiner.proj.weight)] == pytest.approx(64 / 128)
    assert scale_of[id(model.lap.layer_embed)] == 1.0 and scale_of[id(model.dit.img_in.weight)] == 1.0
    assert all(scale_of[id(p)] == 1.0 for p in model.dit.parameters())
    plain = {g["lr_scale"] for g in param_groups(model, TrainConfig(out="x", adapter_lr_scaling="none"))}
    assert plain == {1.0}
    # the optimizer really applies it: with adapter_lr=0 the adapter stays put, the DiT moves
    lap0 = {k: v.clone() for k, v in model.lap.state_dict().items()}
    dit0 = model.dit.img_in.weight.detach().clone()
    _trainer(tmp_path, model, ["a red circle on the left"], steps=2, adapter_lr=0.0).run()
    assert all(torch.equal(v, model.lap.state_dict()[k]) for k, v in lap0.items())
    assert not torch.equal(dit0, model.dit.img_in.weight)
    with pytest.raises(ValueError, match="adapter_lr_scaling"):
        TrainConfig(out="x", adapter_lr_scaling="mup")


def test_generate_equals_the_model_chain():
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config()).eval()
    f = uf.Features(torch.randn(4, len(ENC.layers), ENC.hidden_size), ENC.layers, ENC, "a red circle on the left")
    out = generate(None, model, f.text, features=f, seed=3)
    ref = model.sample(model.encode(f), 16, 16, seed=3)
    assert torch.equal(out.latent, ref) and out.images[0].shape == (16, 16, 3)
    # a batch of (features, seed) pairs gives each pair's own image
    batch = sample_features(model, [f, f], [3, 4])
    assert torch.equal(batch[:1], ref)
    assert torch.equal(batch[1:], model.sample(model.encode(f), 16, 16, seed=4))


# --- the loop -----------------------------------------------------------------------------------


def run_cli(out: Path, features: Path, *extra: str, check: bool = True, env: dict | None = None,
            kill_after: int | str | None = None) -> subprocess.CompletedProcess:
    """The training CLI on a tiny model; kill_after=N: SIGKILLed once N steps are done, "N:TERM": sent
    SIGTERM then (tests/train_killed.py)."""
    launch = ["-m", "unifusion_core.train"] if kill_after is None else [str(train_killed.SCRIPT), str(kill_after)]
    cmd = [sys.executable, *launch, "--out", str(out), "--features", str(features),
           "--resolution", "16", "--preset", "tiny", "--dit-width", "64", "--dit-depth", "2", "--dit-heads", "4",
           "--patch", "2", "--shift", "1.0", "--prompts-per-step", "4", "--timesteps-per-prompt", "2",
           "--lr", "1e-3", "--warmup", "2", "--val-prompts", "2", "--sample-steps", "4", "--threads", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=check, timeout=300)


@pytest.fixture(scope="module")
def scene_features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feat") / "features.safetensors",
                          feature_table([s.prompt for s in scenes.all_scenes()]))


def test_resume_after_sigkill_is_bit_identical(tmp_path, scene_features):
    steps = ["--steps", "16", "--checkpoint-every", "4", "--keep-checkpoints", "10", "--log-every", "1"]
    run_cli(tmp_path / "a", scene_features, *steps)
    # the same run killed with SIGKILL after step 9 (last state: step 8), then resumed
    killed = run_cli(tmp_path / "b", scene_features, *steps, check=False, kill_after=9)
    assert killed.returncode == -signal.SIGKILL
    states = list_states(tmp_path / "b")
    assert states[-1][1].name == "step-00000008" and not (tmp_path / "b" / "model.safetensors").exists()
    # a wrong setting on resume is refused and leaves the run's recorded settings untouched
    bad = run_cli(tmp_path / "b", scene_features, *steps, "--resume", "--dit-width", "32", check=False)
    assert bad.returncode != 0 and json.loads((tmp_path / "b" / "run.json").read_text())["dit_width"] == 64
    # `--resume` alone continues with the settings the run was started with (run.json)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "unifusion_core.train", "--out", str(tmp_path / "b"), "--resume"],
                   cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = read_tensors(state_path(tmp_path / "a", 16))
    sb = read_tensors(state_path(tmp_path / "b", 16))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # optimizer moments and EMA too
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in sa)
    assert any(k.startswith("ema.") for k in sa)
    # the loss curve continues exactly
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    curve = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert curve(la) == curve(lb) and [s for s, _ in curve(lb)] == list(range(1, 17))  # steps 9 and 10 once each
    # a finished run refuses to start over in the same folder
    again = run_cli(tmp_path / "a", scene_features, *steps, check=False)
    assert again.returncode != 0 and "--resume" in again.stderr


def test_sigterm_saves_the_state_and_resume_continues_exactly(tmp_path, scene_features):
    """A scheduler's preemption (SIGTERM, or Slurm's SIGUSR1): the run finishes the step it came in,
    saves its state there (not only at --checkpoint-every), exports nothing and exits with status 5;
    --resume then ends where the uninterrupted run does, bit for bit."""
    steps = ["--steps", "6", "--checkpoint-every", "100", "--val-prompts", "0"]
    run_cli(tmp_path / "a", scene_features, *steps)
    for sig in ("TERM", "USR1"):
        stopped = run_cli(tmp_path / sig, scene_features, *steps, check=False, kill_after=f"3:{sig}")
        assert stopped.returncode == 5, stopped.stderr[-2000:]
        # sent at the end of step 3 (after its checks): the run stops at the end of step 4
        assert f"stopped by SIG{sig} at step 4 of 6: state saved in" in stopped.stderr
        assert [p.name for _, p in list_states(tmp_path / sig)] == ["step-00000004"]
        assert not (tmp_path / sig / "model.safetensors").exists()
        run_cli(tmp_path / sig, scene_features, *steps, "--resume")
        a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("a", sig))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_model_loads_in_the_nodes_path(tmp_path, scene_features):
    run_cli(tmp_path / "r", scene_features, "--steps", "2")
    model = uf.load_model(tmp_path / "r" / "model.safetensors")
    assert model.config.sampling.size == (16, 16) and model.config.sampling.rewrite is False
    assert model.config.encoder.same_encoder(ENC)
    summary = json.loads((tmp_path / "r" / "run.json").read_text())
    assert summary["steps"] == 2


def _trainer(tmp_path, model, prompts, steps=3, jitter=True, validate=None, **cfg) -> Trainer:
    table = feature_table(prompts, model.config.encoder)
    src = SyntheticScenes(size=model.config.sampling.size[0], prompts=prompts, jitter=jitter)
    mix = TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0)
    feats = PromptFeatures(model.config.encoder, model.config.encoder.layers, table=table)
    tc = TrainConfig(out=str(tmp_path), steps=steps, prompts_per_step=4, timesteps_per_prompt=2, warmup=1,
                     **{"checkpoint_every": 1000, **cfg})
    return Trainer(tc, model, mix, {"t2i": src}, feats, validate)


def test_validation_off_still_exports_the_model(tmp_path, scene_features):
    """--val-prompts 0 and --val-loss-samples 0 turn validation off: the run trains, writes no grid and exports."""
    result = run_cli(tmp_path / "r", scene_features, "--steps", "2", "--val-prompts", "0", "--val-loss-samples", "0",
                     check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    model = uf.load_model(tmp_path / "r" / "model.safetensors")
    assert model.config.sampling.size == (16, 16)
    assert not list((tmp_path / "r").glob("val-*.png"))
    assert not any("validation" in json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())


def test_periodic_steps_turned_off_run_at_the_end(tmp_path):
    """checkpoint_every / log_every 0: the state and the metrics of the last step only, and the export;
    on_step_end sees every step."""
    torch.manual_seed(0)
    seen = []
    t = _trainer(tmp_path, uf.UniFusionModel(tiny_config()), ["a red circle on the left"], steps=3,
                 checkpoint_every=0, log_every=0)
    t.on_step_end = lambda trainer: seen.append(trainer.step)
    assert t.run()["step"] == 3 and seen == [1, 2, 3]
    assert [s for s, _ in list_states(tmp_path)] == [3]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]
    assert uf.load_model(tmp_path / "model.safetensors").config.dit.depth == 2
    for bad in ({"checkpoint_every": -1}, {"log_every": -5}, {"validate_every": -1}, {"keep_checkpoints": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(out=str(tmp_path), **bad)


def test_a_failing_final_validation_keeps_the_export(tmp_path):
    def validate(model, step, out):
        raise RuntimeError("the detector broke")

    torch.manual_seed(0)
    t = _trainer(tmp_path, uf.UniFusionModel(tiny_config()), ["a red circle on the left"], steps=1, validate=validate)
    with pytest.raises(RuntimeError, match="validation at step 1 failed") as e:
        t.run()
    assert "the detector broke" in str(e.value.__cause__)
    assert uf.load_model(tmp_path / "model.safetensors").config.dit.depth == 2


def test_cli_errors_name_the_fix_and_lose_nothing(tmp_path, scene_features):
    from unifusion_core.train.__main__ import main, parser
    from unifusion_core.train.setup import ConfigError, parse_mix
    from unifusion_core.train.tasks import PAPER_RATIOS

    assert parser().get_default("mix") == "t2i=0.85,reconstruction=0.05,edit=0.10"
    assert parse_mix(parser().get_default("mix")) == PAPER_RATIOS
    with pytest.raises(ConfigError, match=r"unknown tasks \['edti'\]; expected some of \('t2i', 'reconstruction', "):
        parse_mix("t2i=0.9,edti=0.1")
    base = ["--out", str(tmp_path / "r"), "--features", str(scene_features), "--resolution", "16", "--dit-width", "64",
            "--dit-depth", "2", "--dit-heads", "4", "--patch", "2"]
    # a ConfigError from the library exits with its message alone (status 1), as the CLI always did
    with pytest.raises(SystemExit) as e:
        main([*base, "--data", str(tmp_path), "--mix", "t2i"])
    assert str(e.value.code).startswith("--mix 't2i': expected task=ratio pairs")
    with pytest.raises(SystemExit) as e:
        main([*base, "--val-prompts", "-1"])
    assert e.value.code == "--val-prompts must be >= 0 (0: no validation), got -1"
    # --export-only exports a saved state, never fresh weights
    with pytest.raises(SystemExit, match="give --resume too"):
        main([*base, "--export-only"])
    with pytest.raises(SystemExit, match="no training state in .* to export"):
        main([*base, "--resume", "--export-only"])
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_handoff_keeps_the_dit_and_starts_lap_and_refiner_fresh(tmp_path):
    torch.manual_seed(0)
    src = uf.UniFusionModel(tiny_config())
    uf.save_model(src, tmp_path / "src.safetensors")
    other = EncoderSpec("llama", "another-encoder", hidden_size=16, num_layers=4, layers=every_nth_layer(4))
    torch.manual_seed(1)
    model = build_model(tiny_config(other), str(tmp_path / "src.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.dit.state_dict().values(), src.dit.state_dict().values()))
    assert model.lap.hidden_size == 16  # the new encoder's width
    _trainer(tmp_path / "run", model, ["a red circle on the left"], steps=2).run()  # and it trains on
    # the same encoder keeps everything unless told otherwise
    same = build_model(tiny_config(), str(tmp_path / "src.safetensors"))
    assert torch.equal(same.lap.pool.weight, src.lap.pool.weight)
    fresh = build_model(tiny_config(), str(tmp_path / "src.safetensors"), reinit=("lap",))
    assert not torch.equal(fresh.lap.pool.weight, src.lap.pool.weight)
    with pytest.raises(ValueError, match="same DiT settings"):
        build_model(tiny_config(depth=3), str(tmp_path / "src.safetensors"))


def test_time_limit_saves_exports_and_resume_finishes_the_schedule(tmp_path):
    prompts = ["a red circle on the left"]
    torch.manual_seed(0)
    full = _trainer(tmp_path / "full", uf.UniFusionModel(tiny_config()), prompts, steps=3)
    torch.manual_seed(0)
    cut = _trainer(tmp_path / "cut", uf.UniFusionModel(tiny_config()), prompts, steps=3, time_limit=1e-9)
    a = full.run()
    b = cut.run()  # the limit is passed after the first step: state saved, EMA exported
    assert (a["step"], b["step"], b["steps"]) == (3, 1, 3)
    assert [s for s, _ in list_states(tmp_path / "cut")] == [1]
    assert (tmp_path / "cut" / "model.safetensors").is_file()
    torch.manual_seed(0)
    again = _trainer(tmp_path / "cut", uf.UniFusionModel(tiny_config()), prompts, steps=3)
    assert again.resume() and again.step == 1
    assert again.run()["step"] == 3
    ea = load_file(str(tmp_path / "full" / "model.safetensors"))
    eb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # the same run as without the stop
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(out=str(tmp_path), time_limit=-1)


def test_a_bf16_autocast_step_trains(tmp_path):
    """precision='bf16' (what GPUs run): null tokens and bf16 LAP outputs share one batch."""
    torch.manual_seed(0)
    t = _trainer(tmp_path, uf.UniFusionModel(tiny_config()), ["a red circle on the left", "a blue square on the right"],
                 steps=2, precision="bf16", cond_dropout=0.5)
    before = t.model.dit.final.linear.weight.detach().clone()
    out = [t.train_step() for _ in range(2)]
    assert all(math.isfinite(o["loss"]) for o in out)
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights
    assert not torch.equal(before, t.model.dit.final.linear.weight)


def test_bad_data_is_skipped_counted_and_named(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (24, 24), color).save(root / f"ok{i}.png")
        (root / f"ok{i}.txt").write_text(f"a {color} square in the center")
    Image.new("RGB", (24, 24), "red").save(root / "truncated.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "truncated.txt").write_text("a red square in the center")
    Image.new("RGB", (24, 24), "red").save(root / "nocaption.png")
    src = ImageFolder(root, resolution=16)
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config())
    prompts = [f"a {c} square in the center" for c in ("red", "blue", "green")]
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table(prompts))
    tc = TrainConfig(out=str(tmp_path / "run"), steps=6, prompts_per_step=4, timesteps_per_prompt=1, warmup=1,
                     max_bad_fraction=0.9)
    trainer = Trainer(tc, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, feats)
    with caplog.at_level("WARNING"):
        summary = trainer.run()
    assert summary["step"] == 6 and summary["bad_samples"] >= 2
    text = caplog.text
    assert "truncated.png" in text and "nocaption" in text
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_samples"] == summary["bad_samples"]
    # the same folder with a lower bound: the run stops with a ValueError (the CLI's exit status 1)
    # naming the flag; a bound of 1 or more, which would refill a batch of bad samples forever, is refused
    (tmp_path / "run2").mkdir()
    tc = dataclasses.replace(tc, out=str(tmp_path / "run2"), max_bad_fraction=0.1)
    with pytest.raises(ValueError, match=r"samples drawn were bad, more than --max-bad-fraction 0.1 \(the warnings"):
        Trainer(tc, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, feats).run()
    with pytest.raises(ValueError, match=r"max_bad_fraction must be in \[0, 1\), got 1"):
        dataclasses.replace(tc, max_bad_fraction=1.0)


def test_caption_dropout_uses_the_learned_null_token(tmp_path):
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config())
    from unifusion_core.train.loop import conditioning

    f = [uf.Features(torch.randn(3, len(ENC.layers), ENC.hidden_size), ENC.layers, ENC) for _ in range(3)]
    drop = torch.tensor([False, True, False])
    c = conditioning(model, f, drop, torch.device("cpu"))
    ref = model.encode([f[0], f[2]])
    torch.testing.assert_close(c.tokens[[0, 2]], ref.tokens)
    assert c.mask[1].tolist() == [True, False, False]
    torch.testing.assert_close(c.tokens[1, 0], model.dit.null_cond[0])
    # what the DiT sees for a dropped prompt is exactly the sampler's unconditional input
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    null = model.null_conditioning()
    torch.testing.assert_close(model(x, t, uf.Conditioning(c.tokens[1:2], c.mask[1:2])), model(x, t, null))


def test_a_tiny_model_learns_to_draw_scenes(tmp_path):
    """Overfit three scenes with fixed random 'features'; the exact detector scores what the EMA
    model draws. A model that did not learn scores 0 (noise has no objects)."""
    prompts = ["a red circle on the left", "a blue square on the right", "a yellow triangle at the top"]
    torch.manual_seed(0)
    model = uf.UniFusionModel(tiny_config(size=32, patch=4, hidden_size=96, depth=3, heads=4))
    trainer = _trainer(tmp_path, model, prompts, steps=600, jitter=False, lr=2e-3, ema_decay=0.98, cond_dropout=0.1)
    trainer.cfg.log_every = 100
    trainer.run()
    feats = dict(zip(prompts, trainer.features([Sample(p, "t2i", p, cond_id=p) for p in prompts])))
    wanted = [scenes.parse_prompt(p) for p in prompts]
    gen = model_generate_fn(trainer.ema_model(), feats, steps=16, cfg=1.5)
    scores = [score(s, detect(img)) for seed in (0, 1) for s, img in zip(wanted, gen(wanted, seed))]
    # colour, count and position of every image are right; shapes (the finest detail, patch 4 at
    # 32x32) for most of them (5 of 6 when this was written)
    assert all(s["color"] == 1 and s["count"] and s["position"] for s in scores), scores
    assert sum(s["all"] for s in scores) >= 4, scores


def save_tiny_vae(path: Path) -> Path:
    """A tiny random diffusers AutoencoderKL folder (2x downscale, 4 channels), seeded."""
    diffusers = pytest.importorskip("diffusers",
                                    reason="diffusers is not installed: pip install -r requirements-train.txt")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
    ).save_pretrained(path)
    return path


def test_training_in_a_vae_latent_space_with_the_latent_cache(tmp_path):
    from unifusion_core.train.vae import LatentCache, load_vae, to_latents

    save_tiny_vae(tmp_path / "vae")
    space = uf.LatentSpace("tiny-vae", channels=4, downscale=2)
    vae = load_vae(tmp_path / "vae", space)
    cache = LatentCache(tmp_path / "latents", vae.identity, space, 16)
    config = tiny_config(size=16).replace(latent=space)
    model = uf.UniFusionModel(config)
    trainer = _trainer(tmp_path / "run", model, ["a red circle on the left", "a blue square on the right"], steps=2)
    seen = {}

    def latents(samples, gens):
        seen.update((s.id, cache.key(s.id, s.target)) for s in samples)
        return to_latents(samples, space, vae, cache, gens)

    latents.close = cache.flush
    trainer.latents = latents
    trainer.run()
    # the run wrote its last, partial shard (it was left in memory, and lost with the process)
    cache = LatentCache(tmp_path / "latents", vae.identity, space, 16)
    assert seen and all(k in cache for k in seen.values())  # every latent cached under its sample's id and pixels
    first = next(iter(seen))
    x = trainer.sources["t2i"].get(int(first.rsplit("-", 1)[1]))  # ids: scene-<seed>-<index>
    assert x.id == first and cache.key(x.id, x.target) == seen[first]
    z = cache.get(seen[first])
    assert z.shape == (4, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(to_latents([x], space, None, cache)[0], z)  # served from the cache: no VAE needed
    assert uf.load_model(tmp_path / "run" / "model.safetensors").config.latent == space


def test_a_run_with_the_latent_cache_killed_and_resumed_is_bit_identical(tmp_path):
    """--latent-cache (the trainer's wiring, setup.make_latents) on 4 images drawn again every step.
    Before, a cached latent was the posterior draw of the step that first encoded it, and the cache's
    buffer was written only at the end of the run: killed after a state, the run lost it, and the
    resumed run encoded those images again at a later step with another draw."""
    from types import SimpleNamespace

    from unifusion_core.train.setup import make_latents
    from unifusion_core.train.vae import LatentCache

    space = uf.LatentSpace("tiny-vae", channels=4, downscale=2)
    vae = save_tiny_vae(tmp_path / "vae")
    prompts = ["a red circle on the left", "a blue square on the right"]

    class Killed(Exception):
        pass

    def kill_after_3(trainer):
        if trainer.step == 3:
            trainer.latents.close = lambda: None  # a killed process writes nothing more
            raise Killed

    def trainer(run: str, **kw) -> Trainer:
        torch.manual_seed(0)
        model = uf.UniFusionModel(tiny_config(size=16).replace(latent=space))
        src = SyntheticScenes(size=16, prompts=prompts, length=4)
        feats = PromptFeatures(model.config.encoder, model.config.encoder.layers,
                               table=feature_table(prompts, model.config.encoder))
        cfg = TrainConfig(out=str(tmp_path / run), steps=4, prompts_per_step=4, timesteps_per_prompt=2, warmup=1,
                          checkpoint_every=2, keep_checkpoints=10)
        args = SimpleNamespace(vae=str(vae), latent_cache=str(tmp_path / run / "latents"), buckets=None,
                               resolution=16)
        return Trainer(cfg, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, feats,
                       latents=make_latents(args, space, cfg.seed), **kw)

    trainer("a").run()
    killed = trainer("b", on_step_end=kill_after_3)
    with pytest.raises(Killed):
        killed.run()  # the newest state: step 2
    # the 4 images' latents (all encoded at step 0) were written with that state
    assert len(LatentCache(tmp_path / "b" / "latents", killed.latents.vae.identity, space, 16)) == 4
    resumed = trainer("b")
    assert resumed.resume() and resumed.step == 2
    resumed.run()
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_tensors(state_path(tmp_path / "a", 4)), read_tensors(state_path(tmp_path / "b", 4))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # optimizer moments, EMA


def test_a_frozen_adapter_can_be_unfrozen_on_resume(tmp_path):
    """--adapter-lr 0 for a while, then on: the state has no AdamW moments for LAP and the
    refiner; resuming starts them fresh instead of failing."""
    prompts = ["a red circle on the left"]
    torch.manual_seed(0)
    frozen = _trainer(tmp_path / "run", uf.UniFusionModel(tiny_config()), prompts, steps=2, adapter_lr=0.0)
    frozen.run()
    torch.manual_seed(0)
    thawed = _trainer(tmp_path / "run", uf.UniFusionModel(tiny_config()), prompts, steps=3)
    assert thawed.resume() and thawed.step == 2
    lap = next(thawed.model.lap.parameters())
    assert lap not in thawed.optimizer.state or not thawed.optimizer.state[lap]  # no moments saved for it
    before = lap.detach().clone()
    thawed.run()
    assert not torch.equal(before, lap.detach())  # and it trains now


def test_compiled_blocks_and_selective_checkpointing_train_as_the_plain_step(tmp_path):
    """--compile (every LAP, refiner and DiT block through torch.compile) with every other block
    checkpointed trains the same weights as the plain step (fp32, CPU)."""
    prompts = ["a red circle on the left", "a blue square on the right"]
    runs = []
    for i, cfg in enumerate(({}, {"compile": True, "gradient_checkpointing": True, "gradient_checkpointing_every": 2})):
        torch.manual_seed(0)
        model = uf.UniFusionModel(tiny_config(depth=3))
        trainer = _trainer(tmp_path / str(i), model, prompts, **cfg)
        runs.append(([trainer.train_step()["loss"] for _ in range(2)], copy.deepcopy(model.state_dict())))
    blocks = [b for part in (model.lap, model.refiner, model.dit) for b in part.blocks]
    assert all(b._compiled_call_impl is not None for b in blocks) and model.dit.gradient_checkpointing == 2
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [{}, {"lora_rank": 8}, {"lora_rank": 8, "lora_targets": "dit,lap,refiner"},
                                  {"lora_rank": 8, "lora_targets": "modulation"},
                                  {"lora_rank": 8, "lora_targets": "dit,refiner"}],
                         ids=["full", "lora-dit", "lora-all", "lora-modulation", "lora-dit-refiner"])
def test_train_flops_match_a_flop_counter(tmp_path, lora):
    """The FLOPs behind tokens/s and MFU: the trainer's count of one step equals what torch's
    FLOP counter sees in the step's matmuls and attention (forward and backward); with LoRA, the
    frozen base's weight gradients are not computed, nor frozen LAP and refiner's backward."""
    from bench.common import flop_counter

    torch.manual_seed(0)
    wide = EncoderSpec("tiny", "wide", hidden_size=96, num_layers=6, layers=every_nth_layer(6))
    model = uf.UniFusionModel(tiny_config(wide, size=32, patch=2, hidden_size=192, depth=2, heads=4))
    trainer = _trainer(tmp_path, model, ["a red circle on the left", "a blue square above a red circle"],
                       cond_dropout=0.0, **lora)
    counter = flop_counter()
    with counter:
        out = trainer.train_step()
    counted = counter.get_total_flops()
    # PaLM's convention (2 FLOPs per weight and token, attention's backward twice its forward) against
    # the kernels that ran: within 2.3 % (full) and 3.3 % (LoRA) here; counting LoRA runs as full
    # training (what MFU did before) was 25-31 % over
    assert trainer.flops_per_sample * out["samples"] == pytest.approx(counted, rel=0.04)


def test_layers_flag_goes_through_the_one_layer_check():
    from unifusion_core.train.setup import layers_flag

    assert layers_flag("last", 30) == (30,)
    assert layers_flag("3", 30) == every_nth_layer(30)
    assert layers_flag("18,0,9,9", 30) == (0, 9, 18)
    with pytest.raises(ValueError, match=r"--layers.*0\.\.30"):
        layers_flag("0,31", 30)
