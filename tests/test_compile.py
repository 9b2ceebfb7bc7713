"""The DiT's compiled path (UniFusionDiT.compile_blocks): the same numbers as eager, one graph for all
blocks, nothing compiled on a second run, clear errors when it cannot compile."""

import pytest
import torch
from conftest import randomize
from torch.testing import assert_close

import unifusion_core as uf
from unifusion_core.dit import compile_errors, compile_unavailable, graphs_compiled
from unifusion_core.layers import apply_rope, rope_angles


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # graphs are shared by the process: count this test's own
    yield
    torch._dynamo.reset()


def tiny_model(depth: int = 2, seed: int = 0) -> uf.UniFusionModel:
    torch.manual_seed(seed)
    model = uf.UniFusionModel.from_preset("tiny", dit={"depth": depth})
    return randomize(model, seed=seed, std=0.1).eval()  # not zero-init: every block does work


def conditioning(model, tokens: int, seed: int = 0) -> uf.Conditioning:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, model.config.num_layers, model.config.encoder.hidden_size, generator=g)
    with torch.no_grad():
        return model.encode(hidden)


def test_compiled_rope_takes_the_cos_sin_form_and_equals_the_complex_multiply(fresh_dynamo):
    """Traced, apply_rope takes the form inductor can fuse (no complex numbers in the graph)."""
    graphs = []

    def inspect(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    x = torch.randn(2, 7, 2, 3, 16)  # q and k at once
    rope = rope_angles(torch.randint(0, 300, (2, 7, 3)).float(), [4, 6, 6], 10_000.0)
    compiled = torch.compile(apply_rope, backend=inspect, fullgraph=True)
    assert_close(compiled(x, rope), apply_rope(x, rope), atol=1e-6, rtol=1e-6)
    (ops,) = graphs
    assert not any("complex" in op for op in ops) and any("stack" in op for op in ops), ops


def test_compiled_sampling_equals_eager_and_compiles_once(fresh_dynamo):
    model = tiny_model(depth=3)
    cond = conditioning(model, tokens=5)
    args = dict(width=32, height=32, steps=3, cfg=3.0, seed=4)
    eager = model.sample(cond, **args)
    model.dit.compile_blocks(True)
    before = graphs_compiled()
    first = model.sample(cond, **args)
    # The prompt and the 1-token null run as one padded, masked call: one graph serves all three
    # blocks and every step.
    assert graphs_compiled() - before == 1
    assert_close(first, eager, atol=1e-4, rtol=1e-4)
    before = graphs_compiled()
    assert torch.equal(model.sample(cond, **args), first)  # a second run: nothing compiled, same latents
    assert graphs_compiled() == before
    # Another model of the same width and depth (other weights) reuses the graph: weights are inputs.
    other = tiny_model(depth=3, seed=1)
    other.dit.compile_blocks(True)
    other_eager = tiny_model(depth=3, seed=1).sample(cond, **args)
    assert_close(other.sample(cond, **args), other_eager, atol=1e-4, rtol=1e-4)
    assert graphs_compiled() == before
    model.dit.compile_blocks(False)  # back to eager: exactly the eager numbers
    assert torch.equal(model.sample(cond, **args), eager)


def test_a_compile_session_keeps_compiling_past_dynamos_default_limit_and_says_when_full(fresh_dynamo,
                                                                                          monkeypatch):
    """Every model, dtype, mask and grad mode of the process shares the block runner: dynamo's
    default limit (8 graphs a function) would run the 9th variant eagerly without a word. A session
    raises it, and reports when even that is reached."""
    model = tiny_model()
    seen = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        m = tiny_model().to(dtype)
        m.dit.compile_blocks(True, backend="eager")
        for masked in (False, True):
            for grad in (False, True):
                x = torch.randn(1, 3, 8, 8, dtype=dtype)
                cond = torch.randn(1, 4, 64, dtype=dtype)
                mask = torch.tensor([[True, True, True, False]]) if masked else None
                with uf.dit.compile_session() as report, torch.set_grad_enabled(grad):
                    m.dit(x, torch.tensor([0.5]), cond, mask)
                seen.append(report)
    assert [r["graphs"] for r in seen] == [1] * 12 and not any(r["limit_reached"] for r in seen)
    assert uf.dit.graphs_held() == 12  # all kept: none ran eagerly for want of room
    monkeypatch.setattr(uf.dit, "RECOMPILE_LIMIT", 13)
    model.dit.compile_blocks(True, backend="eager")
    with uf.dit.compile_session() as report, torch.no_grad():
        model.dit(torch.randn(1, 3, 8, 8), torch.tensor([0.5]), torch.randn(1, 4, 64), None)  # reuses
    assert report == {"graphs": 0, "limit_reached": False}
    half = tiny_model().half()
    half.dit.compile_blocks(True, backend="eager")
    with uf.dit.compile_session() as report, torch.no_grad():
        half.dit(torch.randn(1, 3, 8, 8).half(), torch.tensor([0.5]), torch.randn(1, 4, 64).half(), None)
    assert report == {"graphs": 1, "limit_reached": True}


def test_compile_needs_a_compiler_and_says_which(monkeypatch):
    assert compile_unavailable("cpu", backend="eager") is None
    monkeypatch.setenv("PATH", "")
    why = compile_unavailable("cpu")
    assert "C++ compiler" in why and "turn compile off" in why
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    why = compile_unavailable("cuda:0")
    assert "pip install triton" in why and "turn compile off" in why


def test_a_compiler_failure_says_to_turn_compile_off(fresh_dynamo):
    def broken(gm, example_inputs):
        raise OSError("the compiler crashed")

    model = tiny_model()
    model.dit.compile_blocks(True, backend=broken)
    cond = conditioning(model, tokens=3)
    with pytest.raises(RuntimeError, match=r"OSError: the compiler crashed.*turn compile off"), compile_errors():
        model.sample(cond, width=16, height=16, steps=1, cfg=1.0)
    model.dit.compile_blocks(False)
    model.sample(cond, width=16, height=16, steps=1, cfg=1.0)  # eager still works
