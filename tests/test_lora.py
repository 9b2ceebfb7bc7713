"""LoRA (unifusion_core/lora.py): a fresh LoRA is the base exactly, merging equals the hooked forward,
the file round-trips, strength scales as merging does, a LoRA trained here learns its target, the
trainer freezes the base and resumes exactly, and the LoRA Loader node (called directly; the real
ComfyUI: tests/test_comfyui.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomize
from safetensors import safe_open
from test_train import ENC, feature_table, tiny_config, write_features
from torch.testing import assert_close

import nodes
import unifusion_core as uf
from unifusion_core import flow
from unifusion_core import lora as L
from unifusion_core.train.loop import TrainConfig, Trainer
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.setup import PromptFeatures
from unifusion_core.train.sources import SyntheticScenes
from unifusion_core.train.state import list_states, read_tensors
from unifusion_core.train.vae import to_latents

ALL = ("dit", "modulation", "lap", "refiner")
PROMPT = "a red circle on the left"


@pytest.fixture
def base():
    torch.manual_seed(0)
    return randomize(uf.UniFusionModel(tiny_config()), std=0.1).eval()


def inputs(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = model.config.encoder
    return (torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 5, len(enc.layers), enc.hidden_size, generator=g))


def forward(model, x, t, f):
    with torch.no_grad():
        return model(x, t, model.encode(f))


def random_adapters(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in L.adapted(model).values():
            lin.lora_up.copy_(torch.randn(lin.lora_up.shape, generator=g) * std)


# --- the adapters ---------------------------------------------------------------------------------


def test_a_fresh_lora_is_the_base_exactly_and_only_it_trains(base):
    x = inputs(base)
    ref = forward(base, *x)
    names = L.add_lora(base, L.LoRAConfig(4, targets=ALL))
    assert torch.equal(forward(base, *x), ref)
    linears = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(names) == {n for n in linears if n.startswith(("dit.blocks.", "lap.", "refiner."))} | {
        "dit.time_mod", "dit.final.adaLN"}
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_down", "lora_up")}
    # the default targets: the DiT blocks' attention and MLP only
    other = randomize(uf.UniFusionModel(tiny_config()))
    assert L.add_lora(other, L.LoRAConfig(2)) == [f"dit.blocks.{i}.{k}" for i in range(2)
                                                  for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_merge_equals_the_hooked_forward_and_strip_leaves_a_plain_model(base):
    x = inputs(base)
    ref = forward(base, *x)
    keys = list(base.state_dict())
    L.add_lora(base, L.LoRAConfig(4, alpha=8, targets=ALL))
    random_adapters(base)
    hooked = forward(base, *x)
    assert (hooked - ref).abs().max() > 0.1  # the adapters do something
    assert L.merge_lora(base) == 28
    assert_close(forward(base, *x), hooked, atol=1e-5, rtol=1e-5)
    L.unmerge_lora(base)  # subtracts the same term: back up to rounding
    assert_close(forward(base, *x), hooked, atol=1e-5, rtol=1e-5)
    L.merge_lora(base)
    L.strip_lora(base)
    assert list(base.state_dict()) == keys  # a plain checkpoint again
    assert_close(forward(base, *x), hooked, atol=1e-5, rtol=1e-5)


def test_rank_dropout_masks_are_each_samples_own(base):
    """lora.rank_dropout: a sample's masks depend on its key, not on the batch it runs in or the
    padding of its conditioning; about p of the rank components drop, the rest scale by 1/(1-p);
    nothing drops in eval mode or outside the context; the seed draws other masks."""
    L.add_lora(base, L.LoRAConfig(8, targets=ALL))
    random_adapters(base, std=0.5)
    base.train()
    x, t, f = inputs(base, B=4)
    f[2:, 3:] = 0  # samples 2 and 3 are shorter prompts: 3 tokens (padding when batched with the others)
    feats = [uf.Features(h[:n], encoder=base.config.encoder)
             for h, n in zip(f, (5, 5, 3, 3))]
    keys = {"dit": torch.arange(20, 24), "lap": torch.arange(20, 24), "refiner": torch.arange(20, 24)}

    def run(rows, seed=7, p=0.5):
        sub = {k: v[rows] for k, v in keys.items()}
        with torch.no_grad(), L.rank_dropout(base, p, seed, sub):
            return base(x[rows], t[rows], base.encode([feats[i] for i in rows]))

    plain = run([0, 1, 2, 3], p=0.0)
    together = run([0, 1, 2, 3])
    assert (together - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample dropped something
    assert_close(torch.cat([run([0, 1]), run([2, 3])]), together, atol=1e-5, rtol=1e-5)  # 2 + 2 = 4
    assert_close(run([2]), together[2:3], atol=1e-5, rtol=1e-5)  # alone, unpadded: the same masks
    assert (run([0, 1, 2, 3], seed=8) - together).abs().max() > 1e-3  # another step's masks
    base.eval()
    assert_close(run([0, 1, 2, 3]), plain, atol=0, rtol=0)  # eval: no dropout
    base.train()
    with torch.no_grad():
        assert_close(base(x, t, base.encode(feats)), plain, atol=0, rtol=0)  # outside the context: none
    # the masks: about p dropped, the kept scaled by 1 / (1 - p)
    lin = base.dit.blocks[0].mlp.fc1
    with L.rank_dropout(base, 0.25, 3, {"dit": torch.arange(4096)}):
        keep = L._keep(lin, torch.ones(4096, 5, 8))
    assert keep.shape == (4096, 1, 8) and keep.unique().tolist() == [0.0, pytest.approx(4 / 3)]
    assert (keep == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert lin.lora_drop is None  # cleared on leaving
    with pytest.raises(ValueError, match="LoRA dropout must be in \\[0, 1\\)"):
        with L.rank_dropout(base, 1.0, 0, keys):
            pass


def test_file_round_trip_keys_and_metadata(base, tmp_path):
    x = inputs(base)
    plain = copy.deepcopy(base)
    L.add_lora(base, L.LoRAConfig(4, alpha=2, targets=("dit", "lap")))
    random_adapters(base)
    path = L.save_lora(base, tmp_path / "a.safetensors", base="tiny.safetensors", targets=("dit", "lap"))
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    layer = "dit.blocks.0.attn.qkv"  # kohya's names, keyed by the model's own layer names
    assert {f"{layer}.lora_down.weight", f"{layer}.lora_up.weight", f"{layer}.alpha"} <= keys
    assert all(k.startswith(("dit.blocks.", "lap.")) for k in keys)
    assert meta["format"] == "unifusion-lora" and meta["rank"] == "4" and meta["alpha"] == "2"
    assert meta["targets"] == "dit,lap" and meta["base"] == "tiny.safetensors"
    assert meta["base_config_sha256"] == L.config_hash(base.config)
    assert json.loads(meta["base_config"])["dit"]["hidden_size"] == 64
    lora = L.read_lora(path)
    assert lora.scale(layer) == 0.5 and lora.shape(layer) == (192, 64)
    L.load_lora(plain, lora)
    assert torch.equal(forward(plain, *x), forward(base, *x))


def test_strength_zero_is_the_base_and_strength_s_equals_merging_at_s(base, tmp_path):
    x = inputs(base)
    ref = forward(base, *x)
    tuned = copy.deepcopy(base)
    L.add_lora(tuned, L.LoRAConfig(4, targets=ALL))
    random_adapters(tuned)
    path = L.save_lora(tuned, tmp_path / "a.safetensors")
    L.set_strength(tuned, 0.0)
    assert torch.equal(forward(tuned, *x), ref)
    for s in (0.5, -1.0, 2.0):
        L.set_strength(tuned, s)
        merged = copy.deepcopy(base)
        L.merge_file(merged, path, s)  # what ComfyUI's patcher computes at strength s
        assert_close(forward(merged, *x), forward(tuned, *x), atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(base)
    L.merge_file(merged, path, 0.0)
    assert torch.equal(forward(merged, *x), ref)


def test_files_that_do_not_fit_are_refused_naming_what_differs(base, tmp_path):
    L.add_lora(base, L.LoRAConfig(2, targets=("dit", "lap")))
    path = L.save_lora(base, tmp_path / "a.safetensors", base="tiny.safetensors")
    wider = randomize(uf.UniFusionModel(tiny_config(hidden_size=32)))
    with pytest.raises(ValueError, match=r"a.safetensors was trained for another model shape \(trained on "
                                         r"'tiny.safetensors'\): .*dit.blocks.0.attn.qkv is \[96, 32\] in the model "
                                         r"but \[192, 64\] in the LoRA"):
        L.load_lora(wider, path)
    deeper = randomize(uf.UniFusionModel(tiny_config(depth=1)))
    n = len(L.read_lora(path).layers)
    with pytest.raises(ValueError, match=rf"4 of its {n} layers are not Linear layers of this model \(e.g. "
                                         r"dit.blocks.1.attn.proj"):
        L.merge_file(deeper, path)
    (tmp_path / "b.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        L.read_lora(tmp_path / "b.safetensors")
    uf.save_model(randomize(uf.UniFusionModel(tiny_config())), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="m.safetensors: not a UniFusion LoRA \\(metadata 'format' is 'unifusion'"):
        L.read_lora(tmp_path / "m.safetensors")
    for bad, match in [(dict(rank=0), "rank must be an integer >= 1"),
                       (dict(rank=2, alpha=-1), "alpha must be >= 0"),
                       (dict(rank=2, targets="dit,mlp"), "targets must be a comma list of dit, modulation, lap")]:
        with pytest.raises(ValueError, match=match):
            L.LoRAConfig(**bad)
    with pytest.raises(ValueError, match="targets must be"):
        TrainConfig(out=str(tmp_path), lora_rank=4, lora_targets="unet")


# --- training ---------------------------------------------------------------------------------------


def lora_trainer(tmp_path, model, steps, **cfg) -> Trainer:
    src = SyntheticScenes(size=16, prompts=[PROMPT], jitter=False)
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table([PROMPT]))
    tc = TrainConfig(out=str(tmp_path), steps=steps, prompts_per_step=2, timesteps_per_prompt=4, warmup=1,
                     lr=1e-2, cond_dropout=0.0, ema_decay=0.5, lora_rank=4, **{"checkpoint_every": 1000, **cfg})
    return Trainer(tc, model, TaskMixture({"t2i": src}, {"t2i": 1.0}, seed=0), {"t2i": src}, feats)


def target_loss(model, n=16) -> float:
    """The flow loss of the one trained image at fixed timesteps and noise."""
    src = SyntheticScenes(size=16, prompts=[PROMPT], jitter=False)
    x0 = to_latents([src.get(0)], model.config.latent).expand(n, -1, -1, -1)
    feats = PromptFeatures(ENC, ENC.layers, table=feature_table([PROMPT]))([src.get(0)])[0]
    g = torch.Generator().manual_seed(123)
    noise, t = torch.randn(x0.shape, generator=g), torch.linspace(0.05, 0.95, n)
    with torch.no_grad():
        v = model.eval()(flow.interpolate(x0, noise, t), t, model.encode([feats] * n))
    return float(flow.flow_loss(v, x0, noise).mean())


def test_a_lora_trained_here_learns_its_target_with_the_base_frozen(base, tmp_path):
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    before = target_loss(base)
    trainer = lora_trainer(tmp_path, base, steps=30)
    opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt == {id(p) for n, p in base.named_parameters() if L.is_lora_key(n)}  # only adapters
    assert set(trainer.ema) == {k for k in base.state_dict() if L.is_lora_key(k)}  # the EMA: adapters only
    trainer.run()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in frozen.items())  # the base never moved
    lora_file, merged = tmp_path / "lora.safetensors", uf.load_model(tmp_path / "model.safetensors")
    after = target_loss(merged)
    print(f"target loss: base {before:.4f}, with the trained LoRA {after:.4f}")
    assert after < 0.5 * before, (before, after)
    # model.safetensors is the base with the (EMA) LoRA merged: the LoRA file on the base gives the same
    plain = randomize(uf.UniFusionModel(tiny_config()), std=0.1)
    plain.load_state_dict(frozen)
    L.load_lora(plain, lora_file)
    x = inputs(plain)
    assert_close(forward(plain, *x), forward(merged, *x), atol=1e-5, rtol=1e-5)
    assert lora_file.stat().st_size < 0.2 * (tmp_path / "model.safetensors").stat().st_size


def test_lora_dropout_trains_other_adapters_and_checkpointed_blocks_recompute_its_masks(base, tmp_path):
    """--lora-dropout changes what the adapters learn (masks drawn per sample and step), and a
    gradient-checkpointed run, whose blocks recompute their forward in the backward, trains exactly
    what the plain run does (the masks are open over the backward and keyed, not drawn again)."""
    runs = {}
    for name, cfg in (("none", {}), ("dropout", dict(lora_dropout=0.5)),
                      ("checkpointed", dict(lora_dropout=0.5, gradient_checkpointing=True))):
        model = copy.deepcopy(base)
        trainer = lora_trainer(tmp_path / name, model, steps=3, lora_targets="dit,lap,refiner", **cfg)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        runs[name] = losses, {k: v.clone() for k, v in model.state_dict().items() if L.is_lora_key(k)}
    assert runs["dropout"][0][0] == runs["none"][0][0]  # up = 0 at the start: dropout changes no output yet
    assert runs["dropout"][0][1:] != pytest.approx(runs["none"][0][1:], rel=1e-4)
    assert runs["checkpointed"][0] == pytest.approx(runs["dropout"][0], rel=1e-6)
    for k, v in runs["dropout"][1].items():
        assert_close(runs["checkpointed"][1][k], v, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="lora_dropout must be in \\[0, 1\\)"):
        TrainConfig(out=str(tmp_path), lora_rank=4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_dropout drops LoRA adapters' rank components: give lora_rank"):
        TrainConfig(out=str(tmp_path), lora_dropout=0.1)
    with pytest.raises(ValueError, match="'dit,lap' adapt LAP or the refiner, which adapter_lr 0 freezes"):
        TrainConfig(out=str(tmp_path), lora_rank=4, lora_targets="dit,lap", adapter_lr=0.0)
    TrainConfig(out=str(tmp_path), lora_rank=4, lora_targets="dit", adapter_lr=0.0)  # nothing of LAP to train


def test_a_lora_trains_the_same_with_compiled_blocks(base, tmp_path):
    """--compile with --lora-rank and --lora-dropout: the adapters' hooks and their dropout masks run
    inside the compiled blocks, three steps give the eager losses and adapters (fp32, CPU), and a
    step's new masks compile nothing new (the salts and keys are graph inputs)."""
    torch._dynamo.reset()
    runs = []
    for name, compile in (("eager", False), ("compiled", True)):
        model = copy.deepcopy(base)
        trainer = lora_trainer(tmp_path / name, model, steps=3, compile=compile, lora_dropout=0.3)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items() if L.is_lora_key(k)}))
        if compile:
            graphs = uf.dit.graphs_compiled()
            trainer.train_step()
            assert uf.dit.graphs_compiled() == graphs  # the fourth step's masks reuse the graphs
    assert all(b._compiled_call_impl is not None for b in model.dit.blocks)
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert set(runs[1][1]) == set(runs[0][1])
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in runs[1][1].items() if "lora_up" in k)  # it trained
    torch._dynamo.reset()


