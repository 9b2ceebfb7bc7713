"""Rectified-flow sampling: integrator orders, schedules, guidance, seeds, sizes, callbacks."""

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_features
from torch.testing import assert_close

import unifusion_core as uf
from unifusion_core import advice, sampling
from unifusion_core.sampling import (
    get_schedule,
    latent_grid,
    make_noise,
    resolution_shift,
    sample_euler,
    sample_heun,
    time_shift,
)

# --- integrators on a known field -----------------------------------------------------------------

LAM = 1.5


def linear_field(x, t, i):
    return LAM * x  # dx/dt = LAM x  =>  x(0) = x(1) * exp(-LAM)


@pytest.mark.parametrize("fn,order", [(sample_euler, 1), (sample_heun, 2)])
def test_integrators_converge_at_their_order(fn, order):
    x1 = torch.ones(4, dtype=torch.float64)
    exact = x1 * math.exp(-LAM)
    errors = [(fn(linear_field, x1, get_schedule(n, 1.0)) - exact).abs().max().item() for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2**order, rel=0.1)


def test_euler_is_exact_on_straight_rectified_flow_paths():
    # With one data point x0, the true velocity is constant along the straight path.
    x0, noise = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    for fn in (sample_euler, sample_heun):
        out = fn(lambda x, t, i: noise - x0, noise, get_schedule(3, 3.0))
        assert_close(out, x0)


def test_schedule_and_shift():
    ts = get_schedule(10, 3.0)
    assert ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    assert torch.equal(get_schedule(10, 1.0), torch.linspace(1, 0, 11, dtype=torch.float64))
    assert time_shift(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    p = uf.SamplingParams()
    assert resolution_shift(256, p) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096, p) == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        get_schedule(0, 1.0)


def test_noise_is_seeded_and_batch_prefix_stable():
    a = make_noise((2, 3, 4, 4), 7)
    assert torch.equal(a, make_noise((2, 3, 4, 4), 7))
    assert not torch.equal(a, make_noise((2, 3, 4, 4), 8))
    assert torch.equal(a[:1], make_noise((1, 3, 4, 4), 7))


# --- the model's sampler ----------------------------------------------------------------------


def manual_sample(model, conds, uncond, cfg, W, H, steps, seed, shift, switch_step=None, B=1, heun=False):
    """Plain Euler / Heun loop, one image and one conditioning per DiT call."""
    space, p = model.config.latent, model.config.dit.patch_size
    lh, lw = H // space.downscale, W // space.downscale
    Hp, Wp = math.ceil(lh / p) * p, math.ceil(lw / p) * p
    noise = make_noise((B, space.channels, Hp, Wp), seed)
    ts = get_schedule(steps, shift)

    def velocity(x, t, c, b):
        tt = torch.tensor([t])
        def pick(cc):
            row = min(b, cc.batch_size - 1)
            return cc.tokens[row][None], cc.mask[row][None]

        v = model.dit(x, tt, *pick(c))
        if cfg != 1:
            vu = model.dit(x, tt, *pick(uncond))
            v = vu + cfg * (v - vu)
        return v

    out = []
    for b in range(B):
        x = noise[b : b + 1]
        for i in range(steps):
            c = conds[0] if switch_step is None or i < switch_step else conds[1]
            t, dt = float(ts[i]), float(ts[i + 1] - ts[i])
            v = velocity(x, t, c, b)
            if heun:
                v = 0.5 * (v + velocity(x + dt * v, float(ts[i + 1]), c, b))
            x = x + dt * v
        out.append(x)
    return space.to_raw(torch.cat(out)[:, :, :lh, :lw])


@pytest.fixture
def cond(tiny):
    return tiny.encode(tiny_features(B=1, T=5))


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_sample_matches_manual_loop(tiny, cond, cfg):
    out = tiny.sample(cond, 8, 6, steps=4, cfg=cfg, seed=3, shift=2.0)
    with torch.no_grad():
        expected = manual_sample(tiny, [cond], tiny.null_conditioning(), cfg, 8, 6, 4, 3, 2.0)
    assert out.shape == (1, 3, 6, 8) and out.dtype == torch.float32
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_negative_conditioning_replaces_the_null_token(tiny, cond):
    neg = tiny.encode(tiny_features(B=1, T=3, seed=9))
    out = tiny.sample(cond, 8, 8, steps=3, cfg=4.0, seed=1, shift=1.0, negative=neg)
    with torch.no_grad():
        expected = manual_sample(tiny, [cond], neg, 4.0, 8, 8, 3, 1, 1.0)
    # cond (5 tokens) and neg (3) share one padded batch in the sampler: reduction order differs
    assert_close(out, expected, atol=5e-5, rtol=1e-4)
    assert not torch.allclose(out, tiny.sample(cond, 8, 8, steps=3, cfg=4.0, seed=1, shift=1.0))


