"""Building blocks shared by LAP, the refiner and the DiT: attention, RoPE, feed-forwards."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import guard

Rope = Tensor  # (cos, sin) of the rotation angles, float32 (B, S, head_dim / 2, 2)


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
            if not torch.compiler.is_compiling():  # compiled, Cancel lands between blocks (no graph break here)
                guard.check_cancel()
            out.append(F.scaled_dot_product_attention(q[:, :, i : i + step], k, v, attn_mask=attn_mask))
        return torch.cat(out, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def rope_angles(pos: Tensor, axes_dim: Sequence[int], theta: float) -> Rope:
    """Rotations for positions pos (B, S, n_axes); axis i rotates axes_dim[i] channels."""
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
        angles.append(pos[..., i : i + 1].float() * freqs)  # (B, S, dim / 2)
    a = torch.cat(angles, dim=-1)
    return torch.stack([a.cos(), a.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate consecutive channel pairs of x (B, S, ..., Dh) by rope (B, S, Dh / 2, 2), in fp32.

    Why a complex multiply when eager: it is a single elementwise kernel with fp32 accuracy, where
    the cos/sin form (Flux's reference) is eight (casts, four multiplies, two adds, a stack).
    Measured on this project's CPU (2 x 8 heads x 1152 tokens x 64): about 0.25 ms against 6 ms
    in fp32, 0.4 against 5 ms in bf16, equal to 5e-7. Under torch.compile the cos/sin form:
    inductor generates no code for complex numbers, and fuses this form into one kernel. Also on
    devices other than CPUs and CUDA GPUs (MPS on older macOS, DirectML have no complex numbers).
    In bf16 the result is rounded once, at the end.
    """
    B, S, half, _ = rope.shape
    rope = rope.view(B, S, *[1] * (x.ndim - 3), half, 2)
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., Dh / 2, 2): channels (2j, 2j+1)
    if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
        (x1, x2), (cos, sin) = pairs.unbind(-1), rope.unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rope))
    return out.flatten(-2).to(x.dtype)


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
        # Tokens stay (B, S, heads, Dh) and attention reads them transposed, as views: no copies
        # beside the norms and the rotation, which take q and k together where they can.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (B, S, 3, H, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1])
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        elif rope is not None:
            q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)
        else:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        out = attention(q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2), mask)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).flatten(2))


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