def test_resume_with_lora_is_exact(base, tmp_path):
    start = copy.deepcopy(base)
    lora_trainer(tmp_path / "a", copy.deepcopy(start), steps=6, checkpoint_every=3, lora_dropout=0.25).run()

    class Stop(Exception):
        pass

    def stop_at_3(trainer):
        if trainer.step == 3:
            raise Stop

    b = lora_trainer(tmp_path / "b", copy.deepcopy(start), steps=6, checkpoint_every=3, lora_dropout=0.25)
    b.on_step_end = stop_at_3
    with pytest.raises(Stop):
        b.run()
    resumed = lora_trainer(tmp_path / "b", copy.deepcopy(start), steps=6, checkpoint_every=3, lora_dropout=0.25)
    assert resumed.resume() and resumed.step == 3
    resumed.run()
    sa, sb = (read_tensors(list_states(tmp_path / r)[-1][1]) for r in "ab")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("optim.") and ".lora_up." in k and k.endswith("exp_avg_sq") for k in sa)
    assert not any(k.startswith("optim.") and not (".lora_up." in k or ".lora_down." in k) for k in sa)
    la, lb = (L.read_lora(tmp_path / r / "lora.safetensors").tensors for r in "ab")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    other = lora_trainer(tmp_path / "b", copy.deepcopy(start), steps=6, lora_alpha=8.0)
    with pytest.raises(ValueError, match="saved with LoRA settings .* --lora-alpha"):
        other.resume()


