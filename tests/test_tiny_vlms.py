"""The tiny HF checkpoints of tiny_vlms.py: they load back offline, template chats like the real
checkpoints, run forward / generate with correctly expanded image tokens, and are reproducible.
Also records facts about the installed transformers that loaders depend on, and runs the encoder
family tests on Qwen3-VL (DeepStack capture, 3-axis RoPE positions, pixel parity)."""

import hashlib

import pytest
import tiny_vlms as tv
import torch
from PIL import Image
from test_vlm import SYSTEM, assert_rewrite_and_images_condition, gradient
from tokenizers import Tokenizer
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

BUILDERS = {
    "qwen2": lambda p: tv.make_tiny_causal_lm(p, family="qwen2"),
    "llama": lambda p: tv.make_tiny_causal_lm(p, family="llama"),
    "internvl": tv.make_tiny_internvl,
    "gemma3": tv.make_tiny_gemma3,
    "qwen25vl": tv.make_tiny_qwen25vl,
    "qwen3vl": tv.make_tiny_qwen3vl,
}
CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen25vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3vl": "Qwen3VLForConditionalGeneration",
}
VLMS = ("internvl", "gemma3", "qwen25vl", "qwen3vl")

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
    },
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def load(folder, name):
    import transformers

    cls = getattr(transformers, CLASSES[name])
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tok


# --- folders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_folder_is_a_real_hf_checkpoint(folders, name):
    folder = folders[name]
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert not (folder / "pytorch_model.bin").exists()

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert config.architectures == [CLASSES[name]]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.is_fast
    assert config.get_text_config().vocab_size == len(tok)

    import transformers

    cls = getattr(transformers, CLASSES[name])
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == CLASSES[name]
    # The Auto classes a loader would use resolve to the same class.
    auto = AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM
    assert type(auto.from_pretrained(folder, local_files_only=True)) is cls


def test_builders_are_deterministic(folders, tmp_path):
    for name, build in BUILDERS.items():
        again = build(tmp_path / name)
        for f in sorted(folders[name].iterdir()):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            assert digest == hashlib.sha256((again / f.name).read_bytes()).hexdigest(), (name, f.name)


# --- tokenizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tokenizer_round_trips_any_text_with_offsets(folders, name):
    tok = AutoTokenizer.from_pretrained(folders[name], local_files_only=True)
    assert 300 <= len(tok) <= 1000
    text = "A watercolor of a fox, at dawn: naïve café 東京 🦊 -- 42%!"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1][1] == len(text)
    assert len(tok("a photo of a cat", add_special_tokens=False)["input_ids"]) < len("a photo of a cat")
    # Whatever class AutoTokenizer picks (transformers 5 rebuilds a qwen2 folder's tokenizer as
    # Qwen2Tokenizer), it tokenizes exactly like the saved tokenizer.json.
    raw = Tokenizer.from_file(str(folders[name] / "tokenizer.json"))
    for s in (text, "Numbers 12345 and   spaces\n\nnew lines<|im_end|>\n", "It's 3:45 -- isn't it?"):
        assert tok(s, add_special_tokens=False)["input_ids"] == raw.encode(s, add_special_tokens=False).ids


