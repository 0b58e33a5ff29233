"""Data parallelism over processes started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init()` reads
them and joins the process group (NCCL on GPUs, each process on the GPU of its LOCAL_RANK;
gloo on CPUs). Without a launcher everything here is the identity of one process, so the
library calls these helpers unconditionally:

    pear.distributed.init()                     # no-op in one process
    mine = shard(batches)                       # this rank's share: batches[rank::world]
    everyone = gather(result)                   # list of every rank's result, on every rank
    all_reduce_mean_(grads)                     # gradients averaged over ranks, in place

Work is split by whole batches, so each rank runs exactly the batches a single process would
and the gathered outputs equal a single process's (same batches, same kernels).
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True when a launcher started several processes for this command."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> bool:
    """Join the launcher's process group once (True when there is more than one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item from its rank on. Items sorted
    longest first (as batches are) spread their cost evenly this way."""
    return list(items[rank()::world_size()])


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(tensors: Sequence[torch.Tensor | None]) -> None:
    """Average `tensors` (gradients) over ranks, in place; one flat all-reduce for all of them."""
    ts = [t for t in tensors if t is not None]
    if not active() or not ts:
        return
    flat = torch.cat([t.reshape(-1).float() for t in ts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    i = 0
    for t in ts:
        t.copy_(flat[i: i + t.numel()].view_as(t))
        i += t.numel()


def barrier() -> None:
    if active():
        dist.barrier()
