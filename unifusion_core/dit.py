"""UniFusion DiT: full self-attention over [conditioning ; noisy latent] tokens (Sec. 2.2)."""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import DiTParams
from .guard import check_cancel
from .layers import FeedForward, Rope, SelfAttention, init_linears, rope_angles, timestep_embedding


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), row-major over the patch grid."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p); the exact inverse of patchify."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)


def token_positions(B: int, T: int, h: int, w: int, device) -> Tensor:
    """RoPE ids (B, T + h*w, 3): conditioning token i -> (i, 0, 0), image patch (r, c) -> (0, r, c)."""
    cond = torch.zeros(T, 3, device=device)
    cond[:, 0] = torch.arange(T, device=device)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()
    return torch.cat([cond, img])[None].expand(B, -1, -1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift per sample, as one kernel (x: (B, S, D); shift, scale: (B, D))."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The gated residual x + gate * y, as one kernel (gate: (B, D))."""
    return torch.addcmul(x, gate[:, None], y)


def _run_block(block: nn.Module, seq: Tensor, mod: Tensor, mask: Tensor | None, rope: Rope) -> Tensor:
    return block(seq, mod, mask, rope)


def compile_unavailable(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why torch.compile's inductor cannot build kernels for `device` here (what to install), or None."""
    if backend != "inductor":
        return None
    kind = torch.device(device).type
    if kind in ("cuda", "xpu"):
        from torch.utils._triton import has_triton

        if not has_triton():
            return (f"torch.compile on {kind} needs Triton, which is not installed: pip install triton "
                    "(triton-windows on Windows), or turn compile off")
    elif kind == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return ("torch.compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on the PATH, "
                "and none was found: install one, or turn compile off")
    return None


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process (a run compiled nothing when this
    does not change across it)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet; asking must not import dynamo (1 s)
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# How many graphs dynamo may keep for the block runner. Its default (8) is per function, and every
# model, dtype, batch, mask and load state of the process shares this one: a session of ordinary
# runs would fill 8 and then run every new variant eagerly, without a word.
RECOMPILE_LIMIT = 64


def graphs_held() -> int:
    """The graphs dynamo holds for the block runner now (its cache entries for the runner's code;
    0 where this torch does not say)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # a private helper: gone in some torch, the count is then unknown
        return 0
    return len(_debug_get_cache_entry_list(_run_block.__code__))


@contextlib.contextmanager
def compile_session():
    """Around a run with compiled blocks: dynamo's recompile limit for the runner raised to
    RECOMPILE_LIMIT, a compiler failure as a clear error (compile_errors). Yields a dict filled when
    the run ends without an error: `graphs` compiled during it, and `limit_reached` (later variants
    run eagerly)."""
    report: dict = {}
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    before = graphs_compiled()
    with config.patch(**{name: RECOMPILE_LIMIT}), compile_errors():
        yield report
    report["graphs"] = graphs_compiled() - before
    report["limit_reached"] = graphs_held() >= RECOMPILE_LIMIT


@contextlib.contextmanager
def compile_errors():
    """A failure inside torch.compile's compiler (not the model) as an error that says what to do."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        yield
    except BackendCompilerFailed as e:  # inductor's own InductorError is one too
        inner = getattr(e, "inner_exception", None) or e
        raise RuntimeError(f"torch.compile could not compile the DiT ({type(inner).__name__}: {str(inner)[:500]}); "
                           "turn compile off to run it eagerly") from e


@functools.cache
def compiled_block_runner(backend: str = "inductor"):
    """_run_block under torch.compile, one per backend for the process (UniFusionDiT.compile_blocks)."""
    return torch.compile(_run_block, backend=backend)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t -> MLP -> (B, D)."""

    def __init__(self, dim: int, freq_dim: int = 256, dtype=None, device=None, operations=nn):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            operations.Linear(freq_dim, dim, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(dim, dim, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; its modulation is a shared projection of t plus its own table."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.attn = SelfAttention(dim, heads, qk_norm=qk_norm, operations=operations, **kw)
        self.norm2 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        # Exact (erf) GELU: no dearer than the tanh approximation on GPUs, cheaper on CPUs (docs/python.md).
        act = nn.GELU()
        self.mlp = FeedForward(dim, round(dim * mlp_ratio), act, operations=operations, **kw)
        # Per-block offsets to the shared modulation: shift/scale/gate for attention and MLP.
        self.modulation = nn.Parameter(torch.empty(6, dim, **kw))

    def forward(self, x: Tensor, mod: Tensor, mask: Tensor | None, rope: Rope) -> Tensor:
        """x: (B, S, D); mod: (B, 6, D) shared modulation from t."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod + self.modulation.to(mod)).unbind(1)
        x = gated(x, gate_a, self.attn(modulate(self.norm1(x), shift_a, scale_a), mask, rope))
        return gated(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch values; zero-initialised (DiT)."""

    def __init__(self, dim: int, out: int, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.adaLN = operations.Linear(dim, 2 * dim, bias=True, **kw)
        self.linear = operations.Linear(dim, out, bias=True, **kw)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = self.adaLN(nn.functional.silu(temb)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class UniFusionDiT(nn.Module):
    """Velocity-predicting DiT; conditioning enters only as tokens prepended at the input."""

    def __init__(self, params: DiTParams, in_channels: int, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        p, D = params, params.hidden_size
        self.params, self.in_channels = p, in_channels
        self.gradient_checkpointing = False
        self.img_in = operations.Linear(in_channels * p.patch_size**2, D, bias=True, **kw)
        self.time_in = TimestepEmbedder(D, operations=operations, **kw)
        # Why one modulation projection shared by all blocks (plus a per-block table) instead of
        # DiT's projection per block: per-block adaLN costs 6*D^2 per block (about a third of
        # all weights at D=4096); PixArt-alpha, SANA and FLUX.2 share it with no loss in quality.
        self.time_mod = operations.Linear(D, 6 * D, bias=True, **kw)
        self.blocks = nn.ModuleList(
            DiTBlock(D, p.heads, p.mlp_ratio, p.qk_norm, operations=operations, **kw) for _ in range(p.depth)
        )
        self.final = FinalLayer(D, in_channels * p.patch_size**2, operations=operations, **kw)
        # Learned "no conditioning" token: the unconditional input for classifier-free guidance.
        self.null_cond = nn.Parameter(torch.empty(1, D, **kw))
        self.compiled_block = None  # set by compile_blocks()

    def compile_blocks(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run the blocks through torch.compile (True) or eagerly (False); the weights are untouched.

        Regional compilation, as torchtitan and diffusers do it: one function that runs a block is
        compiled, and every block of every model in the process shares its graphs (the blocks
        differ in weights only, which dynamo takes as inputs), so a model compiles in the time of
        one block, and a second run, or another model of the same width, compiles nothing. A new
        image size or prompt length compiles once more, after which dynamo makes those sizes
        dynamic; a new dtype or guidance setting (a mask or none) compiles once more too. Graphs
        are cached per backend for the life of the process (and inductor keeps its kernels on
        disk, so a new process compiles faster). Run under compile_session(): all of this shares
        one function, and dynamo's default of 8 graphs a function is soon full.
        """
        self.compiled_block = compiled_block_runner(backend) if enabled else None

    def initialize_weights(self) -> None:
        init_linears(self)
        for lin in self.time_in.mlp[0], self.time_in.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: gates (and with them every block) start at zero, so each block is the
        # identity; the final layer starts at zero output.
        for lin in self.time_mod, self.final.adaLN, self.final.linear:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
        nn.init.normal_(self.null_cond, std=0.02)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) model-space latent; t: (B,) in [0, 1]; cond: (B, T, D) -> velocity (B, C, H, W)."""
        p = self.params.patch_size
        B, C, H, W = x.shape
        if C != self.in_channels or H % p or W % p:
            raise ValueError(
                f"DiT input must be (B, {self.in_channels}, H, W) with H and W multiples of the patch "
                f"size {p}, got {tuple(x.shape)}"
            )
        if t.shape != (B,) or cond.ndim != 3 or cond.shape[0] != B:
            raise ValueError(
                f"DiT needs t of shape ({B},) and cond of shape ({B}, T, D), got {tuple(t.shape)} "
                f"and {tuple(cond.shape)}"
            )
        h, w, T = H // p, W // p, cond.shape[1]
        # Computes in x's dtype (as ComfyUI's Flux does); the caller casts x to the model's dtype.
        img = self.img_in(patchify(x, p))  # (B, h*w, D)
        temb = self.time_in(t, x.dtype)  # (B, D)
        mod = self.time_mod(nn.functional.silu(temb)).unflatten(-1, (6, -1))  # (B, 6, D)
        seq = torch.cat([cond.to(x.dtype), img], dim=1)  # (B, T + h*w, D)
        mask = None
        if cond_mask is not None and not bool(cond_mask.all()):
            mask = torch.cat([cond_mask, cond_mask.new_ones(B, h * w)], dim=1)  # (B, T + h*w)
        rope = rope_angles(token_positions(B, T, h, w, x.device), self.params.axes_dim, self.params.rope_theta)
        ac = int(self.gradient_checkpointing)  # 0: none; N: every N-th block (True: every block)
        run = self.compiled_block or _run_block
        for i, block in enumerate(self.blocks):
            check_cancel()  # Cancel inside a step: a large image's step can take minutes
            if ac and i % ac == 0 and torch.is_grad_enabled():
                seq = checkpoint(run, block, seq, mod, mask, rope, use_reentrant=False)
            else:
                seq = run(block, seq, mod, mask, rope)
        out = self.final(seq[:, T:], temb)  # (B, h*w, C*p*p)
        return unpatchify(out, p, h, w)
