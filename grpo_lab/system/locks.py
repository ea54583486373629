"""An exclusive file lock between processes (``fcntl.flock``), for caches that several trials may fill at
once: the warm start (``model/warmstart.py``) and the probe cache (``probe/cache.py``). The kernel drops a
killed process's lock, so a lock file left behind blocks nobody."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if absent). Where ``fcntl`` is missing (not
    POSIX): no lock, and concurrent writers each write (the callers rename atomically, so the last wins)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
