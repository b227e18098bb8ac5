"""Data parallelism for the trainer: join torchrun's process group, and the few collectives it uses.

``torchrun --nproc_per_node N -m minigpt train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. Each joins one process group (NCCL on
GPUs, gloo on CPU, which is how the tests run two ranks), trains on its own slice of every global
batch, and DDP averages gradients during the backward pass. Rank 0 is the *master*: the only one
that prints, writes files and samples. Everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "barrier", "broadcast_object", "gather_objects", "is_master_process", "max_across_ranks", "mean_across_ranks", "setup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its host (= its GPU index), number of ranks."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group torchrun describes (if any) and pin this rank's GPU."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= (gpus := torch.cuda.device_count()):
            raise ValueError(f"torchrun started local rank {local_rank}, but this machine shows {gpus} CUDA GPU(s): "
                             f"run one rank per GPU (--nproc-per-node {gpus}), or hide the GPUs "
                             "(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())


def is_master_process() -> bool:
    """True on rank 0 of a torchrun job (read from the environment: works before set-up too)."""
    return int(os.environ.get("RANK", "0")) == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over all ranks (a copy; ``t`` itself is untouched)."""
    if not _active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def max_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over all ranks (e.g. "has any rank been interrupted?")."""
    if not _active():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects: a tokenizer's JSON, a flag)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (e.g. each rank's RNG state)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if _active():
        dist.barrier()