def test_conditioning_schedule_switches_after_the_fraction(tiny, cond):
    other = tiny.encode(tiny_features(B=1, T=2, seed=5))
    out = tiny.sample(cond, 8, 8, steps=5, cfg=2.0, seed=0, shift=1.0, next_cond=other, switch_at=0.4)
    with torch.no_grad():
        expected = manual_sample(tiny, [cond, other], tiny.null_conditioning(), 2.0, 8, 8, 5, 0, 1.0, switch_step=2)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    only_other = tiny.sample(other, 8, 8, steps=5, cfg=2.0, seed=0, shift=1.0)
    switched_at_once = tiny.sample(cond, 8, 8, steps=5, cfg=2.0, seed=0, shift=1.0, next_cond=other, switch_at=0.0)
    assert torch.equal(switched_at_once, only_other)


def test_same_seed_same_latents_other_seed_other_latents(tiny, cond):
    a = tiny.sample(cond, 8, 8, steps=3, cfg=3.0, seed=42, batch_size=2)
    assert torch.equal(a, tiny.sample(cond, 8, 8, steps=3, cfg=3.0, seed=42, batch_size=2))
    assert not torch.allclose(a, tiny.sample(cond, 8, 8, steps=3, cfg=3.0, seed=43, batch_size=2))
    assert not torch.allclose(a[0], a[1])  # each image of the batch has its own noise
    assert_close(a[:1], tiny.sample(cond, 8, 8, steps=3, cfg=3.0, seed=42), atol=1e-4, rtol=1e-4)


def test_batch_with_a_batch_one_negative_matches_manual_loop(tiny, cond):
    two = tiny.encode(tiny_features(B=2, T=4, seed=3))
    neg = tiny.encode(tiny_features(B=1, T=2, seed=4))
    out = tiny.sample(two, 8, 8, steps=3, cfg=2.5, seed=11, shift=1.5, negative=neg)
    assert out.shape[0] == 2  # batch_size follows the conditioning
    with torch.no_grad():
        expected = manual_sample(tiny, [two], neg, 2.5, 8, 8, 3, 11, 1.5, B=2)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_padding,expected_calls", [
    (0, [(2, 5, False), (1, 3, False), (3, 2, False)]),  # one call per length, none padded
    # row 1 joins the 5-token rows (2 tokens of padding); the negative's 9 would not
    (4, [(3, 5, True), (3, 2, False)]),
    (64, [(6, 5, True)]),  # the default: all 11 tokens of padding in one call
])
def test_rows_of_different_lengths_share_calls_up_to_max_padding(tiny, monkeypatch, max_padding, expected_calls):
    """Prompts of 5, 3 and 5 tokens against a 2-token negative: the same latents as the padded,
    masked rows of the plain loop, whichever calls the rows are grouped into."""
    import unifusion_core.sampling as sampling

    monkeypatch.setattr(sampling, "MAX_PADDING", max_padding)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    three = tiny.encode(tiny_features(B=3, T=5, seed=3), mask)
    neg = tiny.encode(tiny_features(B=1, T=2, seed=4))
    calls = dit_calls(tiny)
    out = tiny.sample(three, 8, 8, steps=2, cfg=2.5, seed=11, shift=1.5, negative=neg)
    assert calls == expected_calls * 2
    with torch.no_grad():
        expected = manual_sample(tiny, [three], neg, 2.5, 8, 8, 2, 11, 1.5, B=3)  # row 1 padded to 5, masked
    assert_close(out, expected, atol=5e-5, rtol=1e-4)  # batched GEMMs round in another order


