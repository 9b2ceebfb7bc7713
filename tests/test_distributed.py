"""Training under torchrun with FSDP2 (CPU, gloo): 2 processes train what 1 does, a sharded run
killed with SIGKILL resumes on 1 process and then on 2 again, two "nodes" on 127.0.0.1 agree.

All runs train the same tiny model on the same global batch (4 prompts x 2 timesteps a step);
each process trains its share. They agree to float32 rounding (sums in another order), not bit
for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_killed
from safetensors.torch import load_file
from test_train import feature_table, write_features

import unifusion_core as uf
from unifusion_core import scenes
from unifusion_core.train.state import list_states, read_meta, read_tensors

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--resolution", "16", "--preset", "tiny", "--dit-width", "64", "--dit-depth", "2", "--dit-heads", "4",
        "--patch", "2", "--shift", "1.0", "--prompts-per-step", "4", "--timesteps-per-prompt", "2", "--lr", "1e-3",
        "--warmup", "2", "--val-prompts", "2", "--sample-steps", "2", "--threads", "1", "--log-every", "1",
        "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "10"]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feat") / "features.safetensors",
                          feature_table([s.prompt for s in scenes.all_scenes()]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, features: Path, *extra: str, procs: int = 1, node: tuple[int, int, int] | None = None,
          env: dict | None = None, background: bool = False, kill_after: int | str | None = None,
          torchrun: tuple[str, ...] = ()):
    """`python -m unifusion_core.train` as one process, or under torchrun with `procs` processes
    (node = (node_rank, nnodes, port): one of several launches on 127.0.0.1). kill_after=N: every
    process SIGKILLs itself once N steps are done; "N:TERM": sends itself SIGTERM (env SIGNAL_RANK:
    that rank only; tests/train_killed.py). torchrun: more flags for torchrun."""
    script = ["-m", "unifusion_core.train"] if kill_after is None else [str(train_killed.SCRIPT), str(kill_after)]
    if procs == 1 and node is None:
        launch = [sys.executable, *script]
    elif node is None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                  *torchrun, *script]
    else:
        rank, nnodes, port = node
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={rank}",
                  f"--nproc-per-node={procs}", "--master-addr=127.0.0.1", f"--master-port={port}", *script]
    cmd = [*launch, "--out", str(out), "--features", str(features), *ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def losses_by_step(run: Path) -> dict[int, list[float]]:
    """Every loss logged for each step (a resume drops what a killed run logged after its state)."""
    out: dict[int, list[float]] = {}
    for x in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(x)
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOL, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory, features) -> Path:
    """The reference: one process, no process group, 6 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    ok(train(out, features))
    return out


def test_two_processes_train_what_one_does(tmp_path, features, single):
    out = tmp_path / "two"
    ok(train(out, features, procs=2))
    a, b = losses(single), losses(out)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), **TOL)
    assert_same_weights(single / "model.safetensors", out / "model.safetensors")  # the exported EMA
    sa, sb = read_tensors(list_states(single)[-1][1]), read_tensors(list_states(out)[-1][1])
    assert sa.keys() == sb.keys()
    for k in sa:  # weights, Adam moments, EMA: all of the state, gathered from two ranks' shards
        torch.testing.assert_close(sb[k], sa[k], **TOL, msg=k)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[-1]["world_size"] == 2 and len(rows[-1]["memory_gib_per_rank"]) == 2 and rows[-1]["tokens_per_s"] > 0
    # each rank wrote its own shards of the state
    last = list_states(out)[-1][1]
    assert sorted(p.name.split("-model")[0] for p in last.glob("*.safetensors")) == ["shard-00001", "shard-00002"]
    assert read_meta(last)["world_size"] == 2
    # the export loads in the nodes' path
    assert uf.load_model(out / "model.safetensors").config.sampling.size == (16, 16)


def test_sharded_run_stopped_resumes_on_one_process_then_on_two(tmp_path, features, single):
    out = tmp_path / "run"
    # a preemption's SIGTERM reaches rank 1 alone after step 2: both ranks stop at the end of step 3
    # (one all-reduce a step: none is left waiting in a collective), saving the state there
    stopped = train(out, features, procs=2, kill_after="2:TERM", env={"SIGNAL_RANK": "1"})
    assert stopped.returncode != 0 and [s for s, _ in list_states(out)] == [2, 3], stopped.stderr[-3000:]
    log = stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM at step 3 of 6" in log and "stopped by a signal to another rank at step 3 of 6" in log
    assert "exitcode  : 5" in log or "exitcode: 5" in log, log[-3000:]
    assert not (out / "model.safetensors").exists()
    # the consolidated export of the sharded state, by one process, loads in the nodes' path
    ok(train(out, features, "--resume", "--export-only"))
    assert uf.load_model(out / "model.safetensors").config.dit.depth == 2
    (out / "model.safetensors").unlink()
    # one process continues the 2-process state, and is killed in its turn after step 5 (state: step 4)
    again = train(out, features, "--resume", kill_after=5)
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    assert [s for s, _ in list_states(out)] == [2, 3, 4] and read_meta(list_states(out)[-1][1])["world_size"] == 1
    ok(train(out, features, "--resume", procs=2))  # and two processes finish the 6 steps
    by_step = losses_by_step(out)  # step 5, done twice, once in metrics.jsonl (the resume drops the first)
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6] and all(len(v) == 1 for v in by_step.values())
    torch.testing.assert_close(torch.tensor([v[-1] for v in by_step.values()]), torch.tensor(losses(single)), **TOL)
    assert_same_weights(single / "model.safetensors", out / "model.safetensors")


