"""Data parallelism over torch.distributed: calibration sequences are sharded across ranks.

Rank r holds the global sequences r, r + W, r + 2W, ... Every rank draws the same global batch
(same seeded generator), computes the loss on the part it holds, weighted by its share of the
batch, and the gradients are summed with all_reduce: each step equals the single-process step on
the whole batch, up to float summation order. GPTQ Hessians, losses and error statistics are summed
the same way. With no process group (or one process) every function here is a no-op.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def init_from_env() -> str | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and local_ranks <= torch.cuda.device_count():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # small statistics (losses, error sums) stay on the CPU: gloo for those, nccl for the rest
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return f"cuda:{local}"
    if torch.cuda.is_available():
        print(f"crossblock: {local_ranks} ranks per node but {torch.cuda.device_count()} GPU(s): "
              "running every rank on the CPU", file=sys.stderr)
    dist.init_process_group("gloo")
    return "cpu"


def shard(x: torch.Tensor) -> torch.Tensor:
    rank, size = rank_and_size()
    return x[rank::size]


def local_part(global_idx: torch.Tensor) -> torch.Tensor:
    """Local row positions of the global indices this rank holds."""
    rank, size = rank_and_size()
    return global_idx[global_idx % size == rank] // size


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if rank_and_size()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_grads_(params):
    if rank_and_size()[1] == 1:
        return
    for p in params:
        if p.grad is None:  # this rank held none of the batch
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def barrier():
    if rank_and_size()[1] > 1:
        dist.barrier()
