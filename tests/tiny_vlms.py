"""Tiny random Hugging Face checkpoints, built in-process, for loader tests.

Every builder writes a real HF folder (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``)
that loads back with ``from_pretrained(folder, local_files_only=True)``. Nothing is downloaded.

The folders mirror the conventions of the real checkpoints the loader targets:

* ``make_tiny_causal_lm``: SmolLM2 / Qwen2-Instruct style chat LM (ChatML, eos ``<|im_end|>``).
* ``make_tiny_internvl``: InternVL3-*-hf (``model_type: internvl``, Qwen2 text tower, ``<IMG_CONTEXT>``).
* ``make_tiny_gemma3``: gemma-3-*-it (SigLIP tower, ``<start_of_image>`` + soft tokens, ``<bos>`` added).
* ``make_tiny_qwen25vl`` / ``make_tiny_qwen3vl``: Qwen2.5-VL / Qwen3-VL-*-Instruct (native resolution,
  ``<|image_pad|>``, 3-axis RoPE; Qwen3-VL with DeepStack).

The tokenizer is a byte-level BPE whose merges are learned here, by a small deterministic trainer,
from the inline corpus below: any text (any language, any bytes) tokenizes, and decodes back exactly.
Builders are deterministic (fixed corpus, fixed seeds): the same call writes the same bytes.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
)

SEED = 0
NUM_MERGES = 320  # at most; the corpus yields fewer (pairs seen once are not merged)

# ---- shared tiny sizes -----------------------------------------------------------------------

TEXT_HIDDEN = 32
TEXT_LAYERS = 6
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 64
MAX_POSITIONS = 512

VISION_HIDDEN = 16
VISION_LAYERS = 1
VISION_HEADS = 2
VISION_INTERMEDIATE = 32
PATCH_SIZE = 14

# InternVL: one 56 px tile -> (56/14)^2 = 16 patches -> pixel shuffle (0.5) -> 4 tokens.
INTERNVL_IMAGE_SIZE = 56
INTERNVL_DOWNSAMPLE_RATIO = 0.5
INTERNVL_TOKENS_PER_TILE = int((INTERNVL_IMAGE_SIZE // PATCH_SIZE) ** 2 * INTERNVL_DOWNSAMPLE_RATIO**2)

# Gemma 3: one 84 px image -> 6x6 patches -> 2x2 average pool -> 3x3 = 9 soft tokens.
GEMMA3_IMAGE_SIZE = 84
GEMMA3_TOKENS_PER_IMAGE = 9

CORPUS = """
The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red sofa.
Describe this image in detail. What is in the picture? There is a dog in the park.
A painting of a mountain lake at sunset, with pine trees and a small wooden boat.
You are a helpful assistant. Please answer the question as well as you can.
The user asks a question and the assistant gives a short, clear and honest answer.
A close-up portrait of a woman with long dark hair, soft light, high quality, detailed.
An astronaut riding a horse on the moon, digital art, trending, sharp focus.
Write a caption for the image. The image shows a street in a city at night with rain.
Generate a detailed prompt for a picture of a castle on a hill under a blue sky.
Hello! How are you today? I am fine, thank you. Can you help me with this task?
A bowl of fresh fruit on a wooden table: apples, oranges, bananas and grapes.
The model reads the text and the image, then it writes an answer one token at a time.
Children are playing football in the garden while their parents watch and talk.
A cozy room with a fireplace, a green chair, books on the shelves and a sleeping cat.
Translate the sentence into French. Summarize the story in three sentences.
The system prompt sets the style; the user turn holds the request; the model replies.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 10%, $20, (a + b) * c = d, #tag, @name.
A watercolor illustration of a fox in a snowy forest, minimal, pastel colors.
Landscape photography of green hills, a river, morning fog and golden sunlight.
What do you see in this picture? I see two people walking along the beach with a dog.
Please describe the colors, the lighting, the style and the mood of the scene.
This is a photograph of an old building with large windows and a tall clock tower.
Tell me a story about a little robot who wants to learn how to paint flowers.
The weather today is sunny and warm, but it will rain in the evening and at night.
An image of a plate of pasta with tomato sauce, basil leaves and grated cheese.
Answer with one word. Is there a person in the image? Yes, there is one person.
A cinematic shot of a city skyline at dusk, reflections on the water, wide angle.
"""

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ---- chat templates (jinja) --------------------------------------------------------------------

# Plain ChatML (SmolLM2-Instruct / Qwen2-Instruct, without their default system prompt).
# Content may be a string or a list of {"type": "text", "text": ...} items.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# InternVL3-*-hf: ChatML where an image item renders as "<IMG_CONTEXT>\n" (the processor then
# expands each "<IMG_CONTEXT>" into "<img>" + N * "<IMG_CONTEXT>" + "</img>").
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# gemma-3-*-it: "<bos>", the system prompt folded into the first user turn (followed by a blank
# line), "assistant" renamed "model", text trimmed, an image item renders "<start_of_image>" (the
# processor expands it to "\n\n<start_of_image>" + N * "<image_soft_token>" + "<end_of_image>\n\n").
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# ---- tokenizer ---------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, in byte order (0x00 .. 0xff): printable Latin-1 bytes stand
    for themselves, the others are shifted to U+0100 and up (the GPT-2 byte-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    table = [symbols[b] for b in range(256)]
    assert sorted(table) == sorted(pre_tokenizers.ByteLevel.alphabet())
    return table


def _pre_tokenizer():
    """Qwen2's pre-tokenizer (regex split, then bytes -> symbols). transformers 5 rebuilds a
    ``model_type: qwen2`` folder's tokenizer as ``Qwen2Tokenizer`` with exactly this
    pre-tokenizer, so using it everywhere keeps every family's tokenization identical to what
    was built (SmolLM2 / Llama 3 split text in a similar way)."""
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as pattern
    except ImportError:  # older transformers: GPT-2's split, built into ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE learned deterministically: the most frequent pair wins, ties go to the
    lexicographically smallest pair. (The `tokenizers` trainer may break ties differently
    between processes, which would make the vocabulary non-reproducible.)"""
    pre = _pre_tokenizer()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in corpus.strip().splitlines():
        for piece, _ in pre.pre_tokenize_str(line + "\n"):
            words[tuple(piece)] += 1

    alphabet = _byte_alphabet()
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        new_words: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += freq
        words = new_words
    return vocab, merges


