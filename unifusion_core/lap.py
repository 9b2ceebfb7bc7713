"""Layerwise Attention Pooling (Sec. 2.1, App. A.1, Fig. 19)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import TransformerBlock, init_linears


class LayerwiseAttentionPooling(nn.Module):
    """Attend across the L selected VLM layers of each token, then pool them with one FC."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        heads: int = 32,
        depth: int = 2,
        mlp_ratio: float = 1.3,
        dtype=None,
        device=None,
        operations=nn,
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.hidden_size, self.num_layers = hidden_size, num_layers
        # Why: VLM residual streams grow by orders of magnitude with depth (and carry a few
        # massive activations); one RMSNorm brings every layer to a common scale before they
        # attend to each other. The paper notes SANA's RMSNorm on LLM features (Sec. 2.1).
        # Computed in float32 so that states beyond fp16's range (1e5 is not rare) stay finite.
        self.input_norm = nn.Parameter(torch.empty(hidden_size, **kw))
        # Why: attention across layers is permutation-equivariant; a learned per-layer
        # embedding tells the blocks which depth each state comes from (the paper is silent).
        self.layer_embed = nn.Parameter(torch.empty(num_layers, hidden_size, **kw))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, heads, mlp_ratio, operations=operations, **kw)
            for _ in range(depth)
        )
        # The FC pools L layers into one feature: (L * D) -> D.
        self.pool = operations.Linear(num_layers * hidden_size, hidden_size, bias=True, **kw)
        self.gradient_checkpointing = False

    def initialize_weights(self) -> None:
        init_linears(self)
        nn.init.ones_(self.input_norm)
        nn.init.normal_(self.layer_embed, std=0.02)

    def forward(self, hidden: Tensor, layer_drop: Sequence[int] = ()) -> Tensor:
        """hidden: (B, T, L, D) VLM states -> (B, T, D). layer_drop: positions in 0..L-1 to zero."""
        B, T, L, D = hidden.shape
        if (L, D) != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"LAP expects (B, T, {self.num_layers}, {self.hidden_size}) hidden states "
                f"(layers x width), got {tuple(hidden.shape)}"
            )
        # Plain parameters are cast where they are used: under ComfyUI's low-VRAM loading they may
        # stay on the offload device.
        dtype, dev = self.layer_embed.dtype, hidden.device
        x = rearrange(hidden, "b t l d -> (b t) l d").float()
        x = F.rms_norm(x, (D,), self.input_norm.to(dev, torch.float32), eps=1e-6)
        x = x.to(dtype) + self.layer_embed.to(dev)  # (B*T, L, D)
        ac = int(self.gradient_checkpointing)  # 0: none; N: every N-th block (True: every block)
        for i, block in enumerate(self.blocks):
            x = (checkpoint(block, x, use_reentrant=False) if ac and i % ac == 0 and torch.is_grad_enabled()
                 else block(x))
        if layer_drop:
            # Fig. 12: drop layers by zeroing their contribution to the pooling FC.
            keep = torch.ones(L, 1, device=x.device, dtype=x.dtype)
            keep[list(layer_drop)] = 0
            x = x * keep
        return self.pool(rearrange(x, "(b t) l d -> b t (l d)", b=B))  # (B, T, D)

    @torch.no_grad()
    def layer_weight_magnitude(self) -> Tensor:
        """Frobenius norm of the pooling FC's weights on each layer, (L,) summing to 1 (Fig. 8/11)."""
        w = self.pool.weight.detach().float().view(self.hidden_size, self.num_layers, self.hidden_size)
        norms = w.pow(2).sum(dim=(0, 2)).sqrt()
        return norms / norms.sum()
