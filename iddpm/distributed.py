"""Multi-process set-up for ``torchrun`` (DDP): reading its environment, starting and ending the process
group, and the few collectives the training loop needs outside DDP itself. Nothing here runs (or imports a
backend) in a single process."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "broadcast_from_main",
    "DistInfo",
    "all_finite",
    "cleanup_distributed",
    "gather",
    "is_dist",
    "replica_diff",
    "setup_distributed",
]


class DistInfo(NamedTuple):
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and its ``device``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment and start the process group if ``WORLD_SIZE > 1``.

    Backend: NCCL when the device is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise (CPU tests).
    Without ``WORLD_SIZE`` (a plain ``python -m iddpm train``) nothing is initialised.
    """
    from .runtime import get_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = get_device(None if device == "auto" else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_finite(params: list[Tensor]) -> bool:
    """Whether every tensor in ``params`` is finite on every rank. Collective under torchrun."""
    norms = torch._foreach_norm(params)
    ok = torch.stack([torch.isfinite(n) for n in norms]).all()
    if is_dist():
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def replica_diff(params: list[Tensor]) -> float:
    """Largest |param - rank 0's param| over all ranks (0.0 when replicas are identical). Collective."""
    flat = torch.cat([p.detach().flatten().float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def cleanup_distributed() -> None:
    """Destroy the process group if one was started."""
    if is_dist():
        dist.destroy_process_group()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process). Collective under torchrun."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