def test_cli_trains_a_lora_on_a_checkpoint(base, tmp_path):
    from unifusion_core.train.__main__ import main

    uf.save_model(base, tmp_path / "base.safetensors")
    feats = write_features(tmp_path / "features.safetensors", feature_table([s.prompt for s in uf.scenes.all_scenes()]))
    common = ["--features", str(feats), "--data", "scenes", "--scene-kinds", "single", "--resolution", "16",
              "--steps", "2", "--prompts-per-step", "2", "--timesteps-per-prompt", "2", "--val-prompts", "0",
              "--val-loss-samples", "0", "--lora-rank", "2", "--lora-targets", "dit,refiner"]
    with pytest.raises(SystemExit, match="--lora-rank trains adapters on an existing checkpoint: give it with "
                                         "--init-from"):
        main(["--out", str(tmp_path / "x"), *common])
    # the model flags are the checkpoint's: the preset's defaults (another DiT) do not matter
    main(["--out", str(tmp_path / "r"), *common, "--init-from", str(tmp_path / "base.safetensors")])
    lora = L.read_lora(tmp_path / "r" / "lora.safetensors")
    assert lora.metadata["targets"] == "dit,refiner" and lora.metadata["base"] == "base.safetensors"
    assert {k.split(".")[0] for k in lora.layers} == {"dit", "refiner"}
    assert uf.read_config(tmp_path / "r" / "model.safetensors").dit == base.config.dit


