"""The benchmarks run end to end on tiny configurations and print the JSON they promise."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from bench.__main__ import main as bench_main
from unifusion_core import scenes
from unifusion_core.presets import TINY_ENCODER

TINY_TRAIN = ["train", "--encoder", "tiny", "--lap-heads", "2", "--refiner-heads", "2", "--dit-width", "32",
              "--dit-depth", "1", "--dit-heads", "2", "--patch", "4", "--resolution", "16", "--prompts-per-step", "2",
              "--timesteps-per-prompt", "3", "--steps", "1", "--warmup", "0", "--matmul", "64"]


def run(argv: list[str], capsys) -> dict:
    bench_main(argv)
    return json.loads(capsys.readouterr().out)


def features_file(path) -> str:
    g = torch.Generator().manual_seed(0)
    prompts = sorted({s.prompt for s in scenes.scenes("train")})
    tensors = {str(i): torch.randn(5, len(TINY_ENCODER.layers), TINY_ENCODER.hidden_size, generator=g).half()
               for i in range(len(prompts))}
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts),
                                            "encoder": json.dumps(dataclasses.asdict(TINY_ENCODER))})
    return str(path)


@pytest.mark.parametrize("features", [False, True], ids=["random-features", "features-file"])
def test_train_benchmark_prints_both_loops(features, tmp_path, capsys):
    extra = ["--features", features_file(tmp_path / "f.safetensors")] if features else []
    r = run(TINY_TRAIN + extra, capsys)
    assert r["P"] == 2 and r["K"] == 3 and r["samples_per_step"] == 6
    assert r["mean_prompt_tokens"] == (5 if features else pytest.approx(8.19, abs=0.01))
    assert r["params"]["total"] == sum(r["params"][k] for k in ("lap", "refiner", "dit"))
    assert r["matmul_peak"]["gflops"] > 0 and r["matmul_dit_mlp"]["shape"].endswith("32x128 fp32")
    a, p = r["amortised"], r["plain"]
    assert (a["prompts_per_step"], a["timesteps_per_prompt"]) == (2, 3)
    assert (p["prompts_per_step"], p["timesteps_per_prompt"]) == (6, 1)  # LAP + refiner for every sample
    for loop in (a, p):
        assert loop["step_s"] > 0 and loop["samples_per_s"] == pytest.approx(6 / loop["step_s"], rel=0.1)
        assert loop["step_gflop"] > 0 and loop["achieved_gflops"] > 0
        assert 0 < loop["lap_refiner_flop_share"] < 1 and loop["lap_refiner_time_share"] > 0
    assert p["lap_refiner_fwd_bwd_s"] > 0 and r["speedup"] > 0
    assert "samples/s" in r["summary"] and "plain loop" in r["summary"]


def test_train_benchmark_refuses_a_features_file_without_the_scene_prompts(tmp_path, capsys):
    path = tmp_path / "f.safetensors"
    save_file({"0": torch.zeros(2, 3, 32, dtype=torch.float16)}, str(path),
              metadata={"prompts": json.dumps(["a cat"]), "encoder": json.dumps(dataclasses.asdict(TINY_ENCODER))})
    with pytest.raises(SystemExit, match="no features for"):
        bench_main(TINY_TRAIN + ["--features", str(path)])


def test_dit_against_diffusers_compares_equal_work(capsys):
    """bench/dit_vs_diffusers.py builds Flux single-stream and Lumina 2 peers of our DiT's
    size: Flux does the same FLOPs as ours (the comparison is at equal work), Lumina 2 more (its
    refiners), and every model is timed at every size."""
    pytest.importorskip("diffusers", reason="the benchmark's peers come from diffusers (requirements-train.txt)")
    r = bench_main(["dit-vs-diffusers"] + ["--preset", "tiny", "--sizes", "32", "--cond-tokens", "80", "--repeats", "1",
                                     "--threads", "1", "--profile", "--peak-tflops", "0.5"])
    assert json.loads(capsys.readouterr().out) == r
    (row,) = r["sizes"]
    assert row["flop_ratio_vs_flux"] == pytest.approx(1.0, abs=0.05) and row["lumina2"]["gflop"] > row["ours"]["gflop"]
    assert all(row[m]["forward_ms"] > 0 and row[m]["guided_step_ms"] > 0 for m in ("ours", "flux", "lumina2"))
    assert row["ratio_vs_flux"] == pytest.approx(row["ours"]["forward_ms"] / row["flux"]["forward_ms"], abs=1e-3)
    assert any("addmm" in p["op"] or "mm" in p["op"] for p in row["profile_ours"])
    assert row["ours"]["mfu_pct"] == pytest.approx(row["ours"]["gflops"] / 5, abs=0.1)  # of 500 GFLOP/s
    assert "peak_gib" not in row["ours"]  # GPU memory only
    # our sampler's guided step: the 1-token null (79 tokens short) runs unpadded: under two forwards' work
    ours = row["ours"]
    assert ours["gflop"] < ours["sampler_step_gflop"] < 2 * ours["gflop"]
    assert ours["sampler_step_ms"] > 0 and ours["padded_sampler_step_ms"] > 0
    assert row["unpadded_vs_padded"] == pytest.approx(
        ours["sampler_step_ms"] / ours["padded_sampler_step_ms"], abs=1e-3)



def test_node_overhead_benchmark_compares_the_nodes_with_generate(capsys):
    r = run(["node-overhead", "--preset", "tiny", "--size", "16", "--steps", "2", "--repeats", "2"], capsys)
    assert r["latents_equal"] and r["latents_max_abs_diff"] == 0.0 and r["host"] == "plain"
    assert len(r["node_times_s"]) == len(r["generate_times_s"]) == 2
    assert r["node_over_generate"] == pytest.approx(r["node_s"] / r["generate_s"], rel=1e-2)


def test_buckets_benchmark_trains_both_at_the_same_pixels(capsys):
    r = run(["train-buckets", "--images", "20", "--resolution", "32", "--dit-width", "32", "--dit-depth", "1",
             "--dit-heads", "2", "--patch", "4", "--prompts-per-step", "4", "--steps", "2", "--warmup", "0"], capsys)
    sq, bu = r["square"], r["buckets"]
    assert sq["sizes_seen"] == ["32x32"] and sq["mean_pixels_per_image"] == 1024
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in (map(int, k.split("x")) for k in bu["sizes_seen"]))
    assert abs(r["pixels_ratio"] - 1) < 0.1 and sum(sum(v.values()) for v in r["buckets_used"].values()) == 20
    assert r["samples_per_s_ratio"] == pytest.approx(bu["samples_per_s"] / sq["samples_per_s"], abs=2e-3)
    assert "samples/s vs square" in r["summary"]


def test_dit_ops_benchmark_compares_the_previous_ops_with_the_fused_and_compiled(capsys):
    """bench/dit_ops.py: the previous eager ops (its baseline) compute what the fused ones and the
    compiled blocks compute; the compiled variant reports its first call and compiles nothing more."""
    torch._dynamo.reset()
    r = run(["dit-ops", "--preset", "tiny", "--size", "32", "--cond-tokens", "8", "--repeats", "1",
             "--dtypes", "float32", "--profile", "--peak-tflops", "0.5"], capsys)
    rows = {row["variant"]: row for row in r["runs"]}
    assert list(rows) == ["previous", "fused", "compiled"]
    assert rows["previous"]["max_abs_diff_vs_first"] == 0.0 and rows["previous"]["speedup_vs_first"] == 1.0
    assert rows["fused"]["max_abs_diff_vs_first"] < 1e-5 and rows["compiled"]["max_abs_diff_vs_first"] < 1e-5
    assert rows["compiled"]["graphs_compiled_first_call"] == 1 and rows["compiled"]["graphs_compiled_second_call"] == 0
    assert all(0 < row["share_outside_gemm_attention"] < 1 and row["mfu"] > 0 for row in rows.values())
    assert rows["fused"]["speedup_vs_first"] == pytest.approx(
        rows["previous"]["forward_ms"] / rows["fused"]["forward_ms"], rel=1e-2)
    torch._dynamo.reset()


def test_rope_precision_benchmark_samples_the_embedded_model_three_ways(capsys, monkeypatch):
    """bench/rope_precision.py: its bf16 candidate is the same rotation (exact in fp32), and the
    run reports every variant and pair on the same images."""
    from bench.rope_precision import rope_in_dtype
    from unifusion_core import assets
    from unifusion_core.layers import apply_rope, rope_angles

    x = torch.randn(2, 5, 3, 16)
    rope = rope_angles(torch.randint(0, 100, (2, 5, 3)).float(), [4, 6, 6], 10_000.0)
    torch.testing.assert_close(rope_in_dtype(x, rope), apply_rope(x, rope), atol=1e-6, rtol=1e-6)
    bf = rope_in_dtype(x.bfloat16(), rope)
    assert bf.dtype == torch.bfloat16 and not torch.equal(bf, apply_rope(x.bfloat16(), rope))
    if assets.bundled_model() is None:
        pytest.skip("needs the embedded model")
    import bench.rope_precision as rp
    from bench.common import random_feature_table
    from unifusion_core.features import Features

    def stand_in(vlm_path, model, prompts, rewrite):  # SmolLM2's GGUF takes 20 s to load: random features
        spec = model.config.encoder
        return {p: Features(h.float(), spec.layers, spec) for p, h in random_feature_table(prompts, spec).items()}

    monkeypatch.setattr(rp, "vlm_features", stand_in)
    r = run(["rope-precision", "--limit", "2", "--seeds", "1", "--steps", "2"], capsys)
    assert set(r["variants"]) == {"fp32", "bf16", "bf16-rope-bf16"} and r["prompts"] == 2
    for pair in r["differences"].values():
        assert pair["images"] == 2 and 0 <= pair["mean_abs_level"] <= pair["max_abs_level"] <= 255
