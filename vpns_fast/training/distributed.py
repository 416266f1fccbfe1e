"""Distributed data parallel: started by ``torchrun``; NCCL on GPUs, gloo on CPU.

Every rank computes the same thresholds from the same (all-reduced) scores; the trainer also
broadcasts rank 0's thresholds and label mapping so masks are identical by construction.
Only rank 0 writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device_type: str) -> tuple[int, int]:
    """(rank, world_size); initializes the process group when torchrun started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def _needs_cuda(tensor: torch.Tensor) -> bool:
    """NCCL only moves CUDA tensors; CPU tensors (counts, losses) take a round trip."""
    return tensor.device.type != "cuda" and dist.get_backend() == "nccl"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (any device, also CPU tensors under NCCL); returns ``tensor``."""
    if active():
        if _needs_cuda(tensor):
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        if _needs_cuda(tensor):
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(moved, src)
            tensor.copy_(moved)
        else:
            dist.broadcast(tensor, src)
    return tensor


def main_decides(flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank: for a decision only rank 0 can make (it alone takes the output
    folder's lock) that every rank must follow, so a refusal on rank 0 reaches the others instead of
    leaving them at the next collective for a rank that has gone. A collective: every rank calls it."""
    if not active():
        return flag
    decision = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(broadcast_(decision, src=0).item())


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