# --- the node, called directly (no ComfyUI: the LoRA is merged into a copy) ---------------------------


def test_lora_loader_node_lists_applies_and_stacks(base, tmp_path, monkeypatch):
    monkeypatch.setattr(nodes.host, "MODELS_DIR", tmp_path)
    (tmp_path / "unifusion").mkdir()
    uf.save_model(base, tmp_path / "unifusion" / "tiny.safetensors")
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        tuned = copy.deepcopy(base)
        L.add_lora(tuned, L.LoRAConfig(2, targets=("dit", "lap")), seed=seed)
        random_adapters(tuned, seed)
        files[name] = L.save_lora(tuned, tmp_path / "loras" / "sub" / f"{name}.safetensors")
    L.add_lora(wider := randomize(uf.UniFusionModel(tiny_config(hidden_size=32))), L.LoRAConfig(2))
    L.save_lora(wider, tmp_path / "loras" / "wider.safetensors")
    uf.save_model(base, tmp_path / "loras" / "not-a-lora.safetensors")  # a checkpoint: not listed
    node = nodes.NODE_CLASS_MAPPINGS["UniFusionLoRALoader"]
    # The pack's demo LoRA is listed in place from its assets folder (the `unifusion` folder's bundled
    # path, beside the bundled checkpoint), where the pack ships it; Model Load does not list it.
    shipped = [uf.assets.DEMO_LORA.name] if uf.assets.demo_lora() and uf.bundled_model() else []
    assert node.INPUT_TYPES()["required"]["lora_name"][0] == sorted(
        ["sub/a.safetensors", "sub/b.safetensors", "wider.safetensors", *shipped])
    if shipped:
        assert nodes.host.resolve("lora", shipped[0]) == uf.assets.DEMO_LORA
        assert shipped[0] not in nodes.NODE_CLASS_MAPPINGS["UniFusionModelLoad"].INPUT_TYPES()["required"][
            "model_name"][0]
    (model,) = nodes.NODE_CLASS_MAPPINGS["UniFusionModelLoad"]().load("tiny.safetensors")
    x = inputs(base)
    ref = forward(model.obj, *x)
    (a,) = node().load(model, "sub/a.safetensors", 1.0)
    (ab,) = node().load(a, "sub/b.safetensors", 0.5)
    want = copy.deepcopy(base)
    L.merge_file(want, files["a"], 1.0)
    assert_close(forward(a.obj, *x), forward(want, *x), atol=1e-5, rtol=1e-5)
    L.merge_file(want, files["b"], 0.5)
    assert_close(forward(ab.obj, *x), forward(want, *x), atol=1e-5, rtol=1e-5)
    assert torch.equal(forward(model.obj, *x), ref)  # the input model is unchanged
    assert torch.equal(forward(node().load(model, "sub/a.safetensors", 0.0)[0].obj, *x), ref)
    with pytest.raises(ValueError, match="wider.safetensors was trained for another model shape"):
        node().load(model, "wider.safetensors", 1.0)
    with pytest.raises(TypeError, match="model must be the output of UniFusion Model Load"):
        node().load(base, "sub/a.safetensors", 1.0)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        node().load(model, "sub/a.safetensors", float("nan"))
