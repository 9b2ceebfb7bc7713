import os

import pytest
import torch
from torch import nn

import unifusion_core as uf

# CI has 2 free cores; OMP_NUM_THREADS=1 when the machine is shared (2 threads on a busy core
# spin-wait and run 10-30x slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """One conversion of the SmolLM2 GGUF for the whole session (about 30 s), not one per test."""
    uf.encoders.gguf_cache.GGUF_CACHE = tmp_path_factory.mktemp("gguf-cache")
    yield uf.encoders.gguf_cache.GGUF_CACHE
    uf.encoders.gguf_cache.GGUF_CACHE = None


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Give every parameter random values (norm scales near 1) so zero-initialised parts
    (adaLN-Zero gates, the final layer) cannot hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, nn.RMSNorm) and m.weight is not None:
                m.weight.add_(1.0)
    return model


@pytest.fixture
def tiny():
    """The tiny preset with random weights everywhere, fp32, CPU."""
    torch.manual_seed(0)
    return randomize(uf.UniFusionModel.from_preset("tiny")).eval()


def tiny_features(B: int = 2, T: int = 7, seed: int = 0) -> torch.Tensor:
    enc = uf.get_preset("tiny").encoder
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, len(enc.layers), enc.hidden_size, generator=g)