def test_a_long_prompt_and_the_null_run_apart(tiny):
    long = tiny.encode(tiny_features(B=1, T=80, seed=2))  # the null would need 79 tokens of padding
    calls = dit_calls(tiny)
    out = tiny.sample(long, 8, 8, steps=2, cfg=3.0, seed=1, shift=1.0)
    assert calls == [(1, 80, False), (1, 1, False)] * 2
    with torch.no_grad():
        expected = manual_sample(tiny, [long], tiny.null_conditioning(), 3.0, 8, 8, 2, 1, 1.0)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_by_length_cuts_trailing_padding_only():
    tokens = torch.randn(4, 5, 2)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    groups = uf.Conditioning(tokens, mask).by_length()
    assert [(rows.tolist(), c.tokens.shape[1]) for rows, c in groups] == [([2], 5), ([1], 3), ([0, 3], 2)]
    for rows, c in groups:
        L = c.tokens.shape[1]
        assert torch.equal(c.tokens, tokens[rows, :L]) and torch.equal(c.mask, mask[rows, :L])
    assert groups[1][1].mask.tolist() == [[True, False, True]]  # padding inside a row stays, masked
    # max_padding counts rows x missing tokens: row 1 fits beside row 2 (2 tokens), rows 0 and 3 not (2 x 3 more)
    merged = uf.Conditioning(tokens, mask).by_length(max_padding=7)
    assert [(rows.tolist(), c.tokens.shape[1]) for rows, c in merged] == [([1, 2], 5), ([0, 3], 2)]
    assert [(r, c.tokens.shape[1]) for r, c in uf.Conditioning(tokens, mask).by_length(max_padding=8)] == [(None, 5)]
    full = uf.Conditioning(tokens, torch.ones(4, 5, dtype=torch.bool))
    assert full.by_length() == [(None, full)]  # all rows whole: the batch as it is, one call
    (rows, cut), = uf.Conditioning(tokens, mask[:1].expand(4, -1)).by_length()
    assert rows is None and cut.tokens.shape[1] == 2 and bool(cut.mask.all())


def test_cfg_zero_is_the_negative_alone(tiny, cond):
    neg = tiny.encode(tiny_features(B=1, T=2, seed=4))
    guided = tiny.sample(cond, 8, 8, steps=3, cfg=0.0, seed=2, negative=neg)
    assert_close(guided, tiny.sample(neg, 8, 8, steps=3, cfg=1.0, seed=2), atol=1e-4, rtol=1e-4)


