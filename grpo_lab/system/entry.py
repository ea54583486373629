"""What every entry point does around its ``main``: ``run_cli``.

``grpo-lab``, ``grpo-lab-ablate``, ``python -m grpo_lab.variance``, ``python -m
grpo_lab.model.build_model`` and the
TRL peer run through :func:`run_cli`: it is where a program's process is set up (tied to its parent's life,
``grpo_lab.system.processes.die_with_parent``; ``grpo_lab.system.process_env.configure_process``: the
offline environment
variables, transformers' logging), so importing grpo_lab changes nothing global, and where a user's mistake
becomes one ``error:`` line and exit status 2 (``grpo_lab.system.errors``: what counts as one, ``--debug``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from grpo_lab.system.errors import (
    DEBUG_ENV,
    DEBUG_FLAG,
    EXIT_USER_ERROR,
    UserError,
    debug_enabled,
    disk_full_line,
    error_line,
)
from grpo_lab.system.process_env import configure_process
from grpo_lab.system.processes import die_with_parent

T = TypeVar("T")


def run_cli(main: Callable[[list[str] | None], T], argv: list[str] | None = None) -> T:
    """Call ``main(argv)`` as an entry point: ``--debug`` taken out of the arguments (of ``sys.argv`` itself
    when ``argv`` is None, since LightningCLI and argparse read it there), the process tied to its parent's
    life when the parent asked for it (``grpo_lab.system.processes.die_with_parent``), the process set up
    (``grpo_lab.system.process_env.configure_process``), and a ``UserError`` turned into one ``error:``
    line on
    stderr and ``SystemExit(2)``. Returns what ``main`` returns."""
    die_with_parent()
    configure_process()
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        os.environ[DEBUG_ENV] = "1"  # an entry point may set the environment; children inherit it
        args = [a for a in args if a != DEBUG_FLAG]
        if argv is None:
            sys.argv[1:] = args
    try:
        return main(None if argv is None else args)
    except UserError as err:
        if debug_enabled():
            raise
        print(error_line(err), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as err:
        line = disk_full_line(err)
        if line is None or debug_enabled():
            raise
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
