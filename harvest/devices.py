"""Where this process runs: its rank under a launcher and its torch device. Harvest and train both ask here.

A launcher (`torchrun`, `accelerate launch`) sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR /
MASTER_PORT); without one a process is rank 0 of 1. Under a launcher each rank takes one GPU, the one its
LOCAL_RANK names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from saepipe.errors import SaepipeError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int
    launched: bool
    """Started by a launcher: several ranks, or one with a rendezvous (`torchrun --nproc_per_node 1`)."""


def rank_info() -> RankInfo:
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    launched = world > 1 or all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    return RankInfo(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), launched)


def rank_device(device: str, ranks: RankInfo) -> str:
    """`--device` as this rank uses it: `auto` is this rank's GPU when there is one (else the CPU), and
    `cuda` under a launcher is this rank's GPU; anything else stays as given."""
    if torch.cuda.is_available() and (device == "auto" or (device == "cuda" and ranks.launched)):
        return f"cuda:{ranks.local_rank}"
    return "cpu" if device == "auto" else device


def resolve_device(device: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; anything else is checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SaepipeError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaepipeError(
            f"--device {device} asked for CUDA but none is available; use --device auto or cpu"
        )
    return dev
