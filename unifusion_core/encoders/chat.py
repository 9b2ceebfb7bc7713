"""Chat formatting for every family: the templated turn, where the user's own text lands in it,
image placeholders expanded into image tokens, and the checks on text before any tokenizer sees it.

Text holding one of the tokenizer's special tokens (`<|im_end|>`, `<bos>`, a tool token) is refused,
not tokenised differently: the tokenizer reads such a string as the control token wherever it is,
so a prompt could end its own turn and write a new system turn. Splitting it into plain text
(`split_special_tokens`) would need the user's span tokenised apart from the template around it,
which can tokenise the boundaries differently from the whole turn; and text about `<|im_end|>` is
rarely what an image prompt means. The same holds for the system prompt: it sits in the same
template, and a turn marker there forges turns just the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..tiling import TiledImage

# End-of-turn tokens of common chat templates (ChatML, Gemma, Llama 3, Phi).
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# No tokenizer packs text this densely (whitespace runs and long words stay under ~16 characters
# a token): text longer than this many characters per context token cannot fit, and is refused
# before tokenizing it (tokenizing a prompt of many megabytes takes minutes and gigabytes).
MAX_CHARS_PER_TOKEN = 32

MARKER = "UNIFUSIONUSERTEXT"  # rendered in place of the user's text to find where it lands

# Qwen's ChatML with image items (Qwen2.5-VL writes <|vision_start|><|image_pad|><|vision_end|> for
# each), for the one-file Qwen encoders whose tokenizer folders carry no template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ THINK }}{% endif %}"
)


def chatml(think: bool) -> str:
    """CHATML; think: with Qwen3's empty reasoning block, which asks for a direct answer (its non-thinking mode)."""
    return CHATML.replace("{{ THINK }}", "<think>\n\n</think>\n\n" if think else "")


@dataclass
class PreparedPrompt:
    """A templated turn, tokenized, with images expanded (VLMEncoder.prepare_prompt)."""

    ids: Tensor  # (S,) token ids of the templated prompt with images expanded
    user_text: Tensor  # (S,) bool: tokens of the user's own text
    image_index: Tensor  # (S,) which image an image token belongs to, -1 elsewhere
    inputs: dict = field(default_factory=dict)  # pixel_values etc.


def check_text(text, what: str, name: str, context_length: int | None) -> None:
    """ValueError for what no tokenizer should see: a non-string, invalid Unicode, absurd length."""
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be text (str), got {type(text).__name__}")
    limit = MAX_CHARS_PER_TOKEN * (context_length or 131072)
    if len(text) > limit:
        raise ValueError(f"the {what} is {len(text):,} characters: far beyond what {name}'s context window of "
                         f"{context_length or 'at most 131072'} tokens can hold; shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {what} is not valid Unicode (character {e.start} is {text[e.start]!r}, a lone "
                         "surrogate); send it as UTF-8 text") from None


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer reads as control tokens wherever they occur in text: its special
    tokens (BOS/EOS, pad, turn markers) and the added tokens marked special (tool, image, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    found = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def special_ids(tokenizer) -> Tensor:
    """The ids of special_tokens(tokenizer), sorted: the tokens that never condition as text."""
    # tokenizer.all_special_ids alone misses added tokens marked special (SmolLM2's <filename>,
    # <jupyter_code>, ...), which decode(skip_special_tokens=True) drops: such a token in a rewrite
    # conditioned the image while Features.text did not show it.
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def check_special(text: str, what: str, specials: Sequence[str], name: str) -> None:
    """ValueError naming the first of the tokenizer's special tokens in text (see the module's docstring);
    what: "the prompt", "prompt 3", ..."""
    found = sorted((text.find(t), -len(t), t) for t in specials if t in text)
    if not found:
        return
    at, _, token = found[0]
    others = sorted({t for *_, t in found[1:]} - {token})
    also = f" (and also {', '.join(map(repr, others[:5]))}{', ...' if len(others) > 5 else ''})" if others else ""
    raise ValueError(f"{what} contains {token!r} at character {at}{also}: a special token of {name}'s tokenizer "
                     "(a turn marker, BOS/EOS or tool token): the model would read it as that control token, not as "
                     f"text; remove it from {what}")


def check_prompts(prompts, caller: str, specials: Sequence[str], name: str,
                  with_images: Sequence[bool] | None = None) -> list[str]:
    """A list of text prompts without special tokens, each non-empty unless it comes with images
    (with_images[i]), or ValueError naming the bad item."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"{caller} takes a list of prompts, got {type(prompts).__name__}; wrap one prompt in a list")
    for i, t in enumerate(prompts):
        if not isinstance(t, str):
            raise ValueError(
                f"{caller} takes text-only prompts (str), but item {i} is a {type(t).__name__}; encode a prompt "
                "with reference images one at a time with VLMEncoder.encode(prompt, images)"
            )
        if not t.strip() and not (with_images and with_images[i]):
            raise ValueError(f"{caller}: prompt {i} is empty; give every prompt some text (or images)")
        check_special(t, f"prompt {i}", specials, name)
    return list(prompts)


def render(tokenizer, chat_template: str | None, content, system: str, generation_prompt: bool) -> str:
    """One user turn (after the system prompt, when there is one) through the chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt,
        enable_thinking=False,  # Qwen3 / SmolLM3 would think aloud into the rewrite; others ignore it
    )


