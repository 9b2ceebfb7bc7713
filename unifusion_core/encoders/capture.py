"""Capturing the residual stream at the selected decoder layers with forward hooks, during a
generation (VERIFI: prefill and KV-cached decode steps) or one batched forward (encode_batch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerCapture:
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
                def before(m, args, kwargs, i=i):
                    self._store(i, args[0] if args else kwargs["hidden_states"])

                self.handles.append(self.layers[i].register_forward_pre_hook(before, with_kwargs=True))
            else:
                def after(m, args, out, i=i):
                    self._store(i, out[0] if isinstance(out, tuple) else out)

                self.handles.append(self.layers[i - 1].register_forward_hook(after))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def result(self) -> Tensor:
        return torch.stack([torch.cat(self.states[i]) for i in self.chosen], dim=1)  # (T, L, D)


class BatchCapture(LayerCapture):
    """One forward over a padded batch: keeps the `keep` positions (B, T) of every row."""

    def _store(self, index: int, h: Tensor) -> None:
        if self.states[index] or tuple(h.shape[:2]) != tuple(self.keep.shape):
            raise RuntimeError(f"expected one forward of shape {tuple(self.keep.shape)}, got {tuple(h.shape[:2])}")
        self.states[index].append(h[self.keep.to(h.device)])  # (N, D), row by row

    def result(self) -> list[Tensor]:
        flat = torch.stack([self.states[i][0] for i in self.chosen], dim=1)  # (N, L, D)
        return list(flat.split(self.keep.sum(1).tolist()))  # per row (T_r, L, D)
