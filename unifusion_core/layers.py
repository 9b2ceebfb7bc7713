"""Building blocks shared by LAP, the refiner and the DiT: attention, RoPE, feed-forwards."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import guard

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (B, 1, S, head_dim / 2)


# Query-key pairs (per head) per chunk of a large attention without autograd: one attention call at
# a very large size takes minutes, and between chunks a host's Cancel is honoured (guard.py). The
# algorithm depends on the sizes and the grad mode only, never on whether a host is listening.
CANCEL_SCORES = 1 << 24


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-head SDPA. q, k, v: (B, H, S, Dh); mask: (B, S) bool, True = a real key token."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    Sq, Sk = q.shape[2], k.shape[2]
    if Sq * Sk > 4 * CANCEL_SCORES and not torch.is_grad_enabled():
        # each query row attends independently: chunks of queries give the same result
        step, out = max(64, CANCEL_SCORES // Sk), []
        for i in range(0, Sq, step):
            guard.check_cancel()
            out.append(F.scaled_dot_product_attention(q[:, :, i : i + step], k, v, attn_mask=attn_mask))
        return torch.cat(out, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def rope_angles(pos: Tensor, axes_dim: Sequence[int], theta: float) -> Rope:
    """Rotary angles for positions pos (B, S, n_axes); axis i rotates axes_dim[i] channels."""
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
        angles.append(pos[..., i : i + 1].float() * freqs)  # (B, S, dim / 2)
    a = torch.cat(angles, dim=-1)[:, None]  # (B, 1, S, Dh / 2)
    return a.cos(), a.sin()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate consecutive channel pairs of x (B, H, S, Dh) by the angles in rope."""
    cos, sin = rope
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, S, Dh / 2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in DiT/Flux): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional QK-RMSNorm and RoPE."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = operations.Linear(dim, 3 * dim, bias=True, dtype=dtype, device=device)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = operations.RMSNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
            self.k_norm = operations.RMSNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor, mask: Tensor | None = None, rope: Rope | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, mask)  # (B, H, S, Dh)
        return self.proj(rearrange(out, "b h s d -> b s (h d)"))


class FeedForward(nn.Module):
    """Two-layer MLP: Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden: int, act: nn.Module, dtype=None, device=None, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden, bias=True, dtype=dtype, device=device)
        self.act = act
        self.fc2 = operations.Linear(hidden, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """The LAP / refiner block (App. A.1): RMSNorm before and after self-attention, SiLU FFN."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 1.3, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.attn_norm = operations.RMSNorm(dim, eps=1e-6, **kw)
        self.attn = SelfAttention(dim, heads, operations=operations, **kw)
        self.attn_post_norm = operations.RMSNorm(dim, eps=1e-6, **kw)
        self.mlp_norm = operations.RMSNorm(dim, eps=1e-6, **kw)
        self.mlp = FeedForward(dim, round(dim * mlp_ratio), nn.SiLU(), operations=operations, **kw)

    def forward(self, x: Tensor, mask: Tensor | None = None, rope: Rope | None = None) -> Tensor:
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), mask, rope))
        return x + self.mlp(self.mlp_norm(x))


def init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases, unit norm scales (DiT's initialize_weights)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.RMSNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
