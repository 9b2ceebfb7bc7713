"""Generation for VERIFI: transformers' generate with every knob set, our own batched greedy decoder
over a shared prefix, and the KV caches of shared chat-template prefixes (memoized per encoder)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .capture import BatchCapture
from .chat import PreparedPrompt

# Sampling settings when a seed is given (greedy otherwise).
TEMPERATURE, TOP_P = 0.7, 0.9
# KV caches of shared chat-template prefixes kept per encoder (one per system prompt in practice).
PREFIX_MEMO_SIZE = 4

EMPTY_REWRITE_ADVICE = ("try another seed with sample on, change the system prompt, or turn rewrite off to "
                        "condition on the prompt itself")


@dataclass(frozen=True)
class Rewrite:
    """A VERIFI rewrite made once, offline: the generated tokens fed back into the model, and their text."""

    ids: tuple[int, ...]  # what encode(prompt, rewrite=True) feeds back (the stop token is never fed)
    text: str  # the rewrite's non-special tokens, decoded and stripped (= Features.text)


def model_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the `compute_device` a host set on it (ComfyUI's low-VRAM loading keeps
    some of the weights in RAM and casts them to that device layer by layer, so the first parameter
    may lie elsewhere), else where its first parameter is."""
    return getattr(model, "compute_device", None) or next(model.parameters()).device


def rewrite_ids(r: Rewrite | Sequence[int] | Tensor) -> Tensor:
    """A Rewrite's (or a flat list's) token ids as a (N,) tensor."""
    ids = torch.as_tensor(r.ids if isinstance(r, Rewrite) else r, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"a rewrite is a Rewrite or a flat list of token ids, got a tensor of shape "
                         f"{tuple(ids.shape)}")
    return ids


def cache_kwarg(module: nn.Module) -> str:
    """The name a model's forward takes its KV cache by ('cache' from transformers 5.2x, else 'past_key_values')."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def pad_id(tokenizer, stop_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def generate(model, ids: Tensor, inputs: dict, max_new_tokens: int, stop_ids: Sequence[int], pad: int,
             seed: int | None = None, callback: Callable[[int, int], None] | None = None, cache=None) -> Tensor:
    """transformers' generate after ids (1, S): the generated tokens that were fed back into the
    model (the stop token and the one token past max_new_tokens never are). seed=None: greedy; a
    seed samples (TEMPERATURE, TOP_P) reproducibly, leaving the global RNG alone. callback(i, n)
    per generated token. cache: the KV cache of a prefix of ids (the prefill then runs only the rest)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

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
        eos_token_id=list(stop_ids),
        pad_token_id=pad,
    )
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    rng = torch.random.fork_rng(devices=cuda) if sample else contextlib.nullcontext()
    with rng:
        if sample:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **inputs,
            generation_config=gen, stopping_criteria=StoppingCriteriaList([Progress()]),
            **({} if cache is None else {cache_kwarg(model): cache}),
        )
    generated = out[0, ids.shape[1]:].cpu()
    return generated[:-1][:max_new_tokens]


# --- shared prefixes --------------------------------------------------------------------------


def prefix_cache(model, memo: dict, ids: Tensor, system: str):
    """The KV cache of a shared prefix ids (P,) (batch 1), computed once per (system prompt, prefix
    ids) and kept in memo (least recently used out beyond PREFIX_MEMO_SIZE). Never write to it:
    batch_cache makes the copies a forward may extend."""
    from transformers import DynamicCache

    device = model_device(model)
    key, where = (system, tuple(ids.tolist())), (device, model.dtype)
    hit = memo.pop(key, None)
    if hit is None or hit[0] != where:  # (ComfyUI may have moved the model since)
        cache = DynamicCache(config=model.config)
        if len(ids):
            lm = model.model
            lm(input_ids=ids[None].to(device), use_cache=True, **{cache_kwarg(lm): cache})  # (1, P)
        hit = (where, cache)
    while len(memo) >= PREFIX_MEMO_SIZE:
        memo.pop(next(iter(memo)))
    memo[key] = hit
    return hit[1]


