"""Training on several processes with torch.distributed, as torchrun starts them:

    torchrun --nproc-per-node 4 -m zforcing_cli train ...                      one machine, 4 GPUs
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m zforcing_cli train ...               the same on each of 2 machines

torchrun gives every process its RANK, LOCAL_RANK and WORLD_SIZE. Each process (a rank) trains a
replica of the model in DistributedDataParallel: NCCL on GPUs (rank r of a machine on
cuda:LOCAL_RANK), gloo on CPUs. The batch size stays the global batch: every rank computes the
same data order and reads its contiguous share of each batch (`Group.rows`) from the
memory-mapped dataset, so N ranks take the updates one process would take (train.py). Only rank 0
touches the run folder and reports progress.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .device import DeviceError, resolve_device
from .errors import UsageError
from .launch import PeerFailed, launched_rank

T = TypeVar("T")
# How long a rank waits in a collective for the others before giving up. torchrun ends the
# other ranks as soon as one fails, so this only matters when a rank hangs without failing.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
STOP_REASONS = ("request", "SIGINT", "SIGTERM")  # what the ranks of a distributed run agree on


@dataclass
class Group:
    """This process's place among the ranks, and the collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def single_node(self) -> bool:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) == self.world_size

    def rows(self, count: int) -> slice:
        """This rank's share of `count` rows: contiguous, the shares' sizes differing by at most one."""
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """The tensor combined over the ranks, in place (asynchronous on GPUs, like any kernel)."""
        dist.all_reduce(tensor, op=op)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value on every rank (the others pass anything); tensors travel through the CPU."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def agree(self, stop_reason: str | None, checkpoint_due: bool) -> tuple[str | None, bool]:
        """Whether any rank was asked to stop (torchrun passes a signal to all of them, which may
        notice it at different updates), and whether rank 0's clock calls for a checkpoint,
        settled by one all-reduce so that every rank does the same next: (the reason all ranks
        stop for, or None; whether they checkpoint). A reason outside STOP_REASONS counts as
        "request"; checkpoint_due counts on rank 0 only."""
        code = 0 if stop_reason is None else 1 + (STOP_REASONS.index(stop_reason) if stop_reason in STOP_REASONS else 0)
        flags = torch.tensor([code, int(self.is_main and checkpoint_due)], device=self.device)
        code, clock = self.all_reduce(flags, dist.ReduceOp.MAX).tolist()
        return (STOP_REASONS[code - 1] if code else None), bool(clock)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        """The module in DistributedDataParallel, which averages the gradients over the ranks in
        the backward pass. find_unused: some parameters may get no gradient from the module's
        output; DDP then looks for them each update (and leaves them without one, as one
        process does)."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def start(device_spec: str) -> Group | None:
    """Join the ranks torchrun started (None for a process on its own): NCCL with
    this rank's GPU, cuda:LOCAL_RANK, when --device is auto or cuda and there are GPUs; gloo on
    the CPU otherwise."""
    rank = launched_rank()
    if rank is None:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = rank_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = Group(rank, world_size, local_rank, device)
    dist.init_process_group(group.backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return group


@contextmanager
def joined(device_spec: str) -> Iterator[Group | None]:
    """start(device_spec) for the length of a block, leaving the process group at its end."""
    group = start(device_spec)
    try:
        yield group
    finally:
        if group is not None:
            group.close()


def rank_device(device_spec: str, local_rank: int) -> torch.device:
    spec = device_spec.strip().lower()
    if spec.startswith("cuda:"):
        raise UsageError(
            f"--device {spec} names one GPU, but under torchrun each process takes its own (cuda:LOCAL_RANK).",
            "Use --device cuda (or auto) with torchrun, and CUDA_VISIBLE_DEVICES to choose the GPUs.",
        )
    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(
            f"The process with LOCAL_RANK {local_rank} has no GPU: this machine has {count}.",
            f"Start at most {count} processes per machine (--nproc-per-node {count}), or train on CPUs with --device cpu.",
        )
    return torch.device("cuda", local_rank)


def from_main(group: Group | None, work: Callable[[], T], shared: Callable[[T], T] | None = None) -> T:
    """work() on rank 0 and its (picklable) result on every rank; without a group, work().
    shared: what of the result the other ranks get (by default all of it), for a result part
    of which cannot travel (an open dataset); rank 0 keeps the whole result.

    When work fails on rank 0, the other ranks raise PeerFailed with its exit code instead of
    waiting for a result that never comes."""
    if group is None:
        return work()
    if group.is_main:
        try:
            result = work()
        except BaseException as error:
            group.broadcast((False, getattr(error, "exit_code", 1)))
            raise
        group.broadcast((True, result if shared is None else shared(result)))
        return result
    succeeded, value = group.broadcast(None)
    if not succeeded:
        raise PeerFailed(value)
    return value


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank's own randomness (dropout) at update `step`: different on every rank,
    and the same again when a run resumes."""
    return int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1)[0])
