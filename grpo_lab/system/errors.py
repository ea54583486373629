"""A user's mistake is one line, a bug keeps its traceback.

Code that validates what a user gave (a file, a name, a config value, the user's own reward function) raises
``UserError`` or one of its subclasses; every entry point (``grpo-lab``, ``grpo-lab-ablate``,
``python -m grpo_lab.variance``) runs through ``grpo_lab.system.entry.run_cli``, which prints such an error
as::

    error: reward function 'my_rewards:score' returned 15 values for 16 completions

on stderr and exits with status 2. Anything else (a bug in our code or in a library) keeps its traceback.
``--debug`` (accepted by every entry point, removed from the arguments before the parser sees them) or
``GRPO_LAB_DEBUG=1`` shows the traceback of user errors too; ``--debug`` also sets ``GRPO_LAB_DEBUG=1`` for
the processes the command starts (a DDP rank, an ablation trial's fit).

A full disk (``ENOSPC``, ``EDQUOT``, or ``EFBIG`` past a file-size limit) is not a bug either: ``run_cli``
prints it as one ``error:`` line too (:func:`disk_full_line`), exit status 2. What was being written is not
trusted later: the caches check their entries, Lightning renames a checkpoint into place only once written.

``UserError`` subclasses ``ValueError`` and its two siblings also subclass ``FileNotFoundError`` and
``RuntimeError``, so ``except ValueError`` (or ``FileNotFoundError`` / ``RuntimeError``) around library
calls keeps working.

This module imports nothing of grpo_lab (every module that raises a ``UserError`` imports it): the process
control of an entry point lives in ``grpo_lab.system.entry``.
"""

from __future__ import annotations

import errno
import os

DEBUG_FLAG = "--debug"
DEBUG_ENV = "GRPO_LAB_DEBUG"
EXIT_USER_ERROR = 2  # as argparse's own usage errors
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(ValueError):
    """Something the user gave is wrong: the message names the cause and the fix."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class UserRuntimeError(UserError, RuntimeError):
    """The run cannot go on because of the user's code or settings (their reward function raised, the loss
    stayed non-finite step after step)."""


def debug_enabled() -> bool:
    """``GRPO_LAB_DEBUG`` is set to anything but ``""``/``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line; a hint to ``--debug`` when the error wraps another exception (e.g.
    the user's reward function raised), whose traceback is then worth seeing."""
    message = " ".join(str(err).split()) or type(err).__name__
    hint = f" (rerun with {DEBUG_FLAG} for the traceback)" if err.__cause__ is not None else ""
    return f"error: {message}{hint}"


def disk_full_line(err: OSError) -> str | None:
    """``error: …`` for an ``OSError`` of a full disk (or a file-size limit), naming the file when the error
    does; None for any other ``OSError``."""
    if err.errno not in DISK_FULL:
        return None
    where = f" writing {err.filename}" if err.filename else ""
    return (f"error: no space left{where} ({err.strerror}): free some space and rerun (a fit resumes from "
            "its last checkpoint with --ckpt_path last, a study with the same command)")
