"""System prompts: the VERIFI rewriting instruction (Sec. 3.3)."""

from __future__ import annotations

# Written for this project. VERIFI trains and samples with the same system prompt; a checkpoint
# records the one it was trained with (EncoderSpec.system_prompt), and users may replace it.
VERIFI_SYSTEM_PROMPT = (
    "You write the prompt for an image generator. Read the user's request and look at any images "
    "they give. Then describe, in one detailed paragraph, the single image that should be created: "
    "the main subjects and how they look, what they do and where they are, the setting, lighting, "
    "colors, composition, camera and style. If the user asks to change an image, describe the "
    "changed image in full and keep everything they did not ask to change. If the request is a "
    "riddle or a reference, name the concrete things it points to. Write in English, at most 120 "
    "words, and reply with the description only."
)


def system_prompt_or_default(system_prompt: str | None) -> str:
    """The system prompt to use: VERIFI's default for None; any string as given ("" = none)."""
    return VERIFI_SYSTEM_PROMPT if system_prompt is None else system_prompt
