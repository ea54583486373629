"""Seeded blocks that leave the global random state as they found it, on the CPU and on a CUDA device.

``torch.random.fork_rng(devices=[])`` restores only the CPU generator, while ``torch.manual_seed`` seeds the
CPU *and every CUDA device's* generator: the two together, as grpo_lab used them, silently re-seeded the
GPU's sampling stream with the policy's init seed (or, in validation, with the step's seed). That is why a
GPU fit under ``ddp``/``fsdp`` (whose setup calls Lightning's ``reset_seed``) sampled other completions at
step 1 than a single-device fit (measured on an H100: the same weights, batch and CPU state, another CUDA
state), and why validation moved the GPU's training samples. :func:`seeded` seeds and restores exactly the
generators it names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside, the CPU generator (and ``device``'s, when it is a CUDA device) starts from ``seed``; after,
    they are back where they were. Other devices' generators are neither seeded nor touched."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)  # this device only (torch.manual_seed would seed them all)
        yield