def _build_tokenizer(
    specials: list[str],
    chat_template: str,
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str | None = None,
    add_bos_token: bool = False,
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE + the given special tokens (appended after the BPE vocab, in the given
    order, so their ids are fixed) wrapped in a fast tokenizer with a chat template.

    ``named_tokens`` become tokenizer attributes (``tok.<name>`` / ``tok.<name>_id``), saved in
    tokenizer_config.json the way the real multimodal checkpoints store them."""
    vocab, merges = _learn_bpe(CORPUS, NUM_MERGES)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(specials)

    kwargs = dict(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        chat_template=chat_template,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    if add_bos_token:
        # Rebuilds the post-processor as "<bos> $A" (Gemma adds <bos> when encoding plain text;
        # apply_chat_template encodes with add_special_tokens=False, and the template writes it).
        kwargs["add_bos_token"] = True
    if named_tokens:
        kwargs["extra_special_tokens"] = dict(named_tokens)
    tok = PreTrainedTokenizerFast(**kwargs)
    assert len(tok) == len(vocab) + len(specials), "special tokens must not add stray ids"
    return tok


# ---- models --------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, std: float = 0.02) -> None:
    """Add noise to every parameter so that parts HF initialises to zeros or ones (Gemma's
    multimodal projection, InternVL's position embeddings, norm scales) still carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def _text_sizes() -> dict:
    return dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HIDDEN // TEXT_HEADS,
        max_position_embeddings=MAX_POSITIONS,
    )


def _save(model, tok, gen: GenerationConfig, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = gen
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _chatml_tokenizer(extra: list[str], template: str, named: dict[str, str] | None = None):
    return _build_tokenizer(
        CHATML_SPECIALS + extra,
        template,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        named_tokens=named,
    )


def make_tiny_causal_lm(path, family: str = "qwen2") -> Path:
    """A tiny random chat LM (``Qwen2ForCausalLM`` or ``LlamaForCausalLM``) at ``path``.

    hidden 32, 6 layers, 4 heads (2 KV heads), head_dim 8, tied embeddings, vocab = len(tokenizer),
    max_position_embeddings 512. ChatML template, eos = ``<|im_end|>`` (config, generation config
    and tokenizer), pad = ``<|endoftext|>``, no bos token added (Qwen2 / SmolLM2-Instruct style).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tok = _chatml_tokenizer([], CHATML_TEMPLATE)
    ids = dict(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if family == "qwen2":
        config = Qwen2Config(**_text_sizes(), rms_norm_eps=1e-6, rope_theta=1_000_000.0, **ids)
        cls = Qwen2ForCausalLM
    elif family == "llama":
        config = LlamaConfig(**_text_sizes(), rms_norm_eps=1e-5, rope_theta=100_000.0, **ids)
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"family must be 'qwen2' or 'llama', not {family!r}")

    torch.manual_seed(SEED)
    model = cls(config).eval()
    _randomize(model)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save(model, tok, gen, path)


def make_tiny_internvl(path) -> Path:
    """A tiny random ``InternVLForConditionalGeneration`` in the transformers-native "-hf" layout.

    Vision: InternViT-like, image_size 56, patch 14, hidden 16, 1 layer, 2 heads; the CLS token is
    dropped (``vision_feature_select_strategy="default"``) and a pixel shuffle with
    ``downsample_ratio`` 0.5 merges 2x2 patches, so ONE TILE produces
    ``(image_size / patch_size) ** 2 * downsample_ratio ** 2 = (56/14)^2 * 0.25 = 4`` image tokens
    (``INTERNVL_TOKENS_PER_TILE``; the real 448 px checkpoints: 256). ``config.image_seq_length`` = 4.

    Text: Qwen2, hidden 32, 6 layers. ``config.image_token_id`` = id of ``<IMG_CONTEXT>``.

    Prompt layout per image (what ``InternVLProcessor`` builds): ``"<img>" + num_tiles * 4 *
    "<IMG_CONTEXT>" + "</img>"``, with ``pixel_values`` of shape ``(num_tiles, 3, 56, 56)``.
    The tokenizer exposes ``start_image_token`` / ``end_image_token`` / ``context_image_token``
    (and ``video_token``) plus their ``*_id``, as the real InternVL3-*-hf tokenizers do.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    path = Path(path)
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = _chatml_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], INTERNVL_TEMPLATE, named)

    vision = InternVLVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=INTERNVL_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        use_mean_pooling=True,
        norm_type="layer_norm",
    )
    text = Qwen2Config(
        **_text_sizes(),
        vocab_size=len(tok),
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=INTERNVL_DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = InternVLForConditionalGeneration(config).eval()
    _randomize(model)
    gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save(model, tok, gen, path)


# Qwen2.5-VL-*-Instruct and Qwen3-VL-*-Instruct: ChatML; an image item renders
# "<|vision_start|><|image_pad|><|vision_end|>" (the processor repeats <|image_pad|> once per merged 2x2 patch group).
QWEN25VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_qwen25vl(path) -> Path:
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL-*-Instruct conventions).

    Vision: patch 14, temporal patch 2, 2x2 spatial merge, hidden 16, 2 blocks (one windowed, one
    full attention), window 56 px; an image resized to H x W (multiples of 28) gives (H/14)(W/14)
    patches and (H/28)(W/28) image tokens. Text: Qwen2-style with multimodal RoPE (mrope_section
    splitting the 4 rotary pairs of a head into 2 (time) + 1 (height) + 1 (width)), hidden 32, 6 layers.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {"depth": 2, "hidden_size": VISION_HIDDEN, "intermediate_size": VISION_INTERMEDIATE,
              "num_heads": VISION_HEADS, "patch_size": PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "window_size": 56, "out_hidden_size": TEXT_HIDDEN, "fullatt_block_indexes": [1]}
    return _make_tiny_qwen_vl(path, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision,
                              {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 1, 1]})