def test_chat_tokenizer_special_tokens(folders):
    for name in ("qwen2", "llama", "internvl"):
        tok = AutoTokenizer.from_pretrained(folders[name], local_files_only=True)
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
        for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            assert tok.tokenize(t) == [t]
        # Plain text gets no special tokens added.
        assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]

    tok = AutoTokenizer.from_pretrained(folders["internvl"], local_files_only=True)
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert tok.context_image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert tok.start_image_token_id == tok.convert_tokens_to_ids("<img>")
    config = AutoConfig.from_pretrained(folders["internvl"], local_files_only=True)
    assert config.image_token_id == tok.context_image_token_id

    tok = AutoTokenizer.from_pretrained(folders["gemma3"], local_files_only=True)
    assert (tok.boi_token, tok.eoi_token, tok.image_token) == (
        "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # Gemma adds <bos> to plain text
    config = AutoConfig.from_pretrained(folders["gemma3"], local_files_only=True)
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (
        tok.boi_token_id,
        tok.eoi_token_id,
        tok.image_token_id,
    )


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_causal_lm_chat_template(folders, name):
    tok = AutoTokenizer.from_pretrained(folders[name], local_files_only=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    gen = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert gen.endswith("<|im_end|>\n")


def test_internvl_chat_template(folders):
    tok = AutoTokenizer.from_pretrained(folders["internvl"], local_files_only=True)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<IMG_CONTEXT>\nDescribe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma3_chat_template(folders):
    tok = AutoTokenizer.from_pretrained(folders["gemma3"], local_files_only=True)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n"
        "<start_of_image>Describe this image.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    no_system = [{"role": "user", "content": "  Hi there  "}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(no_system, tokenize=False) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    )
    # Tokenized through the template, there is exactly one <bos>.
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


# --- forward / generate ---------------------------------------------------------------------------


def internvl_inputs(tok, num_tiles=2, seed=0):
    n = tv.INTERNVL_TOKENS_PER_TILE * num_tiles
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
    enc = tok(text, return_tensors="pt")
    size = tv.INTERNVL_IMAGE_SIZE
    pixels = torch.randn(num_tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return enc, pixels


def gemma3_inputs(tok, num_images=1, seed=0):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    full = f"\n\n{tok.boi_token}{tok.image_token * tv.GEMMA3_TOKENS_PER_IMAGE}{tok.eoi_token}\n\n"
    text = text.replace(tok.boi_token, full)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)  # the template wrote <bos>
    enc["token_type_ids"] = (enc["input_ids"] == tok.image_token_id).long()
    size = tv.GEMMA3_IMAGE_SIZE
    pixels = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return enc, pixels


def test_image_tokens_per_tile(folders):
    model, tok = load(folders["internvl"], "internvl")
    cfg = model.config
    side = cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]
    assert tv.INTERNVL_TOKENS_PER_TILE == side**2 * cfg.downsample_ratio**2 == cfg.image_seq_length == 4
    with torch.no_grad():
        feats = model.get_image_features(torch.zeros(3, 3, 56, 56))
    # transformers 5: get_image_features returns a model output; the projected tokens are pooler_output
    assert feats.pooler_output.shape == (3, 4, cfg.text_config.hidden_size)

    model, tok = load(folders["gemma3"], "gemma3")
    assert model.config.mm_tokens_per_image == tv.GEMMA3_TOKENS_PER_IMAGE == 9
    with torch.no_grad():
        feats = model.get_image_features(torch.zeros(2, 3, 84, 84))
    assert feats.pooler_output.shape == (2, 9, model.config.text_config.hidden_size)


def assert_image_reaches_text_and_generates(model, tok, enc, pixels) -> None:
    """Finite logits over the vocabulary at every position; the image reaches the text (the last
    token sees different pixels); greedy generation of 4 tokens runs."""
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**enc, pixel_values=pixels)
        other = model(**enc, pixel_values=pixels.flip(-1))
    assert out.logits.shape == (1, n, len(tok))
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])
    with torch.no_grad():
        gen = model.generate(**enc, pixel_values=pixels, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert gen.shape == (1, n + 4)


def test_internvl_forward_and_generate(folders):
    model, tok = load(folders["internvl"], "internvl")
    enc, pixels = internvl_inputs(tok, num_tiles=2)
    ids = enc["input_ids"][0].tolist()
    start = ids.index(tok.start_image_token_id)
    assert ids[start + 1 : start + 9] == [tok.context_image_token_id] * 8
    assert ids[start + 9] == tok.end_image_token_id
    assert_image_reaches_text_and_generates(model, tok, enc, pixels)
    with pytest.raises(ValueError):  # one tile too few for the placeholders
        model(**enc, pixel_values=pixels[:1])


def test_gemma3_forward_and_generate(folders):
    model, tok = load(folders["gemma3"], "gemma3")
    enc, pixels = gemma3_inputs(tok, num_images=1)
    ids = enc["input_ids"][0].tolist()
    assert ids.count(tok.image_token_id) == 9 and ids.count(tok.boi_token_id) == 1
    assert_image_reaches_text_and_generates(model, tok, enc, pixels)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_causal_lm_generate(folders, name):
    model, tok = load(folders[name], name)
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 5)
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1] :]), str)