def test_heun_matches_manual_loop(tiny, cond):
    out = tiny.sample(cond, 8, 8, steps=3, cfg=2.0, seed=6, shift=2.0, sampler="heun")
    with torch.no_grad():
        expected = manual_sample(tiny, [cond], tiny.null_conditioning(), 2.0, 8, 8, 3, 6, 2.0, heun=True)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_default_shift_is_the_resolution_shift(tiny, cond):
    # 12x8 pixel latent, 2x2 patches -> 24 image tokens
    s = resolution_shift(24, tiny.config.sampling)
    assert torch.equal(tiny.sample(cond, 12, 8, steps=3, seed=0), tiny.sample(cond, 12, 8, steps=3, seed=0, shift=s))
    shifted = tiny.sample(cond, 12, 8, steps=3, seed=0, shift=3.0)
    assert not torch.equal(tiny.sample(cond, 12, 8, steps=3, seed=0), shifted)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_models_sample_like_fp32(tiny, cond, dtype, tol):
    hidden = tiny_features(B=1, T=5)
    ref = tiny.sample(tiny.encode(hidden), 8, 8, steps=3, seed=1)
    half = tiny.to(dtype)
    out = half.sample(half.encode(hidden), 8, 8, steps=3, seed=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < tol  # relative error at the dtype's precision


def test_golden_values(cond):
    """A seeded tiny model's output, recorded once: catches silent changes to conventions
    (RoPE layout, positions, modulation order, schedules) that would break saved checkpoints."""
    from conftest import randomize

    torch.manual_seed(0)
    model = randomize(uf.UniFusionModel.from_preset("tiny"), seed=123, std=0.1).eval()
    c = model.encode(tiny_features(B=1, T=4, seed=7))
    out = model.sample(c, 6, 4, steps=2, cfg=3.0, seed=5)
    assert_close(out[0, :, 0, :3].flatten(), torch.tensor(GOLDEN), atol=1e-4, rtol=1e-4)


GOLDEN = [2.90329, -0.51683, -0.52423, -0.70441, 0.72766, 0.41994, 0.22491, 1.0157, 0.05079]


def dit_calls(model):
    """Record (batch, conditioning tokens, whether any padding was passed) of every DiT call."""
    calls, forward = [], model.dit.forward
    def counted(x, t, c, m=None):
        calls.append((x.shape[0], c.shape[1], m is not None and not bool(m.all())))
        return forward(x, t, c, m)

    model.dit.forward = counted
    return calls


def test_heun_sampler_runs_two_calls_per_step(tiny, cond):
    calls = dit_calls(tiny)
    out = tiny.sample(cond, 8, 8, steps=3, cfg=2.0, sampler="heun")
    # two velocities a step; the 5-token prompt and the 1-token null (4 tokens of padding) share a call
    assert calls == [(2, 5, True)] * 6 and torch.isfinite(out).all()
    assert not torch.allclose(out, tiny.sample(cond, 8, 8, steps=3, cfg=2.0, sampler="euler"))


@pytest.mark.parametrize("space,W,H,latent",
                         [("pixel", 17, 10, (10, 17)), ("flux", 100, 60, (7, 12)), ("sdxl", 64, 72, (9, 8))])
def test_any_size_returns_raw_latents_of_that_size(space, W, H, latent, caplog):
    # At init the DiT predicts zero velocity, so the result is exactly the noise in raw space.
    model = uf.UniFusionModel.from_preset("tiny", latent=space)
    c = model.encode(tiny_features(B=1, T=2))
    out = model.sample(c, W, H, steps=2, cfg=3.0, seed=5)
    ls = uf.LATENT_SPACES[space]
    assert out.shape == (1, ls.channels, *latent)
    p = model.config.dit.patch_size
    noise = make_noise((1, ls.channels, math.ceil(latent[0] / p) * p, math.ceil(latent[1] / p) * p), 5)
    assert_close(out, ls.to_raw(noise[:, :, : latent[0], : latent[1]]))
    floored = (W, H) != (latent[1] * ls.downscale, latent[0] * ls.downscale)
    assert ("the image will be" in caplog.text) == floored


@pytest.mark.parametrize("space,W,H,grid", [("pixel", 17, 10, (10, 17, 10, 18)), ("flux", 100, 60, (7, 12, 8, 12)),
                                             ("sdxl", 64, 72, (9, 8, 10, 8))])
def test_latent_grid_floors_to_the_latent_then_rounds_up_to_whole_patches(space, W, H, grid):
    config = uf.get_preset("tiny").replace(latent=space)
    assert config.dit.patch_size == 2 and latent_grid(config, W, H) == grid


def test_the_sampler_is_a_free_function_over_the_model(tiny, cond):
    """flux's denoise(model, ...): sampling.sample(model, ...) is what model.sample(...) runs."""
    assert_close(sampling.sample(tiny, cond, 8, 6, steps=2, seed=4), tiny.sample(cond, 8, 6, steps=2, seed=4),
                 rtol=0, atol=0)
    assert tiny.memory_required(2, 5, 64, 32, False) == sampling.memory_required(tiny, 2, 5, 64, 32, False)
    # twice the rows when guided; the image tokens are those of the patch-padded grid
    guided, plain = (sampling.memory_required(tiny, 2, 5, 64, 32, g) for g in (True, False))
    assert guided == pytest.approx(2 * plain, abs=1)
    assert sampling.memory_required(tiny, 1, 0, 17, 10) == sampling.memory_required(tiny, 1, 0, 18, 10)


def test_callback_sees_every_step_and_can_cancel(tiny, cond):
    seen, last = [], {}
    def record(i, n, x, x0):
        seen.append((i, n, x0.shape))
        last.update(x0=x0)

    out = tiny.sample(cond, 8, 8, steps=4, callback=record)
    assert seen == [(i, 4, (1, 3, 8, 8)) for i in range(4)]
    # the last Euler step lands on the last x0 estimate (model space = raw for pixels)
    assert_close(last["x0"], out, atol=1e-5, rtol=1e-5)

    class Cancelled(Exception):
        pass

    def cancel(i, n, x, x0):
        if i == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        tiny.sample(cond, 8, 8, steps=4, callback=cancel)


def test_sampler_errors(tiny, cond):
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        tiny.sample(cond, 8, 8, steps=2, sampler="dpm")
    with pytest.raises(ValueError, match="must be 1 or the requested batch size 3"):
        tiny.sample(tiny.encode(tiny_features(B=2)), 8, 8, steps=2, batch_size=3)
    with pytest.raises(ValueError, match="smaller than one latent pixel"):
        uf.UniFusionModel.from_preset("tiny", latent="flux").sample(cond, 4, 64, steps=1)
    with pytest.raises(ValueError, match="switch_at must be in"):
        tiny.sample(cond, 8, 8, steps=2, next_cond=cond, switch_at=1.5)


# --- the estimate of a run's time, after its first step -----------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """A fake time.monotonic (restored after the test): advance it with clock[0] += seconds."""
    now = [1000.0]
    monkeypatch.setattr(advice.time, "monotonic", lambda: now[0])
    return now


def estimate_of(clock, caplog, first: float, width: int, sampler: str = "euler", steps: int = 28):
    """What timed() logs and reports when the first model call of a width x width run takes `first` s."""
    config = uf.get_preset("tiny").replace(sampling={"size": (64, 64)})
    reported, steps_seen = [], []
    callback = advice.timed(lambda step, *_: steps_seen.append(step), config, width, width, sampler,
                               report=reported.append)
    clock[0] += first
    caplog.clear()
    with caplog.at_level("INFO", logger="unifusion_core.advice"):
        for step in range(steps):
            callback(step, steps, torch.zeros(1), torch.zeros(1))
    assert steps_seen == list(range(steps))  # the wrapped callback still runs at every step
    assert [r.getMessage() for r in caplog.records] == reported
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_a_long_run_is_estimated_after_its_first_model_call(clock, caplog):
    ((level, text),) = estimate_of(clock, caplog, 40.0, 64, "heun")  # two model calls per Heun step
    assert level == "INFO" and text.startswith("sampling 64x64 will take about 37 min for 28 steps (until about ")
    assert text.endswith("from its first model call, which took 40.0 s")
    assert estimate_of(clock, caplog, 1.0, 64) == []  # a short run at the trained size: nothing to say
    ((level, text),) = estimate_of(clock, caplog, 1.0, 256, steps=2)  # far above the trained size: always said
    assert level == "WARNING" and text.startswith("sampling 256x256 will take about 2.0 s for 2 steps")
    ((_, text),) = estimate_of(clock, caplog, 300.0, 64)
    assert "about 2.3 h for 28 steps" in text


def test_a_run_that_compiles_is_estimated_from_its_second_step(clock, caplog, monkeypatch):
    """The Sample node's compile switch: a first step that compiled the DiT is not a sampling step,
    so the estimate waits for the second (an 8 s run announced 4 min from its compiling first call)."""
    graphs = [3]
    monkeypatch.setattr(uf.dit, "graphs_compiled", lambda: graphs[0])
    reported, zero = [], torch.zeros(1)
    callback = advice.timed(None, uf.get_preset("tiny").replace(sampling={"size": (64, 64)}), 64, 64,
                            report=reported.append)
    clock[0] += 30.0
    graphs[0] = 4  # the first step compiled a graph
    callback(0, 28, zero, zero)
    assert reported == []
    clock[0] += 5.0
    for step in range(1, 28):
        callback(step, 28, zero, zero)
    (text,) = reported  # 30 s + 27 x 5 s
    assert text.startswith("sampling 64x64 will take about 3 min for 28 steps (until about ")
    assert text.endswith("from its second step, which took 5.0 s (the first took 30.0 s: it compiled the DiT)")


def test_timing_a_run_does_not_import_dynamo():
    """timed() asks whether the first step compiled; without compile that must cost nothing (importing
    torch._dynamo takes about a second), in the demo CLI and every Sample node run."""
    import subprocess
    import sys

    code = ("import sys, torch, unifusion_core as uf; uf.advice.timed(None, uf.get_preset('tiny'), 8, 8)"
            "(0, 1, torch.zeros(1), torch.zeros(1)); assert 'torch._dynamo' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)


def test_advice_says_nothing_it_cannot_know():
    """No training size recorded: no size advice; features that do not record whether they are a
    rewrite (built by hand, a features file): no rewrite advice; not the scenes model: no grammar."""
    tiny = uf.get_preset("tiny")
    assert tiny.sampling.size is None and tiny.sampling.rewrite
    plain = uf.Features(torch.zeros(3, len(tiny.encoder.layers), 32), encoder=tiny.encoder, text="a fox")
    images = uf.Features(torch.zeros(2, len(tiny.encoder.layers), 32), encoder=tiny.encoder, sequence_ids=[1, 2, 3],
                         positions=torch.tensor([1, 2]), is_image=torch.ones(2, dtype=torch.bool))
    assert plain.rewrite is None and images.rewrite is None
    assert advice.advice(tiny, features=plain, width=4096, height=4096) == []
    sized = tiny.replace(sampling={"size": (512, 512)})
    assert advice.advice(sized, width=1024, height=768) == []  # 3x the pixels: near enough
    assert advice.advice(sized, prompt="a fox", rewrite=False, width=1024, height=1024) == [
        "1024x1024 is far from the 512x512 this checkpoint was trained at: 4.0x the pixels, so 4.0x the image tokens "
        "and up to 16x the attention work per step (tokens grow with the area, attention with its square); it has "
        "not learned this size (expect a worse picture) and runs that much slower: the whole run's time is estimated "
        "after its first step. Use 512x512 for what it was trained on",
        "this checkpoint was trained on VERIFI rewrites (rewrite on), but this conditioning is the prompt's own words: "
        "turn rewrite on, or expect a picture that follows the prompt less well",
    ]
