"""The two collective calls of a training step, safe on one process (then they return their input)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_processes(x: Tensor) -> Tensor:
    """Σ of ``x`` over the processes (a copy; ``x`` itself when there is one process)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def min_over_processes(n: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``n`` over the processes."""
    if world_size() == 1:
        return n
    t = torch.tensor(n, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)
