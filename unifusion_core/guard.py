"""What keeps a host process (a ComfyUI server, a training run) alive and honest: a request that
cannot fit is refused before anything is allocated, Cancel is honoured between DiT blocks (not
only between sampler steps), and non-finite values are named where they enter instead of
ending as a black image."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_cancel_check: ContextVar[Callable[[], None] | None] = ContextVar("unifusion_cancel_check", default=None)


@contextmanager
def interruptible(check: Callable[[], None] | None) -> Iterator[None]:
    """Within this block, check() runs before every DiT block (and between the chunks of a very
    large attention, layers.attention, and as a GGUF is converted, encoders.gguf_cache.cancellable);
    it raises to cancel (ComfyUI's throw_exception_if_processing_interrupted). A large image's step
    can take minutes; this makes Cancel answer within one block's time."""
    token = _cancel_check.set(check)
    try:
        yield
    finally:
        _cancel_check.reset(token)


def check_cancel() -> None:
    """Run the host's check (it raises to cancel); nothing outside an `interruptible` block."""
    check = _cancel_check.get()
    if check is not None:
        check()


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can take on `device` now; None where that cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def ensure_memory(required: int, device: torch.device | str, what: str, advice: str) -> None:
    """MemoryError, with the estimate and the limit, when `required` bytes do not fit now."""
    free = available_memory(device)
    if free is not None and required > free:
        raise MemoryError(
            f"{what} needs about {required / 2**30:.1f} GiB of {torch.device(device).type} memory, but only "
            f"{free / 2**30:.1f} GiB is free; {advice}"
        )


def require_finite_number(name: str, value) -> float:
    """float(value), or ValueError naming the input when it is NaN or infinite."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def require_finite(name: str, tensor: torch.Tensor, advice: str = "") -> torch.Tensor:
    """tensor, or ValueError naming it when it holds NaN or infinite values (one fused check)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf){'; ' + advice if advice else ''}")
    return tensor
