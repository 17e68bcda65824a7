"""Data-parallel distillation on torchrun / DistributedDataParallel.

``torchrun --nproc-per-node N -m ddtool distill ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in their environment; :func:`process_group` joins them into one
process group (NCCL on CUDA, gloo on CPU) for the length of a run. The work is split by data,
the teacher included:

* ``--batch-size`` is the *global* batch B; each rank takes B/N inputs of every global batch. A
  ``DistributedSampler`` (without its own shuffling) deals the epoch's global order out
  round-robin, so the union of the ranks' local batches is the global batch a single process
  would take, and each rank runs the K-sample teacher forward on its own share only.
* When N does not divide the number of inputs, the sampler pads the order by repeating its first
  inputs, so every rank takes as many inputs per step as every other: the last global batch of
  an epoch then holds up to N - 1 repeated inputs, and no rank ever has fewer rows than another.
* Each rank draws its own dropout masks and perturbations (seeded by seed and rank).
* The student is wrapped in DistributedDataParallel: its gradients are all-reduced (averaged), so
  every rank takes the same SGD step. The ranks' local batches are of equal size (above), so that
  average is the gradient of the global batch's mean loss; no loss needs rescaling.
* Only rank 0 writes checkpoints, logs and the progress bar. Nothing is all-reduced per step but
  the gradients: at each check point (every ``CHECK_EVERY`` steps and at the end of an epoch,
  see ``ddtool.distillation``) one all-reduce carries every rank's flags, a non-finite loss or
  weight and a stop request (SIGINT/SIGTERM), so all ranks stop at the same step, rank 0 writes
  the resumable state once (with every rank's random state), and all exit with the same code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class World:
    """Where this process stands: rank and size of the group (1 process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_environment() -> World:
    """The world torchrun describes in the environment (a single process if it says nothing)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (NCCL for CUDA devices, gloo for the CPU) and leave
    it after; a group the caller made already is used and left alone."""
    if not world.distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(world: World, device: torch.device) -> torch.device:
    """One GPU per process on a node: rank r uses cuda:LOCAL_RANK."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def local_batch(world: World, batch_size: int) -> int:
    if batch_size % world.size:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must divide by the {world.size} processes")
    return batch_size // world.size


def shard(world: World, order: torch.Tensor) -> torch.Tensor:
    """This rank's share of an epoch's global order, dealt round-robin by a DistributedSampler."""
    if not world.distributed:
        return order
    sampler = torch.utils.data.DistributedSampler(range(len(order)), num_replicas=world.size, rank=world.rank,
                                                  shuffle=False, drop_last=False)
    return order[torch.tensor(list(iter(sampler)), dtype=torch.long)]


def max_over_ranks(world: World, flags: torch.Tensor) -> list[int]:
    """The largest value of each of the integer ``flags`` over all ranks (a non-finite loss, a
    signal number, or 0), read back to the host: one all-reduce and one synchronisation."""
    if world.distributed:
        flags = flags.to(torch.int64)
        if flags.device.type != "cuda":  # gloo reduces CPU tensors; NCCL CUDA ones
            flags = flags.cpu()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(v) for v in flags.tolist()]


def gather(world: World, obj):
    """Every rank's ``obj``, on every rank (a list in rank order)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
