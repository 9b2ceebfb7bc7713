"""The tiny HF checkpoints of tiny_vlms.py: they load back offline, template chats like the real
checkpoints, run forward / generate with correctly expanded image tokens, and are reproducible.
Also records facts about the installed transformers that loaders depend on."""

import hashlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tiny_vlms as tv  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
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
}
CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}

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
    auto = AutoModelForImageTextToText if name in ("internvl", "gemma3") else AutoModelForCausalLM
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
    assert (tok.boi_token, tok.eoi_token, tok.image_token) == ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
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


def test_internvl_forward_and_generate(folders):
    model, tok = load(folders["internvl"], "internvl")
    enc, pixels = internvl_inputs(tok, num_tiles=2)
    ids = enc["input_ids"][0].tolist()
    start = ids.index(tok.start_image_token_id)
    assert ids[start + 1 : start + 9] == [tok.context_image_token_id] * 8
    assert ids[start + 9] == tok.end_image_token_id
    with torch.no_grad():
        out = model(**enc, pixel_values=pixels)
        other = model(**enc, pixel_values=pixels.flip(-1))
    assert out.logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(out.logits).all()
    # The image reaches the text: tokens after it see different pixels.
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])
    with pytest.raises(ValueError):  # one tile too few for the placeholders
        model(**enc, pixel_values=pixels[:1])

    with torch.no_grad():
        gen = model.generate(**enc, pixel_values=pixels, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert gen.shape == (1, len(ids) + 4)


def test_gemma3_forward_and_generate(folders):
    model, tok = load(folders["gemma3"], "gemma3")
    enc, pixels = gemma3_inputs(tok, num_images=1)
    ids = enc["input_ids"][0].tolist()
    assert ids.count(tok.image_token_id) == 9 and ids.count(tok.boi_token_id) == 1
    with torch.no_grad():
        out = model(**enc, pixel_values=pixels)
        other = model(**enc, pixel_values=pixels.flip(-1))
    assert out.logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])

    with torch.no_grad():
        gen = model.generate(**enc, pixel_values=pixels, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert gen.shape == (1, len(ids) + 4)


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
