"""Child processes that die with their parent, all the way down (Linux; elsewhere these do nothing).

A SIGKILLed process cannot clean up, so its children must be told by the kernel: ``PR_SET_PDEATHSIG``
sends a process SIGKILL when its parent dies. The flag is per process and is cleared by ``fork``, so a
grandchild (the second rank of a DDP fit, which Lightning starts by running the same command again) is not
covered by its parent's flag. Hence two halves:

- the parent starts a child with ``child_env()`` (``GRPO_LAB_PARENT_PID=<parent pid>`` in its environment)
  and, for a command that is not ours, ``preexec_fn=parent_death_preexec()``;
- the child calls ``die_with_parent()`` first thing (every grpo_lab entry point does, in
  ``grpo_lab.system.entry.run_cli``): it sets the flag on itself, exits at once if the parent already died
  while
  it was starting, and puts its own pid in ``GRPO_LAB_PARENT_PID``, so the processes *it* starts inherit the
  request and tie themselves to it in turn.

So SIGKILL of the study runner kills each trial's fit, which kills its DDP rank 1, and so on. Note the
kernel's "parent" is the *thread* that forked: start children from a thread that lives as long as they
should (the runner waits on each fit in the thread that started it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from grpo_lab.system import process_env as environment

PARENT_ENV = "GRPO_LAB_PARENT_PID"
PR_SET_PDEATHSIG = 1


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # resolved in the parent: a forked child before exec should only make the call


def supported() -> bool:
    return _PRCTL is not None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies. False if unsupported."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed parent whose own parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: trust kill(0)
        return True


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``grpo_lab.system.process_env.child_env(env)`` (``env``, default this process's environment, with
    the offline
    variables filled in where unset) plus the request that a child die with this process."""
    return environment.child_env(env, **{PARENT_ENV: str(os.getpid())})


def die_with_parent() -> bool:
    """If this process was started with ``child_env()``: die (SIGKILL) when the parent dies, exit now if it
    already has, and pass the request on to this process's own children. Returns whether it was asked (and
    the platform supports it)."""
    want = os.environ.get(PARENT_ENV)
    if not want or not want.isdigit() or not set_parent_death_signal():
        return False
    parent = int(want)
    # The flag only covers a parent that is still alive now: if ours died while we were starting, we were
    # re-parented (getppid changed) and nobody would ever kill us.
    if os.getppid() != parent and not _alive(parent):
        print(f"parent process {parent} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    os.environ[PARENT_ENV] = str(os.getpid())
    return True


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that sets the flag between fork and exec, so even a command
    that never calls ``die_with_parent`` (or is slow to start) dies with this process. None if unsupported."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the flag was set
            os._exit(1)

    return preexec
