"""The trainer's config files: TOML with sections (read with the standard library's tomllib), or a
flat JSON file whose keys are the flag names; flags given on the command line win.

Every key of a TOML file is one flag of `python -m unifusion_core.train` (underscores or dashes),
either at the top level or in the section that groups it (SECTIONS); an unknown key or section,
a key in another section than its own, a key given twice or a value of the wrong type is an error
that names it. `to_toml` writes a run's resolved settings back in the same layout (RUN/config.toml),
which `--config` reads again to reproduce the run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from pathlib import Path

# Given on the command line only: they say what to do with a run, not what the run is.
COMMAND_LINE_ONLY = ("config", "resume", "new_data", "export_only")

# The sections and the flags (argparse dests) each groups; "" is the top level. Why these groups:
# the order in which a reader sets up a run (what data, which frozen encoders, which model, how
# it trains, on what hardware, what it writes), as ai-toolkit's and SimpleTuner's configs do.
SECTIONS: dict[str, tuple[str, ...]] = {
    "": ("out",),
    "data": ("data", "resolution", "scene_kinds", "scene_tasks", "scene_references", "mix", "max_bad_fraction"),
    "encoder": ("vlm", "rewrite", "layers", "features", "feature_cache", "feature_memory"),
    "vae": ("latent", "vae", "latent_cache"),
    "model": ("preset", "dit_width", "dit_depth", "dit_heads", "patch", "mlp_ratio", "lap_heads", "lap_depth",
              "refiner_heads", "refiner_depth", "shift", "init_from", "reinit"),
    "train": ("steps", "prompts_per_step", "timesteps_per_prompt", "grad_accumulation", "seed", "cond_dropout",
              "t_mean", "t_std", "ema_decay", "nonfinite", "max_nonfinite", "time_limit"),
    "optim": ("lr", "min_lr_ratio", "warmup", "weight_decay", "adapter_lr_scaling", "adapter_lr", "grad_clip"),
    "hardware": ("device", "precision", "compile", "gradient_checkpointing", "gradient_checkpointing_every",
                 "hsdp_replicas", "threads"),
    "checkpoints": ("checkpoint_every", "keep_checkpoints"),
    "validation": ("validate_every", "val_prompts"),
    "samples": ("sample_prompts", "sample_every", "sample_steps", "sample_cfg"),
    "logging": ("log_every", "tensorboard"),
    "lora": (),
}
# Flags not listed above go by their prefix (new flags land somewhere sensible), else to [train].
PREFIXES = (("val_", "validation"), ("sample_", "samples"), ("lora", "lora"), ("bucket", "data"),
            ("scene_", "data"))
# Comma-list flags that a TOML file may also give as an array (["single", "pair"]).
LISTS = ("scene_kinds", "scene_tasks", "reinit", "layers", "buckets", "lora_targets")


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("TOML config files need Python 3.11+ (tomllib) or `pip install tomli`; "
                             "a flat JSON --config works on any Python") from None
    return tomllib


def flags(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's settings a config file may give: dest -> its action."""
    return {a.dest: a for a in ap._actions if a.option_strings and a.dest != "help" and a.dest not in COMMAND_LINE_ONLY}


def section_of(ap: argparse.ArgumentParser) -> dict[str, str]:
    """Every setting's section: dest -> section name ("" = the top level)."""
    listed = {d: s for s, dests in SECTIONS.items() for d in dests}
    out = {}
    for dest in flags(ap):
        out[dest] = listed[dest] if dest in listed else next((s for p, s in PREFIXES if dest.startswith(p)), "train")
    return out


def kind(action: argparse.Action) -> str:
    """What a flag takes: bool, int, float, path or str."""
    if action.nargs == 0:  # store_true, BooleanOptionalAction
        return "bool"
    return {int: "int", float: "float", Path: "path"}.get(action.type, "str")


def _convert(dest: str, value, want: str, where: str):
    """A TOML value for a flag, or ValueError naming the key, what it got and what it takes."""
    bad = ValueError(f"{where}: {dest} = {value!r} ({type(value).__name__}): expected {_expected(dest, want)}")
    if want == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):  # a bool is an int to Python, never to a config file
        raise bad
    if want == "int":
        if not isinstance(value, int):
            raise bad
        return value
    if want == "float":
        if not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if dest == "mix" and isinstance(value, dict):  # mix = {t2i = 0.85, edit = 0.10}
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in value.items()):
            raise bad
        return ",".join(f"{k}={v}" for k, v in value.items())
    if dest in LISTS and isinstance(value, list):
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise bad
        return ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise bad
    return Path(value) if want == "path" else value