# --- facts about the installed transformers -------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_last_hidden_state_is_after_the_final_norm(folders, name):
    """Records: with output_hidden_states=True, hidden_states has num_layers + 1 entries (the
    embeddings, then each decoder layer), and hidden_states[-1] is the last decoder layer's output
    AFTER the final norm (== last_hidden_state), not the raw layer output. hidden_states[-2] is
    the raw output of the second-to-last layer. Decoder layers return a plain tensor."""
    model, tok = load(folders[name], name)
    captured = {}

    def hook(module, args, output):
        captured["out"] = output

    ids = tok("A photo of a cat on a sofa.", return_tensors="pt")["input_ids"]
    handles = [model.model.layers[-1].register_forward_hook(hook)]
    second = {}
    handles.append(model.model.layers[-2].register_forward_hook(lambda m, a, o: second.setdefault("out", o)))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()

    raw = captured["out"]
    assert isinstance(raw, torch.Tensor)  # transformers 5: a tensor, not a tuple
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    with torch.no_grad():
        normed = model.model.norm(raw)
    torch.testing.assert_close(hs[-1], normed)
    assert not torch.allclose(hs[-1], raw)
    torch.testing.assert_close(hs[-2], second["out"])
    with torch.no_grad():
        base = model.model(ids)
    torch.testing.assert_close(hs[-1], base.last_hidden_state)


def test_where_the_vlm_parts_live(folders):
    """Records the transformers-5 module layout of the two VLMs."""
    for name in ("internvl", "gemma3"):
        model, _ = load(folders[name], name)
        lm = model.model.language_model
        assert len(lm.layers) == 6 and hasattr(lm, "norm") and hasattr(lm, "embed_tokens")
        assert hasattr(model.model, "vision_tower") and hasattr(model.model, "multi_modal_projector")
        assert model.lm_head.weight is lm.embed_tokens.weight  # tied
        assert not hasattr(model, "language_model") or model.language_model is lm


# --- Qwen3-VL as an encoder: the family tests of test_vlm.py, DeepStack, pixel parity --------------

QWEN3VL_DEEPSTACK_LAYERS = tuple(range(1, tv.QWEN3VL_DEEPSTACK + 1))  # the block inputs that carry DeepStack additions


@pytest.fixture(scope="module")
def encoders(folders):
    from unifusion_core.encoders import load_vlm

    return {name: load_vlm(folders[name]) for name in ("qwen25vl", "qwen3vl")}


def _pixel_inputs(vlm, ids, images):
    inputs = vlm.adapter.pixel_inputs(vlm.tile(images, 10), vlm.model.dtype, vlm.device)
    return inputs | {k: v[None] for k, v in vlm.adapter.extra_inputs(ids[0]).items()}


