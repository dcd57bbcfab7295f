"""Small torch.distributed helpers: who am I, sum a tensor over ranks, split a dataset over ranks.

Everything degrades to the single-process answer when no process group is initialised, so
callers never branch on it. gloo serves CPU tensors; under nccl tensors travel through the
current CUDA device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes in the group, 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0 (the process that prints and writes files)."""
    return get_rank() == 0


def default_backend() -> str:
    """'nccl' when CUDA is usable, else 'gloo'."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; True if distributed.

    Does nothing (returns False) when WORLD_SIZE is unset or 1, so a plain `python` run is a
    one-process run. Under nccl each process binds to the GPU named by LOCAL_RANK.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None) -> Iterator[bool]:
    """:func:`init_from_env` for the block; a process group started here is destroyed at its end
    (one that existed before is left alone). Yields whether the run is distributed."""
    started_here = not is_dist() and init_from_env(backend)
    try:
        yield is_dist()
    finally:
        if started_here:
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device).

    Without a process group this is a copy. Every rank must call it (it is a collective).
    """
    out = tensor.detach().clone()
    if not is_dist() or get_world_size() == 1:
        return out
    if dist.get_backend() == "nccl":
        # nccl only moves CUDA tensors; go through this process's device and come back.
        work = out.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def average_gradients(params: Sequence[torch.Tensor], bucket_bytes: int = 25 << 20) -> None:
    """Each parameter's ``.grad`` replaced by its mean over the ranks, as DistributedDataParallel's
    default reduction computes it (each rank's gradient divided by the world size, then summed),
    in flat buckets of about ``bucket_bytes`` per dtype. For gradients DDP does not see (the
    trainer's GradShadow hands them over outside autograd). Every rank must call it with the
    same parameters in the same order."""
    world = get_world_size()
    if not is_dist() or world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        if not buckets or size + g.numel() * g.element_size() > bucket_bytes or buckets[-1][0].dtype != g.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel() * g.element_size()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])   # in each gradient's logical order
        flat.div_(world)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        parts = torch.split(flat, [g.numel() for g in bucket])
        torch._foreach_copy_(bucket, [t.view(g.shape) for t, g in zip(parts, bucket, strict=True)])


def shard_indices(length: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The dataset indices this rank evaluates: rank, rank + W, rank + 2W, ...

    The shards are disjoint and cover every index exactly once. Unlike DistributedSampler there
    is no padding with repeated samples, which would count some images twice in the metric.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return range(rank, length, world_size)
