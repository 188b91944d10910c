"""torch.distributed helpers for runs under ``torchrun`` (gloo on CPU, nccl on CUDA).

Nothing here launches processes: ``torchrun --nproc-per-node K -m ssprompt.cli ...`` does.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that ``torchrun`` describes in the environment, once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get(
            "SSPROMPT_BACKEND", "") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


_LOCAL = [False]


@contextlib.contextmanager
def local_only():
    """Within this block the process acts alone (no sharding, no all-reduce, no metric sync),
    as in a study whose ranks run different cells."""
    _LOCAL.append(True)
    try:
        yield
    finally:
        _LOCAL.pop()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group; (0, 1) alone or inside ``local_only``."""
    if _LOCAL[-1]:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(n: int) -> list[int]:
    """This rank's indices of ``range(n)`` (strided, so shards differ by at most one)."""
    rank, world = rank_world()
    return list(range(rank, n, world))


def all_reduce_mean_(params) -> None:
    """Average the gradients of ``params`` across ranks (no-op in one process)."""
    rank, world = rank_world()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
