"""Named phases of a training step and their wall time (verl's ``marked_timer``), cheap when nobody reads it.

``GRPOModule`` names the phases of its step (``with self.timer("rollout"): ...``); a profiler turns the
timer on and reads the seconds per phase after each step (``bench/profile_step.py``) instead of wrapping our
functions. While off (the default) a phase costs a method call that returns a shared ``nullcontext``; on, it
also names the phase in a ``torch.profiler`` trace (``record_function``) and, with ``synchronize``, waits for
queued CUDA work at both ends so GPU time lands in the phase that queued it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

_OFF = contextlib.nullcontext()


class PhaseTimer:
    """Accumulated seconds and entries per phase name since the last :meth:`pop` (phases may nest: each
    one counts its own wall time, an enclosing one included)."""

    def __init__(self) -> None:
        self.enabled = False
        self.synchronize = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name) if self.enabled else _OFF

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def _sync(self) -> None:
        if self.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def pop(self) -> tuple[dict[str, float], dict[str, int]]:
        """``(seconds, calls)`` per phase since the last pop; the timer starts again from zero."""
        out = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return out
