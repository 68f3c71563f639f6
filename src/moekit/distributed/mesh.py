"""Process groups for expert and data parallelism: the layout, checked, then built.

World W ranks, expert-parallel degree P (``ep``), R = W / P replicas of each expert (``dp``).
Ranks form a [R, P] grid (``init_device_mesh``, dims ``("dp", "ep")``):

    rank = r * P + p      p: which slice of the experts it holds (E / P of them)
                          r: which replica of that slice

Every rank reads different tokens, so everything that is not an expert is data-parallel over
all W ranks (DDP, or FSDP2 with ``fsdp``); an expert's gradient is summed over the P ranks of
its ``ep`` row by the all-to-all's backward and averaged over the R ranks of its ``dp``
column. Without ``--ep`` (P = 1) this is plain data parallelism. Backend: gloo on CPU, nccl
on CUDA.

Only this file and ``parallelize.py`` know about process groups; layers stay single-device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.config import check_choice, check_int
from moekit.errors import UsageError

BALANCE_STATS = ("local", "global")
CKPT_FORMATS = ("sharded", "consolidated")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ParallelConfig:
    """How a run is split over ranks. Plain data: the mesh is built from it by ``init_mesh``."""

    ep: int = 1  # expert-parallel degree: the experts of each MoE layer are split over ep ranks
    dp: int | None = None  # replicas of each expert slice; None = world size / ep (it must be)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP replication for the non-expert weights
    # Switch loss from this rank's routing ("local", Megatron-Core's default: each micro-batch
    # balanced on its own) or from counts and probabilities all-reduced over every rank ("global":
    # the single-process loss of the whole global batch, exactly).
    balance_stats: str = "local"
    # "sharded": each rank writes its pieces with torch.distributed.checkpoint, nothing gathered,
    # and a finished run ends with one consolidated checkpoint (model.safetensors) as its export;
    # "consolidated": every checkpoint is gathered and written whole by rank 0 (one full copy).
    ckpt_format: str = "sharded"

    def __post_init__(self) -> None:
        check_int("ep", self.ep)
        if self.dp is not None:
            check_int("dp", self.dp)
        check_choice("balance_stats", self.balance_stats, BALANCE_STATS)
        check_choice("ckpt_format", self.ckpt_format, CKPT_FORMATS)


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or any launcher setting its variables) started."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def check_layout(pcfg: ParallelConfig, world: int, num_experts: int | None) -> int:
    """The data-parallel degree R for ``pcfg`` on ``world`` ranks; UsageError naming the flag if
    the numbers do not fit. ``num_experts`` None: a dense model (``--ep`` must then be 1)."""
    if world % pcfg.ep:
        raise UsageError(f"--ep {pcfg.ep} does not divide the world size {world}")
    if pcfg.ep > 1 and num_experts is None:
        raise UsageError(f"--ep {pcfg.ep} needs an MoE model; this one has no MoE layer")
    if num_experts is not None and num_experts % pcfg.ep:
        raise UsageError(f"--ep {pcfg.ep} does not divide the number of experts {num_experts}")
    dp = world // pcfg.ep
    if pcfg.dp is not None and pcfg.dp != dp:
        raise UsageError(f"--dp {pcfg.dp} times --ep {pcfg.ep} must equal the world size {world}")
    return dp


@dataclass
class DistContext:
    """The process groups of one run and this rank's place in them."""

    rank: int
    world: int
    ep: int  # P
    dp: int  # R
    device: torch.device
    mesh: DeviceMesh | None  # [R, P], dims ("dp", "ep"); None for a single process
    world_mesh: DeviceMesh | None = None  # [W]: what DDP and FSDP of the non-expert weights span

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder, logs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The ``"ep"`` or ``"dp"`` group of this rank; ``"world"``: the default group."""
        if self.mesh is None:
            return None
        return dist.group.WORLD if dim == "world" else self.mesh.get_group(dim)

    def shard_rows(self, batch: torch.Tensor, even: bool = True) -> torch.Tensor:
        """This rank's rows of a global batch [B, ...]: B / W consecutive rows. Every rank reads
        different sequences, so the global batch, and so the losses, do not depend on W.
        ``even=False`` (evaluation, whose sums are token-weighted) allows a B that W does not
        divide: the first B mod W ranks get one row more."""
        if not even:
            return torch.tensor_split(batch, self.world)[self.rank]
        if batch.shape[0] % self.world:
            raise UsageError(f"the global batch size {batch.shape[0]} is not divisible by the world size {self.world}")
        per = batch.shape[0] // self.world
        return batch[self.rank * per:(self.rank + 1) * per]


_joined_by_moekit: list[bool] = []  # the process group init_mesh created (a caller's own is left alone)


def leave_process_group() -> None:
    """Destroy the process group ``init_mesh`` joined, before the interpreter tears down.

    Left to finalization, gloo's worker threads can outlive the objects they hold and the
    rank dies with SIGABRT ("terminate called without an active exception") after its work
    is done, failing the whole torchrun job. A group the caller set up stays theirs to close.
    """
    if _joined_by_moekit and dist.is_initialized():
        dist.destroy_process_group()
    _joined_by_moekit.clear()


def backend_for(device_type: str) -> str:
    """NCCL between GPUs (``--device auto`` picks cuda when torch sees one), gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def single_process(device: torch.device) -> DistContext:
    return DistContext(rank=0, world=1, ep=1, dp=1, device=device, mesh=None)


def init_mesh(pcfg: ParallelConfig, num_experts: int | None, device_type: str | None = None) -> DistContext:
    """Join the process group that torchrun set up (if not yet joined) and build the [R, P] mesh.

    Checks the layout on every rank before any collective, so a bad ``--ep`` fails everywhere
    at once (rank 0 reports it) instead of leaving ranks waiting for each other.
    """
    if not dist.is_initialized() and not launched_by_torchrun():
        if pcfg.ep > 1 or pcfg.dp not in (None, 1) or pcfg.fsdp:
            raise UsageError(f"--ep/--dp/--fsdp need several processes: launch with torchrun --nproc-per-node N "
                             f"-m moekit train ... (got --ep {pcfg.ep} in a single process)")
        # --balance-stats / --ckpt-format alone: nothing to split, one process as usual
        return single_process(torch.device(device_type or ("cuda" if torch.cuda.is_available() else "cpu")))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_layout(pcfg, world, num_experts)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device_type))
        _joined_by_moekit.append(True)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device_type, (dp, pcfg.ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
    return DistContext(rank=rank, world=world, ep=pcfg.ep, dp=dp, device=device, mesh=mesh, world_mesh=world_mesh)


__all__ = ["ParallelConfig", "DistContext", "BALANCE_STATS", "CKPT_FORMATS", "backend_for", "check_layout", "init_mesh", "launched_by_torchrun",
           "leave_process_group", "single_process"]
