"""Plain, loop-heavy reference implementations to check the fast modules against.

Written from the equations, not from the modules: per-token loops, per-head loops, explicit
softmax, RoPE as complex multiplication, patches cut out by slicing.
"""

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def rotate(x, pos, axes_dim, theta):
    """x: (S, Dh) one head; pos: (S, n_axes). Pairs (2j, 2j+1) as complex numbers."""
    S, Dh = x.shape
    z = torch.complex(x[:, 0::2].double(), x[:, 1::2].double())  # (S, Dh/2)
    angles = []
    for a, d in enumerate(axes_dim):
        for j in range(d // 2):
            angles.append(pos[:, a].double() * theta ** (-2.0 * j / d))
    ang = torch.stack(angles, dim=-1)  # (S, Dh/2)
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.stack([z.real, z.imag], dim=-1).reshape(S, Dh).float()


def self_attention(x, attn, heads, mask=None, pos=None, axes_dim=None, theta=10_000.0):
    """x: (S, D) one sequence; mask: (S,) bool of keys; pos: (S, n_axes) or None."""
    S, D = x.shape
    dh = D // heads
    q, k, v = linear(x, attn.qkv).split(D, dim=-1)
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
        if attn.q_norm is not None:
            qh, kh = rms(qh, attn.q_norm.weight), rms(kh, attn.k_norm.weight)
        if pos is not None:
            qh, kh = rotate(qh, pos, axes_dim, theta), rotate(kh, pos, axes_dim, theta)
        scores = qh @ kh.T / math.sqrt(dh)  # (S, S)
        if mask is not None:
            scores = scores.masked_fill(~mask[None, :], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vh)
    return linear(torch.cat(outs, dim=-1), attn.proj)


def lap_refiner_block(x, blk, heads, mask=None, pos=None, theta=10_000.0):
    axes = None if pos is None else [x.shape[-1] // heads]
    a = self_attention(rms(x, blk.attn_norm.weight), blk.attn, heads, mask, pos, axes, theta)
    x = x + rms(a, blk.attn_post_norm.weight)
    h = rms(x, blk.mlp_norm.weight)
    return x + linear(F.silu(linear(h, blk.mlp.fc1)), blk.mlp.fc2)


def lap(hidden, module, heads, drop=()):
    """hidden: (B, T, L, D) -> (B, T, D), one token at a time."""
    B, T, L, D = hidden.shape
    out = torch.zeros(B, T, D)
    for b in range(B):
        for t in range(T):
            x = rms(hidden[b, t], module.input_norm) + module.layer_embed  # (L, D)
            for blk in module.blocks:
                x = lap_refiner_block(x, blk, heads)
            x = x.clone()
            for i in drop:
                x[i] = 0
            out[b, t] = linear(x.reshape(L * D), module.pool)
    return out


def refiner(x, module, heads, mask=None):
    """x: (B, T, D); mask: (B, T) -> (B, T, out)."""
    B, T, _ = x.shape
    outs = []
    for b in range(B):
        h = x[b]
        pos = torch.arange(T)[:, None].float()
        for blk in module.blocks:
            h = lap_refiner_block(h, blk, heads, None if mask is None else mask[b], pos, module.rope_theta)
        outs.append(linear(rms(h, module.norm.weight), module.proj))
    return torch.stack(outs)


def dit(module, x, t, cond, mask=None):
    """The DiT forward, one sample at a time, patches cut out by slicing."""
    p, prm = module.params.patch_size, module.params
    B, C, H, W = x.shape
    h, w = H // p, W // p
    D = prm.hidden_size
    half = module.time_in.freq_dim // 2
    outs = []
    for b in range(B):
        patches = [x[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1) for r in range(h) for c in range(w)]
        img = linear(torch.stack(patches), module.img_in)  # (h*w, D)
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half) / half)
        args = 1000.0 * t[b] * freqs
        temb = torch.cat([torch.cos(args), torch.sin(args)])
        temb = linear(F.silu(linear(temb, module.time_in.mlp[0])), module.time_in.mlp[2])
        mod = linear(F.silu(temb), module.time_mod).reshape(6, D)
        T = cond.shape[1]
        seq = torch.cat([cond[b], img])
        pos = torch.tensor([[i, 0, 0] for i in range(T)] + [[0, r, c] for r in range(h) for c in range(w)]).float()
        keys = None if mask is None else torch.cat([mask[b], torch.ones(h * w, dtype=torch.bool)])
        for blk in module.blocks:
            sa, ca, ga, sm, cm, gm = mod + blk.modulation
            a = self_attention(layer_norm(seq) * (1 + ca) + sa, blk.attn, prm.heads, keys, pos, prm.axes_dim,
                               prm.rope_theta)
            seq = seq + ga * a
            m = layer_norm(seq) * (1 + cm) + sm
            seq = seq + gm * linear(F.gelu(linear(m, blk.mlp.fc1)), blk.mlp.fc2)
        shift, scale = linear(F.silu(temb), module.final.adaLN).chunk(2)
        out = linear(layer_norm(seq[T:]) * (1 + scale) + shift, module.final.linear)  # (h*w, C*p*p)
        img_out = torch.zeros(C, H, W)
        for idx in range(h * w):
            r, c = divmod(idx, w)
            img_out[:, r * p : (r + 1) * p, c * p : (c + 1) * p] = out[idx].reshape(C, p, p)
        outs.append(img_out)
    return torch.stack(outs)
