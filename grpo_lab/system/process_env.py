"""What a grpo_lab program sets for its process, once, where it starts: importing grpo_lab changes nothing.

``OFFLINE_ENV`` is the one list of environment variables every program wants: nothing is downloaded from a
model hub (models are built from a config, tokenizers locally; every load is ``local_files_only``), the
tokenizers' own thread pool stays off (the machine's cores belong to torch, and it warns after a fork), and
no hub progress bars. Every entry point calls :func:`configure_process` first thing: those that run
through ``grpo_lab.system.entry.run_cli`` (``grpo-lab``, ``grpo-lab-ablate``, ``python -m grpo_lab.variance``,
``python -m grpo_lab.model.build_model``) get it there; the probe's precision run, the bench scripts and
the test
suite call it themselves. Code that starts another process gives it :func:`child_env` (or
``grpo_lab.system.processes.child_env``, which is that plus the request to die with its parent), and
:func:`thread_env` when the child should use a given number of cores.

A value the user already set wins over ours. ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` when it is first
imported (importing ``lightning`` imports it, through torchmetrics), so in the entry point's own process the
variable guards only what imports it later; every child process (a DDP rank, an ablation trial's fit, a bench
peer) starts with it set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process: ``base`` (default ``os.environ``) with ``OFFLINE_ENV`` filled in
    where unset, then ``extra`` (which always wins)."""
    return {**OFFLINE_ENV, **(os.environ if base is None else base), **extra}


def thread_env(threads: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` for a child that should use ``threads`` cores (torch's
    intra-op pool reads them at import)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def configure_process() -> None:
    """For an entry point: ``OFFLINE_ENV`` into ``os.environ`` (where unset), and transformers' logging at
    errors only, without progress bars."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
