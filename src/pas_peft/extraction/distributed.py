"""
Several processes, one fit: each process takes a shard of every split and the results are combined.

Under `accelerate launch` (or any launcher that initialises `torch.distributed`), item i of a split goes to
process `i % world_size`. Activation sums and counts are summed across processes before the division, so
every process builds the same vectors as a single process would (up to floating-point summation order),
and per-item answers are gathered back into the original order.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes of one fit."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "ProcessGroup":
        """
        Return this process's group: the initialised torch.distributed group, or a single process.

        A process started by a launcher (torchrun, `accelerate launch`) that has not initialised
        torch.distributed yet gets a default group here: gloo for CPU tensors, plus nccl for CUDA tensors
        on machines with GPUs, where each process also selects the GPU of its `LOCAL_RANK`.
        """
        if not dist.is_available():
            return cls()
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if torch.cuda.is_available():
                # NOTE: not run here (no GPU on the development machine).
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group(backend="cpu:gloo,cuda:nccl")
            else:
                dist.init_process_group(backend="gloo")
            # A gloo group still open at interpreter exit can abort the process ("terminate called without an
            # active exception") after the work is done, so the group opened here is closed at exit.
            atexit.register(_close_process_group)
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> tuple[list[int], list[T]]:
        """Return the original indices and the items this process handles."""
        indices = list(range(self.rank, len(items), self.world_size))
        return indices, [items[index] for index in indices]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the element-wise sum of `tensor` over all processes."""
        if self.world_size == 1:
            return tensor
        summed = tensor.detach().clone().to(_collective_device())
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.cpu()

    def gather_rows(self, indices: Sequence[int], rows: torch.Tensor, total: int) -> torch.Tensor:
        """Put each process's rows (one per local item) back at their original indices of a split of `total` items."""
        if self.world_size == 1:
            return rows
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (list(indices), rows.cpu()))
        result = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
        for shard_indices, shard_rows in gathered:
            if shard_indices:
                result[torch.tensor(shard_indices)] = shard_rows
        return result

    def raise_if_any_failed(self, failed: bool, what: str) -> None:
        """Raise on every process when `failed` is true on any of them, so no process waits for a dead one."""
        if self.world_size == 1:
            return
        if int(self.all_sum(torch.tensor([int(failed)]))[0]) and not failed:
            raise RuntimeError(f"Another process failed while {what}; see its error above.")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _collective_device() -> torch.device:
    """Return the device tensors must be on for the default group's collectives (CUDA for a NCCL-only group)."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
