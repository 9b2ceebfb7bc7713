"""Training on several processes with PyTorch's own engine: torchrun, FSDP2 and DCP.

One entry point: `python -m unifusion_core.train ...` trains in one process; the same command
under `torchrun --nproc_per_node=N -m unifusion_core.train ...` (several nodes: `--nnodes`,
`--node-rank` or a rendezvous) trains in N, the model sharded with FSDP2 (`fully_shard` on every
LAP, refiner and DiT block, then the root; torchtitan's layout), bf16 parameters with fp32
gradient reduction under `--precision bf16`, an HSDP mesh (replicate x shard) with
`--hsdp-replicas R`.

Why the runs do not depend on the number of processes: every rank draws the same global batch
(the task mixture's draws and the noise, timesteps and dropout of step s are functions of the
seed and s) and trains its own contiguous slice of the prompts; FSDP averages the gradients over
the ranks, which is the gradient of the whole batch's mean loss. So 2 processes train what 1
does (up to the order of floating-point sums), every rank's noise is its own slice of the step's
noise, and a state saved by N processes resumes on M.

The frozen VLM (when features are computed online) is replicated, one copy per rank on the
rank's own device, not sharded: a sharded VLM would need every rank to run the same number of VLM
forwards in lockstep, which feature caches (a hit on one rank, a miss on another) break.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and the device mesh (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh when sharded

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def part(self, n: int, what: str = "prompts_per_step") -> slice:
        """This rank's contiguous share of n global items."""
        if n % self.world:
            raise ValueError(f"{what} ({n}) must be a multiple of the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def sum_(self, x: Tensor) -> Tensor:
        """All-reduce sum in place (gloo has no average)."""
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's x, in rank order."""
        if self.world == 1:
            return [x]
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x)
        return out

    def gather_objects(self, value) -> list:
        """Every rank's value (a small picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        """Rank 0's value (a small picklable object: a path, None) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device: str, replicas: int = 1, timeout_minutes: float = 30) -> tuple[Dist, torch.device]:
    """The process group when launched by torchrun (WORLD_SIZE set), else a single process.

    The device: under torchrun with a CUDA device, each rank takes cuda:LOCAL_RANK (never all on
    GPU 0); gloo on CPUs, NCCL on GPUs."""
    dev = torch.device(device)
    if "WORLD_SIZE" not in os.environ:  # launched by torchrun or not
        return Dist(), dev
    world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for the few CPU tensors the loop reduces (bad-sample slots,
        # loss bins, the time-limit flag)
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    if replicas < 1 or world % replicas:
        raise ValueError(f"hsdp_replicas ({replicas}) must divide the number of processes ({world})")
    from torch.distributed.device_mesh import init_device_mesh

    if replicas > 1:  # HSDP: parameters sharded within a group, the groups replicas of each other
        mesh = init_device_mesh(dev.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    if rank:
        logging.getLogger("unifusion_core").setLevel(logging.WARNING)  # one log: rank 0's
    return Dist(rank, world, local, mesh), dev


def check_shared(folder, d: Dist) -> None:
    """Every rank must see the run folder rank 0 writes (states are written shard by shard into
    it and read back by any rank): a node on its own disk would hang or resume something else."""
    from pathlib import Path

    if d.world == 1:
        return
    probe = Path(folder) / f".shared-{os.getpid()}" if d.main else None
    name = d.broadcast(probe.name if probe else None)
    if d.main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(name)
    d.barrier()
    seen = torch.tensor([float((Path(folder) / name).is_file())])
    d.barrier()
    if d.main:
        probe.unlink(missing_ok=True)
    if d.sum_(seen).item() < d.world:
        raise ValueError(f"not every process sees {folder}: under torchrun across nodes --out must be on a filesystem "
                         "all nodes share (the training states are written shard by shard into it)")


def shard(root: nn.Module, d: Dist, bf16: bool) -> nn.Module:
    """FSDP2: every LAP, refiner and DiT block of `root.model`, then `root` (the training step's
    module, so the remaining parameters, the embedders, norms and final layers, form one group
    gathered for the whole step). Blocks reshard after their forward except the last, which the
    backward needs at once (Cosmos' reshard_after_forward=i<last)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Inputs are not cast: t and the features stay fp32 (the step runs under autocast, as in one process)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None,
                              cast_forward_inputs=False)
    model = root.model
    blocks = [b for part in (model.lap, model.refiner, model.dit) for b in part.blocks]
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(root, mesh=d.mesh, mp_policy=mp)
    return root


def local(t: Tensor) -> Tensor:
    """The shard this rank holds (a plain tensor is its own)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (collective for sharded ones)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
