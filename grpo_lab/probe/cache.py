"""A probe point computed once per policy: the warm start is the same policy for every trial of a seed.

The key is a hash of everything the probe's numbers depend on: the policy's weights (its ``state_dict``
bytes, so two trials share an entry exactly when they probe the same parameters), the probe's settings
(estimators, batches, seed, split ...), the module settings that shape a rollout and its reward (G,
lengths, temperature, aggregation, rewards and weights, policy config), the queries the batches are drawn
from, and the torch version. Entries are JSON files written atomically (beside, then renamed). Two trials
that miss the same entry at once do not both compute it: the first takes an exclusive ``fcntl`` lock on
``<key>.lock`` and the second waits for it, then reads the entry (where ``fcntl`` is missing, both compute
and the last rename wins: the same numbers). A lock file left by a killed process blocks nobody (the kernel
releases an ``fcntl`` lock with its process). An entry that does not parse as a JSON object (truncated by a
full disk or an interrupted copy) is moved aside to ``<key>.json.broken`` with one warning line and
computed again; a write that fails (a full disk) leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from grpo_lab.system.locks import exclusive_lock

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # 4: per-point intervals by the delta method (intervals.py); 3: rows carry the baseline map
MODULE_KEYS = ("num_generations", "max_new_tokens", "min_new_tokens", "temperature", "aggregation", "rewards",
               "reward_weights", "invalid_rewards", "policy")


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def cache_key(module, queries: list[dict], settings: dict) -> str:
    """Hex key of one probe point: weights, probe ``settings``, rollout settings, queries, torch version."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    hp = module.hparams
    ident = {
        "version": CACHE_VERSION, "torch": torch.__version__, "settings": settings,
        "module": {k: _jsonable(hp.get(k)) for k in MODULE_KEYS},
        "queries": hashlib.sha256(json.dumps(queries, sort_keys=True, default=str).encode()).hexdigest(),
    }
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def write_json(path: Path, payload) -> None:
    """Atomically (written beside, then renamed); non-finite floats as the JSON extensions Infinity/NaN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_entry(path: Path) -> dict | None:
    """The entry at ``path``, or None when it is missing; a file that is not a JSON object (truncated,
    corrupt) is moved aside to ``<name>.broken`` with one warning line and also gives None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
        if isinstance(value, dict):
            return value
        reason = f"a JSON {type(value).__name__}, not an object"
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        reason = f"{type(err).__name__}: {err}"
    aside = path.with_name(path.name + ".broken")
    os.replace(path, aside)
    log.warning("warning: probe cache entry %s is corrupt (%s): moved to %s, computing it again", path,
                reason, aside)
    return None


def cached(cache_dir: str | Path | None, key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(value, hit)``: the entry ``key`` under ``cache_dir``, or ``compute()`` stored there (no cache
    with ``cache_dir=None``). Concurrent callers with one key compute it once (see the module docstring)."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{key}.json"
    with exclusive_lock(Path(cache_dir) / f"{key}.lock"):
        value = read_entry(path)
        if value is not None:
            return value, True
        value = compute()
        write_json(path, value)
        return value, False
