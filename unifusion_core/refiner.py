"""Bidirectional refiner (Sec. 3.2, App. A.3): undoes the causal VLM's position bias."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import TransformerBlock, init_linears, rope_angles


class Refiner(nn.Module):
    """Full self-attention blocks over the pooled token sequence, then projection to the DiT width."""

    def __init__(
        self,
        hidden_size: int,
        out_size: int,
        heads: int = 32,
        depth: int = 2,
        mlp_ratio: float = 1.3,
        rope_theta: float = 10_000.0,
        dtype=None,
        device=None,
        operations=nn,
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.head_dim, self.rope_theta = hidden_size // heads, rope_theta
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, heads, mlp_ratio, operations=operations, **kw)
            for _ in range(depth)
        )
        # Why: a final norm bounds the residual stream before it enters the DiT (pre-norm
        # transformers end with one); the paper does not say.
        self.norm = operations.RMSNorm(hidden_size, eps=1e-6, **kw)
        self.proj = operations.Linear(hidden_size, out_size, bias=True, **kw)
        self.gradient_checkpointing = False

    def initialize_weights(self) -> None:
        init_linears(self)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D) pooled features; mask: (B, T) bool, True = real token -> (B, T, out)."""
        B, T, _ = x.shape
        # Why 1-D RoPE: the blocks are bidirectional, so token order must come from somewhere;
        # Lumina-Image 2.0's context refiner does the same. Right padding keeps positions fixed.
        pos = torch.arange(T, device=x.device)[None, :, None].expand(B, T, 1)
        rope = rope_angles(pos, [self.head_dim], self.rope_theta)
        ac = int(self.gradient_checkpointing)  # 0: none; N: every N-th block (True: every block)
        for i, block in enumerate(self.blocks):
            if ac and i % ac == 0 and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, rope, use_reentrant=False)
            else:
                x = block(x, mask, rope)
        return self.proj(self.norm(x))