def batch_cache(prefix, B: int):
    """A copy of the prefix cache for a batch of B rows (the memoized one is never written)."""
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(B)
    return cache


def shared_prefix(prepared: list[PreparedPrompt]) -> int:
    """How many leading tokens every templated prompt shares, ending before any user text or image token.

    Compared as token ids of each whole templated prompt, so a BPE merge across the boundary
    between template and user text simply ends the shared prefix earlier.
    """
    def own(p: PreparedPrompt) -> int:  # where the prompt's own tokens start: its first text or image token
        mine = p.user_text | (p.image_index >= 0)
        return int(mine.nonzero()[0, 0]) if mine.any() else len(p.ids) - 1

    cap = min(min(len(p.ids) - 1, own(p)) for p in prepared)
    first = prepared[0].ids[:cap]
    same = torch.stack([p.ids[:cap] == first for p in prepared]).all(0)  # (cap,)
    return int(same.long().cumprod(0).sum())


def length_batches(seqs: list[Tensor], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Indices of seqs in batches of similar (or, same_length, equal) lengths, longest first, to limit padding."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups = [order]
    if same_length:
        groups = [[i for i in order if len(seqs[i]) == n] for n in dict.fromkeys(len(seqs[i]) for i in order)]
    return [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def forward_suffixes(model, layers: nn.ModuleList, prefix, P: int, seqs: list[Tensor], keeps: list[Tensor],
                     chosen: tuple[int, ...], pad: int, inputs: dict | None = None) -> list[Tensor]:
    """One forward of right-padded suffixes after the cached prefix; the `keeps` positions' states
    at the chosen layers per row, (T_r, L, D) each. inputs: the pixel inputs of the rows' images, in
    row order (the model puts them at its image tokens in that order)."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros(B, P + T, dtype=torch.long)  # over [prefix ; suffix]
    keep = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :P] = 1
    for r, (s, k) in enumerate(zip(seqs, keeps)):
        ids[r, : len(s)], mask[r, P : P + len(s)], keep[r, : len(s)] = s, 1, k
    positions = (P + torch.arange(T)).expand(B, T)  # continuing after the prefix
    dev = model_device(model)
    with BatchCapture(layers, chosen, keep) as capture:
        model.model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=True,
            **{cache_kwarg(model.model): batch_cache(prefix, B)}, **(inputs or {}),
        )
    return capture.result()


def greedy(model, prefix, P: int, seqs: list[Tensor], max_new_tokens: int, stop_ids: Sequence[int],
           pad: int, inputs: dict | None = None) -> list[Tensor]:
    """Greedy decoding of left-padded suffixes after the cached prefix: the tokens fed back, per row.

    As generate: generation ends at a stop token (never fed) or after max_new_tokens fed tokens.
    inputs: the pixel inputs of the rows' images, in row order, for the first forward.
    """
    dev = model_device(model)
    B, T = len(seqs), max(len(s) for s in seqs)
    stop = torch.tensor(list(stop_ids), device=dev)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros(B, P + T, dtype=torch.long)  # over [prefix ; pads ; suffix]
    positions = torch.full((B, T), P, dtype=torch.long)  # pads: any position, they are masked
    mask[:, :P] = 1
    for r, s in enumerate(seqs):
        ids[r, T - len(s) :], mask[r, P + T - len(s) :] = s, 1
        positions[r, T - len(s) :] = P + torch.arange(len(s))
    cache, kw = batch_cache(prefix, B), cache_kwarg(model)
    last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
    logits_kw = {"logits_to_keep": 1} if last_only else {}
    step_ids, step_pos, mask = ids.to(dev), positions.to(dev), mask.to(dev)
    rows = list(range(B))  # the input rows still generating, in cache order
    fed: list[list[int]] = [[] for _ in range(B)]
    first = inputs or {}
    while True:
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    **{kw: cache}, **logits_kw, **first)
        first = {}
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
