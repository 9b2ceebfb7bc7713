"""Train a UniFusion model: python -m unifusion_core.train --out RUN_DIR [--data scenes|PATH] [...]

Every flag can also come from a config file: TOML with sections (--config configs/NAME.toml,
config_file.py) or flat JSON (keys = flag names with underscores); flags given on the command line
win. The run directory gets the training states (checkpoints/), metrics.jsonl, validation grids,
samples/ (--sample-prompts: a grid per step), tensorboard/ (--tensorboard), run.json and
config.toml (the resolved settings; --config RUN/config.toml trains the run again) and, at the
end, model.safetensors (EMA weights, loadable by the nodes). Re-running the same command with
--resume continues where the newest state left off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from ..config import UniFusionConfig
from ..latents import get_latent_space
from ..lora import base_config
from ..presets import get_preset
from .board import Board, summary_writer
from .config_file import read_config, to_toml
from .loop import SignalStop, TrainConfig, Trainer, build_model
from .samples import make_samples
from .setup import ConfigError, make_data, make_features, make_latents, make_validation
from .state import NonFiniteError, StateError, list_states
from .tasks import PAPER_RATIOS

log = logging.getLogger("unifusion_core.train")

# Exit statuses besides 0, 1 (an error message) and argparse's 2; listed in EPILOG.
EXIT_NONFINITE, EXIT_STATE, EXIT_SIGNAL = 3, 4, 5

EPILOG = """exit status:
  0  trained to --steps, or stopped at --time-limit with the state saved (--resume continues)
  1  bad settings or data, or --resume with no state to continue (the message says what to change)
  2  a command-line usage error (argparse's own status)
  3  stopped on a non-finite loss or gradient norm (--nonfinite stop, or more than --max-nonfinite
     skipped steps): nothing was written after the last good step; the message names the step
  4  a training state refused: damaged or modified since it was written (its checksums), incomplete,
     or holding NaN/inf; the message names it and the state before it (--resume PATH)
  5  stopped by SIGTERM or SIGUSR1 (a scheduler's preemption, Slurm's --signal=USR1@SECONDS) at the
     end of the step it came in, with the state saved and nothing else: --resume continues exactly
under torchrun: torchrun's own status is 1 when a rank fails; its report gives each rank's status"""


RESOLVED = ("The resolved settings of this run (every flag, defaults included), written by the trainer.\n"
            "Train it again: python -m unifusion_core.train --config config.toml --out OTHER_DIR")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m unifusion_core.train", description=__doc__.splitlines()[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--config", type=Path, help="a TOML file with sections (examples in configs/) or a flat JSON file (keys = "
      "these flags with underscores); flags given here win")
    a("--out", help="run directory (states, metrics, grids, the exported model)")
    # data
    a("--data", default="scenes", help="'scenes' (the synthetic benchmark scenes), an image folder with .txt "
      "captions, a .jsonl/.parquet manifest, or a tar-shard glob")
    a("--resolution", type=int, default=64, help="training image size (square; without --buckets)")
    a("--buckets", help="aspect-ratio buckets for real data: tiers as square sides, e.g. 512,1024 (each bucket about "
      "side^2 pixels, ratios 1:4 to 4:1, each step's batch from one bucket; docs/training.md)")
    a("--scene-kinds", default="single,pair", help="--data scenes: which prompt kinds to train on")
    a("--scene-tasks", default="t2i", help="--data scenes: which tasks (t2i, reconstruction, edit: "
      "scene_edits.py's edits), in the --mix ratios; the VLM must read images (--vlm a scene VLM file)")
    a("--scene-references", type=float, default=0.0, help="--data scenes with edit: the share of edit samples "
      "that compose two reference images (0: single-reference edits only, the paper's Sec. 5.4 setting)")
    a("--mix", default=",".join(f"{t}={r:.2f}" for t, r in PAPER_RATIOS.items()),
      help="task ratios (paper Sec. 2.2); tasks without data are dropped")
    # encoder
    a("--vlm", help="the frozen VLM: a Hugging Face folder or .gguf (default: the embedded SmolLM2-135M-Instruct GGUF)")
    a("--rewrite", action=argparse.BooleanOptionalAction, default=False,
      help="VERIFI: train on features of the VLM's rewrite (produced once, offline)")
    a("--layers", default="3", help="VLM layers for LAP: a stride (3 = every third, Sec. 3.1), 'last', or a comma list")
    a("--features", type=Path, help="precomputed features file (safetensors: '0','1',... with metadata 'prompts')")
    a("--feature-cache", type=Path,
      help="opt-in on-disk feature cache directory (fp16 safetensors shards, keyed by id)")
    a("--feature-memory", type=float, default=2.0,
      help="GiB of caption features kept in memory per process for reuse (least recently drawn out first: "
      "those are encoded again); about 190 captions at InternVL3-8B's size, 1000 at SmolLM2's")
    a("--vae", help="VAE folder (diffusers AutoencoderKL) for flux/sd3/sdxl latent spaces (not needed for 'pixel')")
    a("--latent-cache", type=Path,
      help="with --vae: keep each sample's latent on disk, keyed by sample id and pixels (and resume exactly)")
    # model
    a("--preset", default="tiny", help="base preset (tiny, small, paper-5b); the flags below override it")
    a("--latent", default="pixel")
    a("--dit-width", type=int)
    a("--dit-depth", type=int)
    a("--dit-heads", type=int)
    a("--patch", type=int)
    a("--mlp-ratio", type=float)
    a("--lap-heads", type=int)
    a("--lap-depth", type=int)
    a("--refiner-heads", type=int)
    a("--refiner-depth", type=int, help="0 = no refiner blocks (the Fig. 21 ablation)")
    a("--shift", type=float, help="fixed timestep shift of this checkpoint, used in training and sampling")
    a("--sample-steps", type=int, default=20)
    a("--sample-cfg", type=float, default=3.0)
    a("--sample-prompts", type=Path, help="sample these prompts with the EMA weights every --sample-every steps and "
      "at the end, a grid per step in RUN/samples/: a .txt (one prompt a line) or a .jsonl / .toml of {prompt, "
      "seed, images} (seed: its line's index unless given; images: reference images, paths relative to the file)")
    a("--sample-every", type=int, default=0, help="with --sample-prompts: steps between samples grids (0: at the end)")
    a("--init-from", help="handoff (Sec. 3.4): start from this .safetensors checkpoint's weights")
    a("--reinit", default="", help="with --init-from: parts to start fresh, e.g. 'lap,refiner'")
    # loop
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("out", "betas"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            a(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            a(flag, type=typ, default=None)
    a("--resume", nargs="?", const="auto",
      help="continue the run: 'auto' (newest state in --out) or a state folder (checkpoints/step-N); "
      "refused when there is none (leave it out to start a new run)")
    a("--new-data", action="store_true",
      help="with --resume: go on with changed --data/--mix/--seed (new tasks start at their first sample, a "
      "source whose size changed at its next epoch) instead of refusing the changed mixture")
    a("--threads", type=int,
      help="CPU threads for torch (1 is much faster than 2 when another process shares the cores)")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
      help="also write TensorBoard event files to RUN/tensorboard (pip install -c constraints.txt tensorboard)")
    a("--export-only", action="store_true", help="with --resume: write model.safetensors (EMA) from the state and stop")
    a("--val-prompts", type=int, default=32, help="scenes: prompts per split scored at each validation")
    a("--val-data", help="a held-out dataset (any form --data takes) for the validation loss")
    a("--val-split", type=float, default=0.0,
      help="set this fraction of --data aside (never trained on) for the validation loss, e.g. 0.02")
    a("--val-loss-samples", type=int, default=32,
      help="held-out samples in the validation loss (at every validation; 0: no validation loss). "
      "--data scenes: the held-out compositions")
    a("--val-loss-timesteps", type=int, default=8, help="fixed timesteps each held-out sample is scored at")
    return ap


def given_flags(argv: list[str] | None) -> set[str]:
    """The settings given on the command line (in any spelling argparse takes: --lr=1e-3, --lr 1e-3)."""
    ap = parser()
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    given = given_flags(argv)
    if args.config:
        try:
            file = read_config(args.config, ap, set(vars(args)))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        for k, v in file.items():
            if k not in given:
                setattr(args, k, v)
        given |= set(file)  # the file's settings are given now too: on --resume they win over run.json
    saved = Path(args.out) / "run.json" if args.out else None
    if args.resume and saved is not None and saved.is_file():
        # A resumed run keeps the settings it was started with; flags given now override them
        # (e.g. --steps to train on, --threads).
        for k, v in json.loads(saved.read_text()).items():
            if k in vars(args) and k not in given and k not in ("resume", "export_only", "new_data", "out"):
                setattr(args, k, v)
    if not args.out:
        raise SystemExit("--out RUN_DIR is required")
    if args.export_only and not args.resume:
        raise SystemExit("--export-only writes the model of a saved state: give --resume too")
    if args.new_data and not args.resume:
        raise SystemExit("--new-data goes on from a saved state with changed data: give --resume too")
    return args


def resolved(args: argparse.Namespace) -> dict:
    """The run's settings with the loop's defaults filled in (a loop flag left out is None until
    TrainConfig gives it its default): what RUN/config.toml records."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: defaults[k] if v is None and k in defaults else v for k, v in vars(args).items()}


def model_config(args, spec) -> UniFusionConfig:
    """The preset with the encoder and the flags applied."""
    dit = {k: v for k, v in {"hidden_size": args.dit_width, "depth": args.dit_depth, "heads": args.dit_heads,
                             "patch_size": args.patch, "mlp_ratio": args.mlp_ratio}.items() if v is not None}
    lap = {k: v for k, v in {"heads": args.lap_heads, "depth": args.lap_depth}.items() if v is not None}
    ref = {k: v for k, v in {"heads": args.refiner_heads, "depth": args.refiner_depth}.items() if v is not None}
    base = get_preset(args.preset)
    if dit.get("hidden_size") and dit.get("heads") and "axes_dim" not in dit:
        dit["axes_dim"] = None  # recompute the rotary split for the new head size
    sampling = {"steps": args.sample_steps, "cfg": args.sample_cfg, "shift": args.shift, "rewrite": bool(args.rewrite),
                "size": (args.resolution, args.resolution)}
    return base.replace(encoder=spec, latent=get_latent_space(args.latent), dit=dit, lap=lap, refiner=ref,
                        sampling=sampling)


def lora_base(args, spec) -> UniFusionConfig:
    """The config of a LoRA run: that of its --init-from checkpoint (lora.base_config)."""
    if not args.init_from:
        raise ConfigError("--lora-rank trains adapters on an existing checkpoint: give it with --init-from (e.g. "
                          "unifusion_core/assets/unifusion-scenes-64.safetensors, the embedded model)")
    if args.reinit:
        raise ConfigError(f"--reinit {args.reinit} starts parts fresh, which a LoRA (on a frozen base) cannot "
                          "train: leave it out, or leave out --lora-rank for a handoff")
    return base_config(args.init_from, spec)


def main(argv: list[str] | None = None) -> dict:
    try:
        return _main(argv)
    except ConfigError as e:  # a flag the trainer cannot run with: its message alone, exit status 1
        raise SystemExit(str(e)) from None
    except NonFiniteError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_NONFINITE) from None
    except StateError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_STATE) from None
    except SignalStop as e:
        log.warning("%s", e)
        raise SystemExit(EXIT_SIGNAL) from None
    except (ValueError, FileNotFoundError) as e:  # bad settings or data: the message says what to do
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None


