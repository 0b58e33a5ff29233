"""Data parallelism over processes started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init()` reads
them and joins the process group (NCCL on GPUs, each process on the GPU of its LOCAL_RANK,
or gloo where several processes share a GPU; gloo on CPUs). Without a launcher everything
here is the identity of one process, so the library calls these helpers unconditionally:

    pear.distributed.init()                     # no-op in one process
    mine = shard(batches)                       # this rank's share: batches[rank::world]
    everyone = gather(result)                   # list of every rank's result, on every rank
    loss = sum_grads_(alpha, loss)              # gradients and loss summed over ranks

Work is split by whole batches, so each rank runs exactly the batches a single process would
and the gathered outputs equal a single process's (same batches, same kernels).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
MEMORY_SHARE = 0.95  # of a GPU, split evenly between the processes that share it (the rest: CUDA contexts)


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
        gpus = torch.cuda.device_count()
        device = int(os.environ.get("LOCAL_RANK", "0")) % gpus
        torch.cuda.set_device(device)
        # Decoding is Python-bound, so two processes per GPU nearly double throughput; NCCL
        # cannot put two ranks on one GPU, and gloo carries the little these ranks exchange
        # (records, the coefficients' gradients) as well.
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        sharing = -(-per_host // gpus)  # processes on this GPU
        if sharing > 1:
            # Each process's allocator keeps what it once held: without a share, a process that
            # met long prompts early starves the others, and one that cannot halve a 1-row batch
            # fails the whole launch. With one, a process out of its share halves its own batch.
            torch.cuda.set_per_process_memory_fraction(MEMORY_SHARE / sharing, device)
        dist.init_process_group("nccl" if per_host <= gpus else "gloo")
    else:
        dist.init_process_group("gloo")
    # Leave the group while the interpreter is alive: a gloo group torn down at interpreter exit
    # can abort the process ("terminate called without an active exception", SIGABRT) after the
    # work is done (pytorch/pytorch#190489).
    atexit.register(_leave)
    return True


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # together: no rank tears its group down while another still uses it
        dist.destroy_process_group()


def end(rc: int) -> None:
    """In a launched process: leave the group with the others and end the process at once with
    `rc`, skipping the interpreter's teardown, where gloo's threads still aborted a finished rank
    now and then (SIGABRT, "terminate called without an active exception": 1 run in 5 of a
    2-rank discovery on CPU, none in 20 with this). Outputs are written and closed by then; the
    standard streams and logging are flushed here. In one process it returns."""
    if not active():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    _leave()
    os._exit(rc)


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


def split_rows(micro: int | None, n: int) -> int | None:
    """Rows per forward pass such that each of the ranks gets some of a batch of `n` rows:
    at most ceil(n / world_size) (one process: `micro` unchanged)."""
    if world_size() == 1:
        return micro
    share = -(-n // world_size())
    return share if micro is None else min(micro, share)


def sum_grads_(param: torch.Tensor, loss: float) -> float:
    """Sum `param.grad` and `loss` over ranks, each rank having run its share of one batch
    (losses weighted by share of the batch, so the sum is the whole batch's); returns the
    summed loss. One all-reduce, in float64: the sum does not depend on the split beyond
    the order of additions."""
    if not active():
        return loss
    g = param.grad if param.grad is not None else torch.zeros_like(param)
    dev = torch.device("cpu") if dist.get_backend() == "gloo" else g.device
    flat = torch.cat([g.detach().reshape(-1).to(dev, torch.float64),
                      torch.tensor([loss], dtype=torch.float64, device=dev)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    param.grad = flat[:-1].view_as(param).to(param.device, param.dtype)
    return float(flat[-1])


def barrier() -> None:
    if active():
        dist.barrier()
