"""The only module that touches torch.distributed: process group, print0, and reductions (rank and device
come from saepipe.harvest.devices, which harvest shares).

Every function works unchanged in a single process (no process group): reductions return their input.
The same `saepipe train` command runs under any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT:

    one process:      saepipe train --store S --hook H --out RUN
    2 GPUs, 1 node:   accelerate launch --multi_gpu --num_processes 2 -m saepipe train ...
                      (or: torchrun --nproc_per_node 2 -m saepipe train ...)
    2 nodes x 8 GPUs: accelerate launch --multi_gpu --num_machines 2 --num_processes 16 \
                        --machine_rank R --main_process_ip HOST0 --main_process_port 29500 -m saepipe train ...
    CPU, 2 processes: torchrun --nproc_per_node 2 -m saepipe train --device cpu ...   (gloo)

Gradients are averaged explicitly after backward (one flat all-reduce per SAE) instead of wrapping each
SAE in DistributedDataParallel: several SAEs train from one batch, and a visible reduction is easier to
check against the one-process run than DDP's hooks. The arithmetic is DDP's (mean over ranks).

On CUDA the process group has two backends, `cpu:gloo,cuda:nccl` (issue 16): NCCL refuses CPU tensors, and
a group that serves both kinds means a small CPU tensor (a flag, a start-up statistic) can never crash a
GPU run. The per-step reductions are built on the compute device anyway, so they take the NCCL path. A
launcher that sets MASTER_ADDR/MASTER_PORT gets a process group even with one rank (`torchrun
--nproc_per_node 1`), so the one-GPU run exercises the same collectives as the many-GPU one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saepipe.harvest.devices import rank_device, rank_info


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among `world_size`, its local rank, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """The process group's backend: gloo for CPU tensors always, NCCL for CUDA tensors on a GPU run."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: str = "auto") -> DistInfo:
    """Read the launcher's environment; start the process group under a launcher (or with several ranks)."""
    ranks = rank_info()
    dev = torch.device(rank_device(device, ranks))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ranks.launched and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dev), device_id=dev if dev.type == "cuda" else None)
    return DistInfo(ranks.rank, ranks.local_rank, ranks.world, dev)


def active() -> bool:
    """Whether a process group is up (reductions then really run, even over a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    t = t.clone()
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (floating point input)."""
    return all_reduce_sum(t) / world_size() if active() else t.clone()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if active():
        dist.barrier()


def all_agree(value: int, device: torch.device | str = "cpu") -> bool:
    """Whether every rank passed the same integer (e.g. a resume step); `device` is the compute device."""
    if not active():
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed = t.tolist()  # one host sync, at start-up
    return agreed[0] == value and -agreed[1] == value


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