def prepare_prompt(tokenizer, chat_template: str | None, adapter, special_ids: Tensor, prompt: str,
                   tiled: list[TiledImage], system: str, generation_prompt: bool, *, name: str,
                   context_length: int | None, specials: Sequence[str]) -> PreparedPrompt:
    """Chat-template the turn, expand image placeholders, tokenize, and mark the user's text
    (the pixel inputs are the caller's: VLMEncoder.prepare_prompt)."""
    a = adapter
    for what, t in (("prompt", prompt), ("system prompt", system)):
        check_text(t, what, name, context_length)
    if not chat_template:
        raise ValueError(f"{name} has no chat template; VERIFI needs an instruction-tuned chat model")
    if a.takes_images and a.placeholder() in prompt:
        raise ValueError(f"the prompt contains the image token {a.placeholder()!r}; remove it and pass images instead")
    for what, t in (("the prompt", prompt), ("the system prompt", system)):
        check_special(t, what, specials, name)

    def content(text: str):
        return [{"type": "image"} for _ in tiled] + [{"type": "text", "text": text}] if a.takes_images else text

    text = render(tokenizer, chat_template, content(prompt), system, generation_prompt)
    # Where the user's text lands: render once more with a marker in its place. Templates may
    # trim the text, and it may also occur in the system prompt or the template itself.
    marked = render(tokenizer, chat_template, content(MARKER), system, generation_prompt)
    start = marked.find(MARKER)
    written = next((t for t in (prompt, prompt.strip()) if text[start : start + len(t)] == t), None)
    if start < 0 or written is None or text[:start] != marked[:start]:
        raise ValueError(f"cannot find the prompt in {name}'s chat template output")
    user_span = (start, start + len(written))
    if tiled:
        text, user_span = expand_images(text, user_span, adapter, tiled, name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
    user_text = (offsets[:, 1] > user_span[0]) & (offsets[:, 0] < user_span[1]) & ~torch.isin(ids, special_ids)
    image_index = torch.full_like(ids, -1)
    if tiled:
        is_img = ids == a.image_token_id()
        counts = [a.tokens(t) for t in tiled]
        if int(is_img.sum()) != sum(counts):
            raise ValueError(
                f"{name}: {int(is_img.sum())} image tokens in the prompt, expected {sum(counts)}; "
                "the tokenizer does not match the model"
            )
        image_index[is_img] = torch.repeat_interleave(torch.arange(len(tiled)), torch.tensor(counts))
        user_text &= ~is_img
    return PreparedPrompt(ids, user_text, image_index)


def expand_images(text: str, user_span: tuple[int, int], adapter, tiled: list[TiledImage],
                  name: str) -> tuple[str, tuple[int, int]]:
    """Each image placeholder the template wrote replaced by the image's tokens; the user's span moved along."""
    a = adapter
    parts = text.split(a.placeholder())
    if len(parts) != len(tiled) + 1:
        raise ValueError(
            f"the chat template of {name} wrote {len(parts) - 1} image placeholders "
            f"{a.placeholder()!r} for {len(tiled)} images: the template does not match this model"
        )
    shift, at = 0, len(parts[0])  # expansions before the user's text move it right
    expanded = parts[0]
    for t, part in zip(tiled, parts[1:]):
        image = a.expand(t)
        if at < user_span[0]:
            shift += len(image) - len(a.placeholder())
        expanded += image + part
        at += len(a.placeholder()) + len(part)
    return expanded, (user_span[0] + shift, user_span[1] + shift)
