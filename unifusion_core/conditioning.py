"""Conditioning: what LAP + the refiner hand the DiT, and how the sampler batches it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Conditioning:
    """DiT-width conditioning tokens with a key-padding mask (True = real token)."""

    tokens: Tensor  # (B, T, D)
    mask: Tensor  # (B, T) bool

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def expand(self, batch_size: int) -> Conditioning:
        """Broadcast a batch of one to batch_size; a matching batch is returned as is."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"conditioning has batch {self.batch_size}; it must be 1 or the requested "
                f"batch size {batch_size}"
            )
        return Conditioning(self.tokens.expand(batch_size, -1, -1), self.mask.expand(batch_size, -1))

    def to(self, device) -> Conditioning:
        return Conditioning(self.tokens.to(device), self.mask.to(device))

    def by_length(self, max_padding: int = 0) -> list[tuple[Tensor | None, Conditioning]]:
        """The rows grouped into DiT calls by their length without trailing padding, each group cut
        to its longest row: [(row indices, or None for all rows; those rows)], longest first.

        Padding is masked out of every key, so a row computes the same without it (up to float
        rounding) in fewer FLOPs, and with no attention mask once none is left. Shorter rows join
        the group before them while the group's padding (rows x tokens short of its longest row)
        stays within `max_padding` tokens, since every extra call has a fixed cost too:
        max_padding 0 gives one group per length. Padding inside a row (not at its end) stays,
        masked, since cutting it would move the tokens after it.
        """
        T = self.mask.shape[1]
        lengths = (T - self.mask.flip(1).int().argmax(1)).tolist()  # last real token + 1 (T if none)
        groups: list[tuple[list[int], int]] = []  # (lengths, padding), the group's longest first
        for L in sorted(set(lengths), reverse=True):
            pad = lengths.count(L) * (groups[-1][0][0] - L) if groups else 0
            if groups and groups[-1][1] + pad <= max_padding:
                groups[-1] = (groups[-1][0] + [L], groups[-1][1] + pad)
            else:
                groups.append(([L], 0))
        if len(groups) == 1:
            L = groups[0][0][0]
            return [(None, self if L == T else Conditioning(self.tokens[:, :L], self.mask[:, :L]))]
        out = []
        for group, _ in groups:
            rows = torch.tensor([i for i, n in enumerate(lengths) if n in group], device=self.tokens.device)
            out.append((rows, Conditioning(self.tokens[rows, : group[0]], self.mask[rows, : group[0]])))
        return out

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Stack along the batch, right-padding shorter sequences (padding is masked out)."""
        T = max(c.tokens.shape[1] for c in conds)
        tokens = torch.cat([F.pad(c.tokens, (0, 0, 0, T - c.tokens.shape[1])) for c in conds])
        mask = torch.cat([F.pad(c.mask, (0, T - c.mask.shape[1]), value=False) for c in conds])
        return Conditioning(tokens, mask)