# Qwen3-VL: 16-px patches (32 px per image token); DeepStack after the first QWEN3VL_DEEPSTACK decoder blocks.
QWEN3VL_PATCH_SIZE = 16
QWEN3VL_DEEPSTACK = 2


def make_tiny_qwen3vl(path) -> Path:
    """A tiny random ``Qwen3VLForConditionalGeneration`` (Qwen3-VL-*-Instruct conventions).

    Vision: patch 16, temporal patch 2, 2x2 spatial merge, hidden 16, 2 blocks, a 4x4 grid of learned
    position embeddings (bilinearly resampled to each image's grid); an image resized to H x W
    (multiples of 32) gives (H/16)(W/16) patches and (H/32)(W/32) image tokens. DeepStack: the outputs
    of both vision blocks (deepstack_visual_indexes [0, 1]), each through its own merger, are added
    to the image tokens after decoder blocks 0 and 1. Text: Qwen3 (q/k norms) with interleaved
    multimodal RoPE (mrope_section [2, 1, 1] over a head's 4 rotary pairs), hidden 32, 6 layers.
    Same ChatML template and image tokens as Qwen2.5-VL.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = {"depth": 2, "hidden_size": VISION_HIDDEN, "intermediate_size": VISION_INTERMEDIATE,
              "num_heads": VISION_HEADS, "patch_size": QWEN3VL_PATCH_SIZE, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "out_hidden_size": TEXT_HIDDEN, "num_position_embeddings": 16,
              "deepstack_visual_indexes": list(range(QWEN3VL_DEEPSTACK))}
    return _make_tiny_qwen_vl(path, Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision,
                              {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 1, 1],
                               "mrope_interleaved": True})


def _make_tiny_qwen_vl(path, config_cls, model_cls, vision: dict, rope: dict) -> Path:
    """What the Qwen-VL builders share: tokenizer, special token ids, text sizes, save."""
    path = Path(path)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _chatml_tokenizer(specials, QWEN25VL_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    text = {**_text_sizes(), "vocab_size": len(tok), "rms_norm_eps": 1e-6, "bos_token_id": None,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "rope_parameters": rope}
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    _randomize(model)
    gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save(model, tok, gen, path)


def make_tiny_gemma3(path) -> Path:
    """A tiny random ``Gemma3ForConditionalGeneration`` (gemma-3-*-it conventions).

    Vision: SigLIP, image_size 84, patch 14 (6x6 = 36 patches), hidden 16, 1 layer, 2 heads, no
    head; the projector average-pools the 6x6 grid down to ``mm_tokens_per_image`` = 9 (3x3), so
    ONE IMAGE produces 9 image tokens (``GEMMA3_TOKENS_PER_IMAGE``; the real checkpoints: 256).

    Text: Gemma3, hidden 32, 6 layers (5 sliding-window + 1 global, window 128).
    ``config.boi_token_id`` / ``eoi_token_id`` / ``image_token_id`` = ids of ``<start_of_image>``,
    ``<end_of_image>``, ``<image_soft_token>``; the tokenizer exposes them as ``boi_token``,
    ``eoi_token``, ``image_token`` (+ ``*_id``).

    Prompt layout per image (what ``Gemma3Processor`` builds from the template's
    ``<start_of_image>``): ``"\\n\\n<start_of_image>" + 9 * "<image_soft_token>" +
    "<end_of_image>\\n\\n"``, ``pixel_values`` of shape ``(num_images, 3, 84, 84)``; the processor
    also returns ``token_type_ids`` (1 on soft tokens) for bidirectional attention within an image.
    Encoding plain text adds ``<bos>`` (as Gemma's tokenizer does); the chat template writes it.
    Generation stops on ``<eos>`` or ``<end_of_turn>``.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    path = Path(path)
    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ]
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _build_tokenizer(
        specials,
        GEMMA3_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        named_tokens=named,
    )
    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=GEMMA3_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )
    text = Gemma3TextConfig(
        **_text_sizes(),
        vocab_size=len(tok),
        query_pre_attn_scalar=TEXT_HIDDEN // TEXT_HEADS,
        sliding_window=128,
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    _randomize(model)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_of_turn],
        pad_token_id=tok.pad_token_id,
    )
    return _save(model, tok, gen, path)
