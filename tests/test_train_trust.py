"""Nothing lost, nothing silent (issue 20): a non-finite step changes nothing and is counted, a run
that diverges stops with its good states kept and no export, states carry checksums and a damaged
or non-finite one is refused with the one before it named, and the CLI's exit status says which."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import _trainer, feature_table, run_cli, tiny_config, write_features

import unifusion_core as uf
from unifusion_core import scenes
from unifusion_core.train import state as st
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.state import NonFiniteError, StateError, list_states, read_meta, read_tensors, state_path

PROMPTS = ["a red circle on the left", "a blue square on the right"]


@pytest.fixture(scope="module")
def scene_features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feat") / "features.safetensors",
                          feature_table([s.prompt for s in scenes.all_scenes()]))


class Poisoned:
    """The trainer's latents function, with NaN latents at the given calls (1-based): a bad batch
    in the middle of a healthy run (the features refuse NaN themselves)."""

    def __init__(self, latents, bad_calls: set[int]):
        self.latents, self.bad_calls, self.calls = latents, bad_calls, 0

    def __call__(self, samples, generators):
        out = self.latents(samples, generators)
        self.calls += 1
        return torch.full_like(out, float("nan")) if self.calls in self.bad_calls else out


def snapshot(t) -> dict[str, torch.Tensor]:
    sd = {f"model.{k}": v.detach().clone() for k, v in t.model.state_dict().items()}
    sd |= {f"ema.{k}": v.clone() for k, v in t.ema.items()}
    for i, s in enumerate(t.optimizer.state.values()):
        sd |= {f"optim.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)}
    return sd


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_step_changes_nothing_and_is_counted(tmp_path):
    torch.manual_seed(0)
    t = _trainer(tmp_path / "skip", uf.UniFusionModel(tiny_config()), PROMPTS, steps=4, log_every=1)
    t.latents = Poisoned(t.latents, {2})
    t.train_step()
    before = snapshot(t)
    out = t.train_step()  # NaN latents: NaN loss and gradients
    assert not out["finite"] and t.step == 2
    after = snapshot(t)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in t.model.parameters())
    # the run goes on past it, counts it, and exports finite weights
    torch.manual_seed(0)
    t = _trainer(tmp_path / "run", uf.UniFusionModel(tiny_config()), PROMPTS, steps=4, log_every=1)
    t.latents = Poisoned(t.latents, {2})
    summary = t.run()
    assert summary["step"] == 4 and summary["nonfinite_steps"] == 1
    rows = metrics(tmp_path / "run")
    assert {"step": 2, "nonfinite_steps": 1, "nonfinite": "skipped"} in rows
    logged = [r for r in rows if "loss" in r]
    assert [r["loss"] is None for r in logged] == [False, True, False, False]  # never a NaN in the log
    assert logged[-1]["nonfinite_steps"] == 1
    assert read_meta(list_states(tmp_path / "run")[-1][1])["meta"]["nonfinite"] == 1  # resumed with the count
    exported = uf.load_model(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.state_dict().values())


@pytest.mark.parametrize("policy", ["stop", "too many skips"])
def test_a_run_that_must_stop_names_the_step_and_writes_nothing_after_it(tmp_path, policy):
    cfg = {"nonfinite": "stop"} if policy == "stop" else {"max_nonfinite": 1}
    torch.manual_seed(0)
    t = _trainer(tmp_path, uf.UniFusionModel(tiny_config()), PROMPTS, steps=6, checkpoint_every=1, **cfg)
    t.latents = Poisoned(t.latents, {3, 4})
    step = 3 if policy == "stop" else 4
    why = r"--nonfinite stop" if policy == "stop" else r"2 skipped steps, more than --max-nonfinite 1"
    with pytest.raises(NonFiniteError, match=rf"^step {step}: the loss is nan .*stopped \({why}\).* the newest state "
                                             rf"is .*step-0000000{step - 1}"):
        t.run()
    assert [s for s, _ in list_states(tmp_path)] == [step - 2, step - 1]  # the good ones, none after
    assert not (tmp_path / "model.safetensors").exists()
    assert metrics(tmp_path)[-1] == {"step": step, "nonfinite_steps": step - 2, "nonfinite": "stopped"}
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'stop', got 'ignore'"):
        dataclasses.replace(t.cfg, nonfinite="ignore")


def test_neither_a_state_nor_the_export_is_written_non_finite(tmp_path):
    torch.manual_seed(0)
    t = _trainer(tmp_path, uf.UniFusionModel(tiny_config()), PROMPTS, steps=2, checkpoint_every=1)
    t.run()
    good = read_tensors(state_path(tmp_path, 2))
    exported = (tmp_path / "model.safetensors").read_bytes()
    next(iter(t.ema.values()))[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"state at step 2 holds NaN or inf in 1 tensors \(ema\..*not written"):
        t.save()  # over the good state of the same step: refused before anything is touched
    after = read_tensors(state_path(tmp_path, 2))  # checksums still verify
    assert [s for s, _ in list_states(tmp_path)] == [1, 2] and all(torch.equal(good[k], after[k]) for k in good)
    with pytest.raises(NonFiniteError, match=r"EMA weights at step 2 hold NaN or inf .*model.safetensors was not"):
        t.export(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == exported


def damage(state: Path) -> None:
    """Bit rot in the middle of a state's shard."""
    shard = sorted(state.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_damaged_or_non_finite_state_is_refused_naming_the_one_before(tmp_path, scene_features, monkeypatch):
    run = tmp_path / "r"
    steps = ["--steps", "4", "--checkpoint-every", "2", "--val-prompts", "0"]
    run_cli(run, scene_features, *steps)
    assert set(read_meta(state_path(run, 4))["sha256"]) == {p.name for p in state_path(run, 4).glob("*.safetensors")}
    damage(state_path(run, 4))
    settings = (run / "run.json").read_text()
    refused = run_cli(run, scene_features, *steps, "--resume", "--steps", "6", check=False)
    assert refused.returncode == 4, refused.stderr[-2000:]
    assert (f"{state_path(run, 4)}: ['shard-00001-model-00001-of-00001.safetensors'] do not match the sha256 "
            "recorded when the state was written (the files were damaged or modified since); refusing to resume "
            f"from it (resume from the state before it: --resume {state_path(run, 2)})") in refused.stderr
    assert (run / "run.json").read_text() == settings and [s for s, _ in list_states(run)] == [2, 4]
    with pytest.raises(StateError, match="do not match the sha256"):
        read_tensors(state_path(run, 4))
    resumed = run_cli(run, scene_features, *steps, "--resume", str(state_path(run, 2)), "--steps", "6", check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [s for s, _ in list_states(run)] == [4, 6]  # the damaged step 4 written again
    # a state holding NaN (as the trainer wrote them before it checked) is refused too, checksums or not
    monkeypatch.setattr(st, "_all_nonfinite", lambda state, d: [])
    torch.manual_seed(0)
    t = _trainer(tmp_path / "nan", uf.UniFusionModel(tiny_config()), PROMPTS, steps=2, checkpoint_every=1)
    t.run()
    next(iter(t.ema.values()))[0] = float("nan")
    t.step = 3
    t.save()
    monkeypatch.undo()
    again = _trainer(tmp_path / "nan", uf.UniFusionModel(tiny_config()), PROMPTS, steps=4)
    with pytest.raises(StateError, match=r"step-00000003: it holds NaN or inf in 1 tensors \(ema\..*--resume "
                                         r".*step-00000002\)"):
        again.resume()


def test_resume_errors_say_what_the_cli_user_can_do(tmp_path, scene_features):
    from unifusion_core.train.__main__ import main, parser

    assert "3  stopped on a non-finite loss" in parser().format_help()
    base = ["--out", str(tmp_path / "r"), "--features", str(scene_features), "--resolution", "16", "--dit-width", "64",
            "--dit-depth", "2", "--dit-heads", "4", "--patch", "2", "--val-prompts", "0"]
    with pytest.raises(SystemExit) as e:  # nothing to resume: refused, not a silent start at step 0
        main([*base, "--resume"])
    assert e.value.code == (f"no training state in {tmp_path / 'r' / 'checkpoints'} to resume: check --out, or "
                            "leave out --resume to start a new run")
    with pytest.raises(SystemExit) as e:
        main([*base, "--resume", str(tmp_path / "elsewhere")])
    assert e.value.code == f"--resume {tmp_path / 'elsewhere'}: no training state there; the states of " \
                           f"{tmp_path / 'r'} are none"
    with pytest.raises(SystemExit, match="--new-data goes on from a saved state"):
        main([*base, "--new-data"])
    # a changed mixture: the CLI's way out, not a Python argument
    torch.manual_seed(0)
    _trainer(tmp_path / "m", uf.UniFusionModel(tiny_config()), PROMPTS, steps=1).run()
    t = _trainer(tmp_path / "m", uf.UniFusionModel(tiny_config()), PROMPTS, steps=2)
    t.mixture = TaskMixture(t.sources, {"t2i": 1.0}, seed=5)  # another --seed
    advice = r"seed 0 -> 5\): resume with the --data, --mix and --seed it was saved with .*add --new-data"
    with pytest.raises(ValueError, match=advice) as err:
        t.resume()
    assert "pass strict=False" not in str(err.value)
    assert t.resume(new_data=True) and t.step == 1


def test_a_resume_from_another_folder_of_the_same_size_is_refused(tmp_path):
    """Another --data of the same size (the same file names, other pictures and captions) was
    resumed silently: only a changed size was seen. The state records where each task's data comes
    from; a state from before it recorded that has nothing to compare."""
    from PIL import Image

    from unifusion_core.train.sources import ImageFolder, Subset

    for name, color in (("A", "red"), ("B", "blue")):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (16, 16), color).save(tmp_path / name / f"{i:04d}.png")
            (tmp_path / name / f"{i:04d}.txt").write_text(f"a {color} square")
    a, b = (ImageFolder(tmp_path / n, 16) for n in "AB")
    state = json.loads(json.dumps(TaskMixture({"t2i": a}, {"t2i": 1.0}, seed=0).state_dict()))
    other = TaskMixture({"t2i": Subset(b, [0, 1, 2, 3])}, {"t2i": 1.0}, seed=0)  # through a wrapper too
    assert other.differences(state) == [f"t2i data {(tmp_path / 'A').resolve()} -> {(tmp_path / 'B').resolve()} "
                                        "(the same data moved: --new-data continues exactly)"]
    with pytest.raises(ValueError, match="another mixture \\(t2i data .*A -> .*B \\(the same data moved"):
        other.load_state_dict(state)
    assert TaskMixture({"t2i": ImageFolder(tmp_path / "A", 16)}, {"t2i": 1.0}, seed=0).differences(state) == []
    del state["origins"]  # saved before origins were recorded
    assert other.differences(state) == []
    # ... unless --val-split sets data aside now: such a state's run held out by position
    from argparse import Namespace

    from unifusion_core.train.setup import make_data

    args = Namespace(data=str(tmp_path / "A"), resolution=16, mix="t2i=1.0", val_split=0.5)
    split, _ = make_data(args, seed=0)
    assert "less --val-split 0.5 (held out by sample id)" in split.state_dict()["origins"]["t2i"]
    diffs = split.differences(state)
    assert any(d.startswith("t2i: --val-split now holds out by sample id, this state's run held out by position")
               for d in diffs), diffs


def test_a_state_saved_between_log_steps_counts_its_training_time(tmp_path):
    """train_seconds in a state includes the steps since the last log (it was updated at log steps
    only: a state saved at step 2 of a run logging at its end said 0 s)."""
    torch.manual_seed(0)
    _trainer(tmp_path, uf.UniFusionModel(tiny_config()), PROMPTS, steps=3, log_every=0, checkpoint_every=2).run()
    assert read_meta(state_path(tmp_path, 2))["meta"]["describe"]["train_seconds"] > 0