def _plain_forward(vlm, f, images):
    """One plain forward over f.sequence_ids. Returns (reads, hidden_states): reads[i] is what
    decoder block i received (a forward pre-hook set here on every block) and reads[-1] the last
    block's output; hidden_states is transformers' own output_hidden_states (the embeddings, then
    each block's output as the block returned it, the last one after the final norm)."""
    ids = torch.tensor(f.sequence_ids)[None]
    blocks, reads = vlm.adapter.decoder_layers(), []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: reads.append(a[0] if a else kw["hidden_states"]),
                                           with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, out: reads.append(out)))
    try:
        with torch.no_grad():
            out = vlm.model(input_ids=ids, **_pixel_inputs(vlm, ids, images), output_hidden_states=True,
                            use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(reads) == len(blocks) + 1
    return [r[0] for r in reads], [h[0] for h in out.hidden_states]


@pytest.mark.parametrize("rewrite", [True, False])
def test_qwen3vl_features_equal_a_plain_forward_at_their_positions(encoders, rewrite):
    """As test_vlm's family test; the reference is each block's input (DeepStack included)."""
    vlm = encoders["qwen3vl"]
    images = [gradient(120, 60), gradient(40, 90, seed=1)]
    layers = (0, 1, 2, 3, 5, 6)  # the embeddings, both DeepStack layers, after them, the last block's output
    f = vlm.encode("a red fox in the snow", images, rewrite=rewrite, max_new_tokens=6, layers=layers,
                   system_prompt=SYSTEM)
    assert f.layers == layers and f.hidden.shape == (len(f.positions), len(layers), 32)
    reads, hs = _plain_forward(vlm, f, images)
    for j, i in enumerate(layers):
        assert_close(f.hidden[:, j], reads[i][f.positions], atol=1e-5, rtol=1e-4, msg=f"layer {i}")
    final_norm = vlm.model.model.language_model.norm
    assert_close(final_norm(f.hidden[:, -1]), hs[-1][f.positions], atol=1e-5, rtol=1e-4)


def test_qwen3vl_deepstack_layers_are_what_the_next_block_reads(encoders):
    """transformers (Qwen3VLTextModel.forward) adds DeepStack features after blocks 0 and 1 return,
    so its hidden_states[1:3] (each block's output as returned) leave them out. Our layers 1, 2 are
    the residual stream blocks 1, 2 read: hidden_states[i] + the (i-1)-th DeepStack feature at the
    image tokens, computed here from the vision tower's own deepstack_features; the text tokens and
    layer 3 (no addition after block 2) are untouched."""
    vlm = encoders["qwen3vl"]
    images = [gradient(120, 60), gradient(40, 90, seed=1)]
    layers = (*QWEN3VL_DEEPSTACK_LAYERS, QWEN3VL_DEEPSTACK_LAYERS[-1] + 1)
    f = vlm.encode("a red fox in the snow", images, rewrite=True, max_new_tokens=4, layers=layers, system_prompt=SYSTEM)
    ids = torch.tensor(f.sequence_ids)[None]
    reads, hs = _plain_forward(vlm, f, images)
    inputs = _pixel_inputs(vlm, ids, images)
    with torch.no_grad():
        image_features = vlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        deepstack = image_features.deepstack_features
    assert len(deepstack) == tv.QWEN3VL_DEEPSTACK == len(vlm.model.config.vision_config.deepstack_visual_indexes)
    is_image = ids[0] == vlm.model.config.image_token_id
    img, txt = f.positions[f.is_image], f.positions[~f.is_image]
    assert len(img) == int(is_image.sum()) == 144 and len(txt) == 4
    for j, i in enumerate(QWEN3VL_DEEPSTACK_LAYERS):
        expected = hs[i].clone()
        expected[is_image] += torch.cat(deepstack[i - 1])
        assert_close(reads[i], expected, atol=1e-6, rtol=1e-5)  # the pre-hook reference is that sum
        assert_close(f.hidden[:, j], expected[f.positions], atol=1e-5, rtol=1e-4, msg=f"layer {i}")
        assert_close(f.hidden[~f.is_image, j], hs[i][txt], atol=1e-5, rtol=1e-4)
        # the previous block's plain output (the old capture) differs at every image token
        assert bool(((f.hidden[f.is_image, j] - hs[i][img]).abs().amax(-1) > 1e-3).all()), f"layer {i}"
    assert_close(f.hidden[:, -1], hs[layers[-1]][f.positions], atol=1e-5, rtol=1e-4)


def test_qwen3vl_conditioning_tokens_are_rewrite_plus_every_image_token(encoders):
    vlm = encoders["qwen3vl"]
    images = [gradient(120, 60), gradient(40, 90, seed=1)]
    tiled = vlm.tile(images, 10, True)
    # each image at its own resolution, at least 256^2 px in multiples of 32: 120x60 -> 384x192, 40x90 -> 192x384
    assert [tuple(t.tiles.shape[-2:]) for t in tiled] == [(192, 384), (384, 192)]
    f = vlm.encode("make it snow", images, max_new_tokens=5, system_prompt=SYSTEM)
    counts = [int((f.image_index == k).sum()) for k in range(2)]
    assert counts == [vlm.adapter.tokens(t) for t in tiled] == [12 * 6, 6 * 12]
    assert_rewrite_and_images_condition(vlm, f, counts, new_tokens=5)


def test_qwen3vl_is_a_registered_frozen_encoder(encoders):
    from unifusion_core import encoders as registry

    vlm = encoders["qwen3vl"]
    assert vlm.family == "qwen3_vl" and type(vlm.adapter) is registry.Qwen3VL
    assert "Qwen3-VL ('qwen3_vl')" in registry.SUPPORTED
    assert (vlm.adapter.patch, vlm.adapter.merge, vlm.adapter.frames) == (16, 2, 2)
    assert vlm.tokenizer.convert_tokens_to_ids("<|im_end|>") in vlm.stop_ids
    assert not vlm.model.training and not any(p.requires_grad for p in vlm.model.parameters())
    with pytest.raises(ValueError, match="too elongated for Qwen3-VL"):
        vlm.tile([gradient(2010, 10)], 10)


@pytest.mark.parametrize("name", ["qwen25vl", "qwen3vl"])
def test_qwen_vl_image_tokens_get_3d_rope_positions(encoders, name):
    """The adapters pass mm_token_type_ids: without it transformers gives the image tokens 1-D
    positions (Qwen2.5-VL, silently) or refuses a plain forward (Qwen3-VL). Reference: a forward
    with position ids from the model's own get_rope_index."""
    vlm = encoders[name]
    images = [gradient(120, 60)]
    f = vlm.encode("a fox", images, rewrite=False, layers=(3,), system_prompt=SYSTEM)
    ids = torch.tensor(f.sequence_ids)[None]
    inputs = vlm.adapter.pixel_inputs(vlm.tile(images, 10), vlm.model.dtype, vlm.device)
    image = (ids == vlm.model.config.image_token_id).int()
    rope, _ = vlm.model.model.get_rope_index(ids, mm_token_type_ids=image, image_grid_thw=inputs["image_grid_thw"])
    assert not torch.equal(rope[1], rope[2])  # height and width positions differ on the image
    flat = torch.arange(ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        mrope, plain = (vlm.model.model(input_ids=ids, **inputs, position_ids=pos,
                                        output_hidden_states=True).hidden_states[3] for pos in (rope, flat))
    assert_close(f.hidden[:, 0], mrope[0, f.positions], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(f.hidden[:, 0], plain[0, f.positions], atol=1e-4)


@pytest.mark.parametrize("w,h,max_tiles", [(120, 60, 10), (40, 90, 10), (30, 20, 1), (1000, 700, 1), (3000, 25, 2)])
def test_qwen3vl_pixels_match_transformers_processor(encoders, w, h, max_tiles):
    """Our Qwen3-VL image preparation against the image processor transformers uses for qwen3_vl
    (Qwen2VLImageProcessorPil) with the released Qwen3-VL preprocessor_config.json (patch 16,
    merge 2, mean/std 0.5, shortest_edge 65536) and our pixel budget as longest_edge."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vlm = encoders["qwen3vl"]
    img = Image.fromarray((torch.rand(h, w, 3, generator=torch.Generator().manual_seed(w)) * 255).byte().numpy())
    ours = vlm.adapter.pixel_inputs(vlm.tile([img], max_tiles), torch.float32, torch.device("cpu"))
    ref = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3,
                                   size={"shortest_edge": 65536, "longest_edge": max_tiles * 448 * 448},
                                   )(images=[img], return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=1e-5)
