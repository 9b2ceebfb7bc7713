"""VLMEncoder: a frozen VLM that turns a prompt and reference images into Features for LAP, with
VERIFI's rewrite written and captured in the same pass (Sec. 2, 3.1, 3.3).

The pieces live beside it: the family adapter (images, image tokens), chat.py (templating and the
prompt's span), decode.py (generation and shared-prefix KV caches), capture.py (layer hooks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..config import EncoderSpec, select_layers
from ..features import Features
from ..prompts import system_prompt_or_default
from ..tiling import TiledImage
from . import chat, decode
from .base import VisionLanguage
from .capture import LayerCapture
from .decode import EMPTY_REWRITE_ADVICE, Rewrite
from .registry import labels, vision_families

log = logging.getLogger(__name__)


class VLMEncoder:
    """A frozen VLM that turns a prompt and reference images into Features for LAP."""

    def __init__(self, model, tokenizer, adapter, name: str, chat_template: str | None = None):
        self.model, self.tokenizer, self.adapter, self.name = model, tokenizer, adapter, name
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.no_lm_head: str | None = None  # why this encoder cannot generate (a one-file encoder without its head)
        self.special_ids = chat.special_ids(tokenizer)  # asked for once; never condition as text
        self.special_tokens = chat.special_tokens(tokenizer)  # refused in prompts (chat.check_special)
        text_cfg = model.config.get_text_config()
        self.hidden_size = text_cfg.hidden_size
        self.num_layers = text_cfg.num_hidden_layers
        self.context_length = getattr(text_cfg, "max_position_embeddings", None)
        self.family = model.config.model_type
        vocab = tokenizer.get_vocab()
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.stop_ids = sorted(i for i in eos | {vocab[t] for t in chat.END_OF_TURN if t in vocab} if i is not None)
        # (system prompt, prefix ids) -> ((device, dtype), the prefix's KV cache); see encode_batch
        self.prefix_memo: dict[tuple[str, tuple[int, ...]], tuple[tuple, object]] = {}

    @property
    def device(self) -> torch.device:
        return decode.model_device(self.model)

    def memory_required(self, tokens: int) -> int:
        """Rough peak bytes of one encode beyond the weights: KV cache and activations per token."""
        bytes_ = self.model.dtype.itemsize
        return int(tokens * self.hidden_size * bytes_ * (2 * self.num_layers + 24))

    def estimate_tokens(self, prompt: str, system_prompt: str, tiled: list[TiledImage], max_new_tokens: int) -> int:
        """An upper estimate of the sequence length, before tokenizing (about 3 characters a token)."""
        image_tokens = sum(self.adapter.tokens(t) for t in tiled) if self.adapter.takes_images else 0
        return image_tokens + (len(prompt) + len(system_prompt)) // 3 + 64 + max_new_tokens

    def encoder_spec(self, layers: Sequence[int] | int | None = None, system_prompt: str | None = None) -> EncoderSpec:
        """This encoder's identity with a layer selection, for a UniFusion checkpoint."""
        return EncoderSpec(self.family, self.name, self.hidden_size, self.num_layers, self.select_layers(layers),
                           system_prompt_or_default(system_prompt))

    def select_layers(self, layers: Sequence[int] | int | None = None) -> tuple[int, ...]:
        """None: every third layer (Sec. 3.1); an int: that stride; a list: those indices."""
        return select_layers(layers, self.num_layers, self.name)

    def tile(self, images, max_tiles: int = 10, thumbnail: bool = True) -> list[TiledImage]:
        """Reference images as this model reads them (the family's tiling or native resolution;
        TiledImages it can read pass through)."""
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return []
        if not self.adapter.takes_images:
            raise ValueError(f"{self.name} is a text-only model and cannot take reference images; load a VLM "
                             f"({labels(vision_families())}) to use images")
        return self.adapter.prepare_images(list(images) if isinstance(images, (list, tuple)) else [images],
                                           max_tiles, thumbnail)

    # --- the pieces, public for benchmarks and tests ---------------------------------------------

    def prepare_prompt(self, prompt: str, tiled: Sequence[TiledImage] = (), system_prompt: str | None = None,
                       generation_prompt: bool = True) -> chat.PreparedPrompt:
        """The templated turn as the model reads it: token ids, the user's text tokens, the image
        tokens' image index, and the pixel inputs of the (already tiled) images."""
        tiled = list(tiled)
        p = chat.prepare_prompt(self.tokenizer, self.chat_template, self.adapter, self.special_ids, prompt, tiled,
                                system_prompt_or_default(system_prompt), generation_prompt, name=self.name,
                                context_length=self.context_length, specials=self.special_tokens)
        if tiled:
            p.inputs = self.adapter.pixel_inputs(tiled, self.model.dtype, self.device)
            p.inputs |= {k: v[None].to(self.device) for k, v in self.adapter.extra_inputs(p.ids).items()}
        return p

    def prefix_cache(self, ids: Tensor, system_prompt: str | None = None):
        """The memoized KV cache of a prefix ids (P,) of a templated prompt (never write to it)."""
        return decode.prefix_cache(self.model, self.prefix_memo, ids, system_prompt_or_default(system_prompt))

    def generate(self, ids: Tensor, inputs: dict, max_new_tokens: int, seed: int | None = None,
                 callback: Callable[[int, int], None] | None = None, cache=None) -> Tensor:
        """A plain generation after ids (1, S) with no capture: the tokens fed back (decode.generate)."""
        if self.no_lm_head:
            raise ValueError(self.no_lm_head)
        return decode.generate(self.model, ids, inputs, max_new_tokens, self.stop_ids,
                               decode.pad_id(self.tokenizer, self.stop_ids), seed, callback, cache)

    def clear_prefix_memo(self) -> None:
        """Forget the memoized KV caches of shared chat-template prefixes."""
        self.prefix_memo.clear()

    # --- encoding --------------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: Features may feed LAP training
    def encode(
        self,
        prompt: str,
        images=None,
        rewrite: bool = True,
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        seed: int | None = None,
        layers: Sequence[int] | int | None = None,
        max_tiles: int = 10,
        thumbnail: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> Features:
        """Encode a prompt and reference images into Features.

        rewrite=True (VERIFI): the VLM writes a detailed target prompt as its assistant turn; the
        features of those tokens are captured from the same prefill and KV-cached decode steps,
        so they attend to the original prompt and images. Conditioning: rewritten text tokens +
        all image tokens. rewrite=False: the user's text tokens + all image tokens.
        images: anything tile_images takes, or TiledImages. seed=None decodes greedily; a seed
        samples (temperature 0.7, top-p 0.9), reproducibly. callback(i, max_new_tokens) runs per
        generated token and may raise to cancel.
        """
        prompt = prompt or ""
        tiled = self.tile(images, max_tiles, thumbnail)
        if not prompt.strip() and not tiled:
            raise ValueError("empty prompt and no image: give a prompt, a reference image, or both")
        chosen = self.select_layers(layers)
        system = system_prompt_or_default(system_prompt)
        p = self.prepare_prompt(prompt, tiled, system, generation_prompt=rewrite)
        S = len(p.ids)
        budget = S + (max_new_tokens + 1 if rewrite else 0)
        if self.context_length and budget > self.context_length:
            raise ValueError(
                f"prompt and images take {S} tokens (+ {max_new_tokens + 1 if rewrite else 0} for the rewrite) = "
                f"{budget}, beyond {self.name}'s context window of {self.context_length} tokens; use fewer "
                "tiles (max_tiles), fewer images, a shorter prompt or fewer max_new_tokens"
            )
        is_image = p.image_index >= 0
        keep = is_image if rewrite else is_image | p.user_text  # prompt positions that condition
        # A rewrite of a text-only prompt starts from the KV cache of the template's system part
        # (every token before the user's text), kept per system prompt in prefix_memo: a VERIFI
        # node run with the same system prompt and another prompt skips it. Not with images, nor
        # for Qwen-VL at all: its generate() computes the 3-axis positions in a prefill that
        # starts at position 0.
        reuse = rewrite and not tiled and self.adapter.reuses_prefix and bool(p.user_text.any())
        P = int(p.user_text.nonzero()[0]) if reuse else 0
        cache = decode.batch_cache(self.prefix_cache(p.ids[:P], system), 1) if P else None  # the memoized one stays
        capture = LayerCapture(self.adapter.decoder_layers(), chosen, keep[P:])
        ids = p.ids[None].to(self.device)
        with capture:
            if rewrite:
                fed = self.generate(ids, p.inputs, max_new_tokens, seed, callback, cache)  # tokens fed back
            else:
                # the base model: no logits over the vocabulary for every position
                self.model.model(input_ids=ids, **p.inputs, use_cache=False)
                fed = torch.zeros(0, dtype=torch.long)
        hidden = capture.result()  # (keep.sum() + len(fed), L, D): nothing of the cached prefix conditions

        rewrite_keep = ~torch.isin(fed, self.special_ids)
        cond = torch.cat([keep, rewrite_keep])  # over sequence_ids
        hidden = hidden[torch.cat([torch.ones(int(keep.sum()), dtype=torch.bool), rewrite_keep])]
        if rewrite:
            text = self.tokenizer.decode(fed[rewrite_keep], skip_special_tokens=True).strip()
            if not bool(rewrite_keep.any()) and not tiled:
                raise ValueError(f"{self.name} wrote an empty rewrite; {EMPTY_REWRITE_ADVICE}")
            if not text:  # only whitespace: the request's words do not reach the image (VERIFI Rewrite refuses it)
                log.warning("%s wrote an empty rewrite (%d whitespace tokens); %s", self.name, int(rewrite_keep.sum()),
                            EMPTY_REWRITE_ADVICE)
        else:
            text = prompt
        image_index = torch.cat([p.image_index, torch.full((len(fed),), -1)])[cond]
        return Features(hidden=hidden.cpu(), encoder=self.encoder_spec(chosen, system), text=text,
                        sequence_ids=torch.cat([p.ids, fed]).tolist(), positions=cond.nonzero().flatten(),
                        is_image=image_index >= 0, image_index=image_index, rewrite=rewrite)

    # --- many text prompts at once (training) ----------------------------------------------------

    @torch.no_grad()
    def encode_batch(
        self,
        prompts: list[str],
        rewrite: bool = False,
        system_prompt: str | None = None,
        layers: Sequence[int] | int | None = None,
        batch_size: int = 32,
        rewrites: Sequence[Rewrite | Sequence[int]] | None = None,
        max_new_tokens: int = 256,
        images: Sequence | None = None,
        max_tiles: int = 10,
        thumbnail: bool = True,
    ) -> list[Features]:
        """Features of many prompts, in input order, equal to `encode` one prompt at a time.

        images: per prompt, its reference images (anything `encode` takes, or None), for families
        that read images in one plain forward (`batches_images`: InternVL; not Gemma-3's
        bidirectional image attention nor Qwen-VL's 3-axis positions); a prompt with images may be
        empty. With images, rewrite=False only (what the trainer encodes).

        rewrite=False: as encode(p, rewrite=False). rewrite=True (teacher-forced VERIFI): one plain
        forward over [template + prompt + generation prompt + rewrite ids] gives the features that
        encode(p, rewrite=True) captures while generating those ids. `rewrites` come from
        rewrite_batch (or are token ids); without them they are made here, greedily, up to
        max_new_tokens. The chat-template prefix shared by all prompts runs once (memoized across
        calls in prefix_memo); every batch of suffixes, sorted by length, reuses its KV cache.
        """
        tiled = self._batch_images(prompts, images, "encode_batch", max_tiles, thumbnail)
        if rewrite and any(tiled):
            raise ValueError("encode_batch encodes prompts with images without rewriting (rewrite=False); "
                             "for VERIFI with images call encode(prompt, images, rewrite=True) per prompt")
        texts = chat.check_prompts(prompts, "encode_batch", self.special_tokens, self.name, [bool(t) for t in tiled])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = self.select_layers(layers)
        system = system_prompt_or_default(system_prompt)
        if not rewrite and rewrites is not None:
            raise ValueError("rewrites were given with rewrite=False; pass rewrite=True to encode the rewrites")
        if rewrite and rewrites is None:
            rewrites = self.rewrite_batch(texts, system, max_new_tokens, batch_size=batch_size)
        if rewrite and len(rewrites) != len(texts):
            raise ValueError(f"{len(rewrites)} rewrites for {len(texts)} prompts: give one rewrite per prompt")
        fed = [decode.rewrite_ids(r) for r in rewrites] if rewrite else [torch.zeros(0, dtype=torch.long)] * len(texts)
        keep_fed = [~torch.isin(f, self.special_ids) for f in fed]  # rewrite tokens that condition
        for i, k in enumerate(keep_fed):
            if rewrite and not bool(k.any()):
                raise ValueError(
                    f"rewrite {i} is empty (no text tokens) for prompt {texts[i]!r}; make it again or use rewrite=False"
                )
        prepared = [self.prepare_prompt(t, ti, system, generation_prompt=rewrite) for t, ti in zip(texts, tiled)]
        for i, (p, f) in enumerate(zip(prepared, fed)):
            self._check_context(len(p.ids) + len(f), f"prompt {i} and its {len(f)} rewrite tokens take",
                                "fewer rewrite tokens")

        P = decode.shared_prefix(prepared)
        prefix = self.prefix_cache(prepared[0].ids[:P], system)
        # Per prompt: the tokens after the prefix and which of them condition.
        suffixes = [torch.cat([p.ids[P:], f]) for p, f in zip(prepared, fed)]
        keep_prompt = [torch.zeros_like(p.user_text) if rewrite else p.user_text | (p.image_index >= 0)
                       for p in prepared]
        keeps = [torch.cat([k[P:], kf]) for k, kf in zip(keep_prompt, keep_fed)]
        hidden: list[Tensor | None] = [None] * len(texts)
        pad = decode.pad_id(self.tokenizer, self.stop_ids)
        for batch in decode.length_batches(suffixes, batch_size):
            states = decode.forward_suffixes(self.model, self.adapter.decoder_layers(), prefix, P,
                                             [suffixes[i] for i in batch], [keeps[i] for i in batch], chosen, pad,
                                             self._pixels(prepared, batch))
            for i, h in zip(batch, states):
                hidden[i] = h.cpu()  # (T_i, L, D)

        out = []
        spec = self.encoder_spec(chosen, system)
        for i, (t, p, f) in enumerate(zip(texts, prepared, fed)):
            cond = torch.cat([keep_prompt[i], keep_fed[i]])  # over sequence_ids
            text = self.tokenizer.decode(f[keep_fed[i]], skip_special_tokens=True).strip() if rewrite else t
            image_index = torch.cat([p.image_index, torch.full((len(f),), -1, dtype=p.image_index.dtype)])[cond]
            out.append(Features(
                hidden=hidden[i], encoder=spec, text=text, sequence_ids=torch.cat([p.ids, f]).tolist(),
                positions=cond.nonzero().flatten(), is_image=image_index >= 0, image_index=image_index,
                rewrite=rewrite,
            ))
        return out

    @property
    def batches_images(self) -> bool:
        """Whether encode_batch and rewrite_batch take images: the family reads them in one plain forward."""
        a = type(self.adapter)
        return a.takes_images and a.reuses_prefix and a.extra_inputs is VisionLanguage.extra_inputs

    def _batch_images(self, prompts, images, caller: str, max_tiles: int, thumbnail: bool) -> list[list[TiledImage]]:
        """Each prompt's tiled images for a batched call ([] without), or ValueError when this family
        cannot take them in one batched forward."""
        if images is None:
            return [[] for _ in range(len(prompts) if isinstance(prompts, Sequence) else 0)]
        if isinstance(prompts, str) or len(images) != len(prompts):
            raise ValueError(f"{caller}: images must give one entry (None or images) per prompt; got "
                             f"{len(images)} for {1 if isinstance(prompts, str) else len(prompts)} prompts")
        if any(im is not None for im in images) and not self.batches_images:
            raise ValueError(f"{self.name} ({self.adapter.label}) cannot read images in one batched forward; "
                             "call encode(prompt, images) per prompt")
        return [self.tile(im, max_tiles, thumbnail) if im is not None else [] for im in images]

    @staticmethod
    def _pixels(prepared: list, rows: Sequence[int]) -> dict | None:
        """The pixel inputs of the rows' images, in row order (the model fills its image tokens so)."""
        found = [prepared[i].inputs["pixel_values"] for i in rows if "pixel_values" in prepared[i].inputs]
        return {"pixel_values": torch.cat(found)} if found else None

    @torch.no_grad()
    def rewrite_batch(
        self,
        prompts: list[str],
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        seed: int | None = None,
        batch_size: int = 32,
        images: Sequence | None = None,
        max_tiles: int = 10,
        thumbnail: bool = True,
    ) -> list[Rewrite]:
        """VERIFI rewrites of many prompts, made once for teacher-forced encode_batch.

        seed=None: batched greedy decoding over the shared prefix cache, the same tokens as
        encode(p, rewrite=True) up to floating-point ties. A seed samples one prompt at a time
        through encode's own generate call, so each rewrite is exactly encode(p, seed=seed)'s.
        images: per prompt, its reference images or None, as encode_batch takes them.
        """
        tiled = self._batch_images(prompts, images, "rewrite_batch", max_tiles, thumbnail)
        texts = chat.check_prompts(prompts, "rewrite_batch", self.special_tokens, self.name, [bool(t) for t in tiled])
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
        if self.no_lm_head:
            raise ValueError(self.no_lm_head)
        system = system_prompt_or_default(system_prompt)
        prepared = [self.prepare_prompt(t, ti, system, generation_prompt=True) for t, ti in zip(texts, tiled)]
        for i, p in enumerate(prepared):
            self._check_context(len(p.ids) + max_new_tokens + 1,
                                f"prompt {i} (+ {max_new_tokens + 1} for the rewrite) takes", "fewer max_new_tokens")
        if seed is not None:
            fed = [self.generate(p.ids[None].to(self.device), p.inputs, max_new_tokens, seed) for p in prepared]
        else:
            P = decode.shared_prefix(prepared)
            prefix = self.prefix_cache(prepared[0].ids[:P], system)
            suffixes = [p.ids[P:] for p in prepared]
            fed = [None] * len(texts)
            pad = decode.pad_id(self.tokenizer, self.stop_ids)
            # Left padding shifts what a sliding window covers (it counts cache slots, pads included):
            # such models (Gemma 3) batch only prompts of equal length.
            sliding = any(getattr(layer, "is_sliding", False) for layer in getattr(prefix, "layers", []))
            for batch in decode.length_batches(suffixes, batch_size, same_length=sliding):
                rows = decode.greedy(self.model, prefix, P, [suffixes[i] for i in batch], max_new_tokens,
                                     self.stop_ids, pad, self._pixels(prepared, batch))
                for i, f in zip(batch, rows):
                    fed[i] = f
        return [Rewrite(tuple(f.tolist()), self._text(f)) for f in fed]

    def _text(self, fed: Tensor) -> str:
        return self.tokenizer.decode(fed[~torch.isin(fed, self.special_ids)], skip_special_tokens=True).strip()

    def _check_context(self, tokens: int, what: str, fix: str) -> None:
        if self.context_length and tokens > self.context_length:
            raise ValueError(
                f"{what} {tokens} tokens, beyond {self.name}'s context window of {self.context_length} tokens; "
                f"use a shorter prompt or {fix}"
            )


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