def _expected(dest: str, want: str) -> str:
    if want == "bool":
        return "true or false"
    if want in ("int", "float"):
        return {"int": "an integer", "float": "a number"}[want]
    extra = " or a table {t2i = 0.85, edit = 0.10}" if dest == "mix" else " or an array" if dest in LISTS else ""
    return f"a string{extra}"


def read_toml(path: Path, ap: argparse.ArgumentParser) -> dict:
    """The settings of a TOML config file (dest -> value, typed as argparse would give them)."""
    try:
        doc = _tomllib().loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM, as Notepad writes, is no key
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from None
    except Exception as e:  # tomllib.TOMLDecodeError: the line and column
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    acts, home = flags(ap), section_of(ap)
    sections = sorted({s for s in home.values() if s})
    out: dict = {}

    def take(key: str, value, section: str) -> None:
        dest = key.replace("-", "_")
        where = f"--config {path}" + (f" [{section}]" if section else "")
        if dest not in acts:
            if dest in COMMAND_LINE_ONLY:
                raise ValueError(f"{where}: {key} is given on the command line only (--{dest.replace('_', '-')})")
            keys = [d for d, s in home.items() if s == section] if section else sections
            close = difflib.get_close_matches(dest, list(acts), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            what = f"[{section}] takes {keys}" if section else f"the sections are {sections} (or any flag name)"
            raise ValueError(f"{where}: unknown setting {key!r}{hint}; {what}")
        if section and home[dest] != section:
            raise ValueError(f"{where}: {key} belongs in [{home[dest]}]" if home[dest] else
                             f"{where}: {key} belongs at the top level, before any section")
        if dest in out:
            raise ValueError(f"{where}: {key} is given twice in the file")
        out[dest] = _convert(dest, value, kind(acts[dest]), where)

    for key, value in doc.items():
        if isinstance(value, dict) and key in sections:  # [data] the section; data = "..." the flag
            for k, v in value.items():
                take(k, v, key)
        elif isinstance(value, dict) and key.replace("-", "_") not in acts:
            raise ValueError(f"--config {path}: unknown section [{key}]; the sections are {sections}")
        else:  # a flat key (mix = {t2i = 0.85} is one too)
            take(key, value, "")
    return out


def read_json(path: Path, known: set[str]) -> dict:
    """A flat JSON config (keys = flag names with underscores), as the trainer always read it
    (a run's run.json is one). The command-line-only settings a run.json records (a resumed run's
    "resume": "auto") are what that invocation did, not settings: left out, or a new run started
    from a resumed run's file would try to resume."""
    try:
        file = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {path}: cannot read it as JSON ({e})") from None
    if not isinstance(file, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(file).__name__}")
    unknown = sorted(set(file) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}")
    return {k: v for k, v in file.items() if k not in COMMAND_LINE_ONLY}


def read_config(path: Path, ap: argparse.ArgumentParser, known: set[str]) -> dict:
    """A .toml file with sections, else a flat JSON file; known: every setting JSON may name."""
    return read_toml(path, ap) if Path(path).suffix.lower() == ".toml" else read_json(path, known)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    # a TOML basic string: JSON's escapes (\" \\ \n \t \uXXXX) are TOML's too
    return json.dumps(str(v), ensure_ascii=False)


def to_toml(settings: dict, ap: argparse.ArgumentParser, header: str = "") -> str:
    """A run's resolved settings as a sectioned TOML file that read_toml reads back to the same
    values; None (a setting left unset) and the command-line-only flags are left out."""
    home = section_of(ap)
    lines = [f"# {h}" for h in header.splitlines()]
    groups: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for dest, v in settings.items():
        if dest in home and v is not None:
            groups.setdefault(home[dest], []).append(f"{dest} = {_value(v)}")
    for section, entries in groups.items():
        if not entries:
            continue
        if section:
            lines += ["", f"[{section}]"]
        lines += entries
    return "\n".join(lines).lstrip("\n") + "\n"
