"""Data-parallel training under `torchrun`: who this process is, and the few collectives the trainer needs.

Every process holds the whole model and takes its own slice of each global batch; DistributedDataParallel averages
the gradients. Only rank 0 writes files. A single process (no torchrun) is the same code with world_size 1, where
every collective is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all processes (a new tensor; the argument is unchanged)."""
        if not self.enabled:
            return tensor.clone()
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def on_main(self, fn, *args, **kwargs):
        """Run fn on rank 0 only and hand its result, or the exception it raised, to every process.

        For decisions that read shared files (the budget ledger, a run directory): if each rank read them itself,
        rank 0's first writes could make the ranks disagree and leave some waiting forever in a collective."""
        if not self.enabled:
            return fn(*args, **kwargs)
        outcome = [None, None]
        if self.is_main:
            try:
                outcome[0] = fn(*args, **kwargs)
            except Exception as e:  # re-raised below, on every rank
                outcome[1] = e
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment(device: str = "auto") -> Distributed:
    """The process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), initialised once: NCCL when training
    on CUDA (`device` auto with CUDA available, or cuda...), gloo otherwise. Without torchrun: a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