def test_slurms_sigusr1_to_torchrun_stops_every_rank_with_the_state_saved(tmp_path, features):
    """Slurm's --signal=USR1@SECONDS goes to the job's main process, torchrun: with SIGUSR1 among its
    --signals-to-handle (as docs/training.md says; by default torchrun dies of it and leaves its
    workers running unsignalled) it passes the signal on, and every rank stops at the same step."""
    out = tmp_path / "run"
    stopped = train(out, features, "--checkpoint-every", "100", procs=2, kill_after="2:USR1",
                    env={"SIGNAL_PARENT": "1", "SIGNAL_RANK": "0"},
                    torchrun=("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"))
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and log.count("stopped by SIGUSR1 at step 3 of 6: state saved") == 2, log[-3000:]
    assert [s for s, _ in list_states(out)] == [3]


def test_two_nodes_on_localhost_agree(tmp_path, features, single):
    out, port = tmp_path / "nodes", free_port()
    launches = [train(out, features, "--steps", "2", procs=1, node=(r, 2, port), background=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n".join(log[-3000:] for log in logs)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)[:2]), **TOL)
    assert read_meta(list_states(out)[-1][1])["world_size"] == 2


def test_a_diverging_sharded_run_stops_on_every_rank(tmp_path, features):
    """--lr 1e6 diverges (gradient norm inf from step 3): both ranks skip the same steps, then both
    stop at the same one (a rank that stepped while the other stopped would hang it); the good
    state stays, nothing is exported."""
    out = tmp_path / "nan"
    result = train(out, features, "--lr", "1e6", "--max-nonfinite", "1", procs=2)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "step 4: the loss is" in log, log[-3000:]
    assert "stopped (2 skipped steps, more than --max-nonfinite 1)" in log
    assert "exitcode  : 3" in log  # torchrun's report of each rank's status (its own is 1)
    assert [s for s, _ in list_states(out)] == [2] and not (out / "model.safetensors").exists()


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path, features):
    result = train(tmp_path / "odd", features, "--prompts-per-step", "3", procs=2)
    assert result.returncode != 0
    assert "prompts_per_step (3) must be a multiple of the number of processes (2)" in result.stdout + result.stderr


def test_hsdp_mesh_and_checkpointed_blocks_train_what_one_process_does(tmp_path, features, single):
    """2 processes as 2 replicas of 1 shard each (the replicate x shard mesh), every block's
    activations recomputed in the backward: still the single process's run."""
    out = tmp_path / "hsdp"
    ok(train(out, features, "--hsdp-replicas", "2", "--gradient-checkpointing", procs=2))
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), **TOL)
    assert_same_weights(single / "model.safetensors", out / "model.safetensors")


def test_accumulated_micro_batches_on_two_processes_train_what_one_process_does(tmp_path, features, single):
    """2 micro-batches of half the prompts, each split over 2 sharded ranks: the single process's run."""
    out = tmp_path / "accumulated"
    half = str(int(ARGS[ARGS.index("--prompts-per-step") + 1]) // 2)
    ok(train(out, features, "--prompts-per-step", half, "--grad-accumulation", "2", procs=2))
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), **TOL)
    assert_same_weights(single / "model.safetensors", out / "model.safetensors")


def test_bf16_parameters_with_fp32_reduction_train(tmp_path, features):
    """FSDP2's MixedPrecisionPolicy (bf16 compute copies, fp32 gradient reduction and master
    weights): finite losses, fp32 weights in the state and the export. With 90 % caption dropout
    most steps drop both prompts of a rank: it must still run LAP and the refiner in step with the
    other rank (else FSDP's collectives hang)."""
    out = tmp_path / "bf16"
    ok(train(out, features, "--precision", "bf16", "--steps", "2", "--cond-dropout", "0.9", procs=2))
    assert all(math.isfinite(x) for x in losses(out)) and len(losses(out)) == 2
    state = read_tensors(list_states(out)[-1][1])
    assert {v.dtype for k, v in state.items() if k.startswith(("model.", "ema."))} == {torch.float32}


def test_nodes_that_do_not_share_the_run_folder_are_refused(tmp_path, features):
    """Two launches on 127.0.0.1 with different --out folders stand for two nodes with their own
    disks: a clear error on both, before any training (not a hang at the first save)."""
    port = free_port()
    launches = [train(tmp_path / f"disk{r}", features, "--steps", "2", procs=1, node=(r, 2, port), background=True)
                for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in launches]
    assert all(p.returncode != 0 for p in launches)
    assert any("must be on a filesystem all nodes share" in log for log in logs), logs[0][-2000:]
    assert not list(tmp_path.glob("disk*/checkpoints/*"))


def test_a_lora_on_two_processes_trains_what_one_process_does(tmp_path, features, single):
    """LoRA on a frozen checkpoint under torchrun: FSDP2 shards blocks whose frozen base and trainable
    adapters share a module; 2 processes train the losses, adapters and merged export of 1, with
    rank dropout too."""
    base = single / "model.safetensors"
    lora = ["--init-from", str(base), "--lora-rank", "4", "--lora-targets", "dit,refiner", "--lr", "1e-2",
            "--lora-dropout", "0.3"]  # its masks keyed by the sample's global index: the same on 1 or 2
    runs = {}
    for procs in (1, 2):
        runs[procs] = tmp_path / f"lora-{procs}"
        ok(train(runs[procs], features, *lora, procs=procs))
    torch.testing.assert_close(torch.tensor(losses(runs[2])), torch.tensor(losses(runs[1])), **TOL)
    assert_same_weights(runs[1] / "lora.safetensors", runs[2] / "lora.safetensors")
    assert_same_weights(runs[1] / "model.safetensors", runs[2] / "model.safetensors")
    adapters = load_file(str(runs[2] / "lora.safetensors"))
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in adapters.items())  # it trained
