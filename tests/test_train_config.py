"""The trainer's config files: sectioned TOML (and the flat JSON it always read), the example
configs in configs/ (each resolves; the embedded model's recipe and the 8-GPU run equal their
documented command lines), errors that name the key, and RUN/config.toml read back to the same run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from unifusion_core.config import EncoderSpec
from unifusion_core.train.__main__ import model_config, parse, parser, resolved
from unifusion_core.train.config_file import COMMAND_LINE_ONLY, SECTIONS, flags, read_toml, section_of, to_toml
from unifusion_core.train.loop import TrainConfig
from unifusion_core.train.samples import read_sample_prompts
from unifusion_core.train.setup import layers_flag

pytest.importorskip("tomllib", reason="TOML config files need Python 3.11+ (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def documented(page: str, marker: str) -> list[str]:
    """The argv of the first `python -m unifusion_core.train` command (after `marker`) in a docs page."""
    text = (ROOT / page).read_text()
    start = text.index(marker)
    lines, cmd = text[start:].splitlines(), []
    for line in lines:
        if cmd or "-m unifusion_core.train" in line:
            cmd.append(line.split(" #")[0].rstrip().removesuffix("\\"))
            if not line.rstrip().endswith("\\"):
                break
    words = shlex.split(" ".join(cmd))
    return words[words.index("unifusion_core.train") + 1:]


def settings(args) -> dict:
    """What a run is: its resolved settings, less how it was given (--config)."""
    return {k: v for k, v in resolved(args).items() if k != "config"}


def test_every_flag_has_exactly_one_section():
    home = section_of(parser())
    assert set(home) == set(flags(parser())) and not set(home) & set(COMMAND_LINE_ONLY)
    listed = [d for dests in SECTIONS.values() for d in dests]
    assert len(listed) == len(set(listed)), "a flag listed in two sections"
    assert set(listed) <= set(home), f"SECTIONS names flags the trainer lacks: {set(listed) - set(home)}"
    assert home["out"] == "" and home["lr"] == "optim" and home["sample_prompts"] == "samples"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_each_example_config_parses_and_resolves(path):
    args = parse(["--config", str(path)])
    cfg = TrainConfig(out=args.out, **{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__
                                       if k not in ("out", "betas") and getattr(args, k) is not None})
    spec = EncoderSpec("llama", "any", 576, 30, layers_flag(args.layers, 30))
    config = model_config(args, spec)  # the DiT, LAP and refiner settings make a valid model
    assert config.sampling.size == (args.resolution, args.resolution) and cfg.steps == resolved(args)["steps"]
    if args.sample_prompts:  # a committed prompts file
        assert read_sample_prompts(ROOT / args.sample_prompts)
    # each holds what its name says
    name = path.stem
    if name == "embedded-model":
        assert args.features and args.data == "scenes"
    elif name == "handoff":
        assert args.init_from and "lap" in args.reinit
    elif name == "folder-finetune":
        assert args.data != "scenes" and args.init_from and args.sample_prompts and args.tensorboard
    elif name == "8gpu":
        assert args.device == "cuda" and args.prompts_per_step % 8 == 0
    assert {"embedded-model", "handoff", "folder-finetune", "8gpu"} <= {p.stem for p in CONFIGS}


def test_the_embedded_recipe_is_the_documented_command():
    """configs/embedded-model.toml resolves to exactly what docs/embedded-model.md's command does
    (and training.md's and README's copies of it)."""
    argv = documented("docs/embedded-model.md", "## How it was made")
    assert "--steps" in argv and "1879" in argv  # the parsing of the docs found the command
    toml = parse(["--config", str(ROOT / "configs" / "embedded-model.toml")])
    assert settings(toml) == settings(parse(argv))
    assert documented("docs/training.md", "## A complete example") == argv
    assert documented("README.md", "# 2. train") == argv


def test_the_8gpu_config_is_the_documented_torchrun_command():
    argv = documented("docs/training.md", "# 8 GPUs on one node")
    assert settings(parse(["--config", str(ROOT / "configs" / "8gpu.toml")])) == settings(parse(argv))


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    path = ROOT / "configs" / "embedded-model.toml"
    args = parse(["--config", str(path), "--lr=1e-4", "--steps", "7", "--no-rewrite", "--out", str(tmp_path)])
    assert (args.lr, args.steps, args.out, args.seed) == (1e-4, 7, str(tmp_path), 4)


def test_the_resolved_config_trains_the_same_run(tmp_path):
    """RUN/config.toml (to_toml of the resolved settings) read back with --config gives every
    setting again: strings with quotes and non-ASCII, paths, booleans, small floats, lists."""
    argv = ["--out", str(tmp_path / "r"), "--data", str(tmp_path / 'my "photos" — ü'), "--features",
            str(tmp_path / "f.safetensors"), "--lr", "1e-05", "--gradient-checkpointing", "--no-compile",
            "--mix", "t2i=0.9,edit=0.1", "--reinit", "lap,refiner", "--init-from", "a.safetensors",
            "--sample-every", "5", "--tensorboard", "--time-limit", "0.5", "--dit-width", "128"]
    args = parse(argv)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(resolved(args), parser()))
    again = parse(["--config", str(path)])
    assert settings(again) == settings(args)
    assert again.lr == 1e-05 and again.compile is False and again.gradient_checkpointing is True
    assert isinstance(again.features, Path)
    # sectioned: every key in its own section, the output directory at the top
    text = path.read_text()
    assert text.index("out = ") < text.index("[data]") < text.index('data = "') < text.index("[model]")
    assert re.search(r"\[optim\][^\[]*\nlr = 1e-05\n", text)
    # the flat JSON config (a run's run.json) still works
    (tmp_path / "run.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()}))
    assert settings(parse(["--config", str(tmp_path / "run.json")])) == \
        {k: str(v) if isinstance(v, Path) else v for k, v in settings(args).items()}
    # a resumed run's run.json, with a BOM (Notepad), starts a new run elsewhere: "resume" is what
    # that invocation did, not a setting
    resumed = {**json.loads((tmp_path / "run.json").read_text()), "resume": "auto", "new_data": True}
    (tmp_path / "run.json").write_text("\ufeff" + json.dumps(resumed), encoding="utf-8")
    fresh = parse(["--config", str(tmp_path / "run.json"), "--out", str(tmp_path / "new")])
    assert (fresh.resume, fresh.new_data, fresh.out, fresh.lr) == (None, False, str(tmp_path / "new"), 1e-05)
    path.write_text("\ufeff" + path.read_text(), encoding="utf-8")  # a TOML file with a BOM reads as without
    assert settings(parse(["--config", str(path)])) == settings(args)


def test_flat_keys_dashes_arrays_and_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('out = "x"\nlr = 2\nprompts-per-step = 8\nmix = {t2i = 0.9, edit = 0.1}\n'
                    '[data]\nscene-kinds = ["single", "pair"]\n[encoder]\nlayers = [0, 9, 18]\n')
    args = parse(["--config", str(path)])
    assert (args.lr, args.prompts_per_step, args.mix) == (2.0, 8, "t2i=0.9,edit=0.1")
    assert isinstance(args.lr, float) and args.scene_kinds == "single,pair" and args.layers == "0,9,18"


@pytest.mark.parametrize("text, message", [
    ('[optim]\nlrr = 1\n', r"\[optim\]: unknown setting 'lrr' \(did you mean lr\?\); \[optim\] takes \['lr', "),
    ('[optimizer]\nlr = 1\n', r"unknown section \[optimizer\]; the sections are \['checkpoints', 'data', "),
    ('lrr = 1\n', r"unknown setting 'lrr' \(did you mean lr\?\); the sections are"),
    ('[model]\nlr = 1\n', r"\[model\]: lr belongs in \[optim\]"),
    ('[data]\nout = "x"\n', r"out belongs at the top level"),
    ('[train]\nsteps = "100"\n', r"\[train\]: steps = '100' \(str\): expected an integer"),
    ('[train]\nsteps = true\n', r"steps = True \(bool\): expected an integer"),
    ('[hardware]\ncompile = 1\n', r"compile = 1 \(int\): expected true or false"),
    ('[optim]\nlr = "fast"\n', r"lr = 'fast' \(str\): expected a number"),
    ('[data]\nresolution = 1.5\n', r"resolution = 1.5 \(float\): expected an integer"),
    ('[encoder]\nfeatures = 3\n', r"features = 3 \(int\): expected a string"),
    ('[data]\nmix = ["t2i"]\n', r"expected a string or a table \{t2i = 0.85, edit = 0.10\}"),
    ('resume = "auto"\n', r"resume is given on the command line only \(--resume\)"),
    ('lr = 1\n[optim]\nlr = 2\n', r"lr is given twice"),
    ('[optim\nlr = 1\n', r"not valid TOML"),
])
def test_a_bad_config_is_an_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_toml(path, parser())
    with pytest.raises(SystemExit, match=re.escape(f"--config {path}")):  # the CLI: its message, status 1
        parse(["--config", str(path), "--out", str(tmp_path)])


def test_the_config_files_in_the_docs_are_valid(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), re.S)
    assert blocks
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(block)
        assert read_toml(tmp_path / f"{i}.toml", parser())["out"]


def _documented_train_commands():
    """Every `python -m unifusion_core.train ...` command in README and docs/, continuation lines joined."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"\\\n\s*", " ", page.read_text())
        for m in re.finditer(r"python -m unifusion_core\.train (?!\.)([^\n`]*)", text):
            words = shlex.split(m.group(1).split("#")[0].split("|")[0])
            if words:
                yield page.name, words


def test_every_documented_training_command_parses():
    """The commands the manual shows use flags the trainer has (a renamed flag breaks this, not a user)."""
    from unifusion_core.train.__main__ import parser

    seen = 0
    for page, words in _documented_train_commands():
        try:
            parser().parse_args(words)
        except SystemExit as e:
            raise AssertionError(f"{page}: python -m unifusion_core.train {' '.join(words)} does not parse") from e
        seen += 1
    assert seen >= 8