def _main(argv: list[str] | None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .dist import close, setup

    # under torchrun: the process group, and this rank's device (cuda:LOCAL_RANK)
    d, device = setup(args.device or "cpu", args.hsdp_replicas or 1)
    try:
        return _train(args, argv, d, device)
    finally:
        close()


def _train(args, argv, d, device) -> dict:
    from .dist import check_shared

    out = Path(args.out)
    if args.tensorboard:
        try:
            summary_writer()  # installed: else the pip command now, before anything is loaded
        except ImportError as e:
            raise ConfigError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    check_shared(out, d)  # across nodes: one filesystem, or a clear error now instead of a hang later
    train_cfg = TrainConfig(out=str(out), **{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__
                                             if k not in ("out", "betas") and getattr(args, k, None) is not None})
    encoder, spec = make_features(args, device)
    config = model_config(args, spec)
    if train_cfg.lora_rank:  # a LoRA adapts a checkpoint as it is: its own config, whatever the model flags say
        config = lora_base(args, spec)
    mixture, sources = make_data(args, train_cfg.seed, stride=config.dit.patch_size * config.latent.downscale,
                                 batch=train_cfg.prompts_per_step)
    torch.manual_seed(train_cfg.seed)  # the initial weights are part of the run
    model = build_model(config, args.init_from, tuple(p for p in args.reinit.split(",") if p))
    n = model.num_parameters()
    log.info("model: %s parameters (LAP %s, refiner %s, DiT %s)", n["total"], n["lap"], n["refiner"], n["dit"])
    latents = make_latents(args, config.latent, train_cfg.seed)
    validate = make_validation(args, encoder, latents, config, sources)
    trainer = Trainer(train_cfg, model, mixture, sources, encoder, validate, latents=latents,
                      describe={"argv": argv if argv is not None else sys.argv[1:], "init_from": args.init_from},
                      dist=d, device=device)
    if args.resume:
        if args.resume != "auto" and not Path(args.resume).is_dir():
            kept = [str(p) for _, p in list_states(out)] if d.main else []
            raise SystemExit(f"--resume {args.resume}: no training state there; the states of {out} are "
                             f"{kept or 'none'}")
        # Why refuse instead of starting at step 0 (as Hugging Face's Trainer refuses): a --resume
        # that finds nothing is a wrong --out or a lost run, and a fresh start would hide that.
        if not trainer.resume(None if args.resume == "auto" else Path(args.resume), new_data=args.new_data):
            what = "export" if args.export_only else "resume"  # --export-only: never the untrained weights
            raise SystemExit(f"no training state in {out / 'checkpoints'} to {what}: check --out, or leave out "
                             "--resume to start a new run")
        if args.export_only:
            path = trainer.export(out / "model.safetensors")
            if d.main:
                sys.stdout.write(json.dumps({"step": trainer.step, "export": str(path)}) + "\n")
            return {"step": trainer.step, "export": str(path)}
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
    # every rank: a prompt without features fails here; a latent space's samples decode with the run's VAE
    trainer.samples = make_samples(args, encoder, config, vae=getattr(latents, "vae", None))
    if args.tensorboard and d.main:
        # resumed at step s: what the run before wrote after s goes (its step-s records precede the save)
        trainer.board = Board(out / "tensorboard", purge_step=trainer.step + 1 if trainer.step else None)
    # written once the state has loaded: a resume that fails leaves the run's settings as they were
    if d.main:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (out / "run.json").write_text(json.dumps(settings, indent=2))
        # the same settings, sectioned: `--config RUN/config.toml --out OTHER` trains this run again
        (out / "config.toml").write_text(to_toml(resolved(args), parser(), header=RESOLVED))
    summary = trainer.run()
    summary["parameters"] = n
    if d.main:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
