"""How a trial's fit runs: the ``grpo-lab fit`` command, a process of its own tied to the runner's life, or
a long-lived worker (``worker.py``) when the trial is one process; ``FitFailed`` with the log's tail when
it fails. Split from ``trial.py`` (issue 22: one job per file)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ablations.runner.worker import WorkerDied, WorkerPool
from grpo_lab.system.process_env import thread_env
from grpo_lab.system.processes import child_env, parent_death_preexec

REPO_ROOT = Path(__file__).resolve().parents[2]  # ablations/runner/launch.py -> the repository


class FitFailed(RuntimeError):
    """A trial's ``grpo-lab fit`` exited non-zero (the message carries the tail of its ``fit.log``)."""


PEERS = {"grpo_lab": "grpo_lab.cli", "trl": "ablations.runner.trl_peer"}
"""What trains a trial, by its ``peer`` param (the ``trl_parity`` space): grpo_lab, or TRL's GRPOTrainer on
the same config (``ablations/runner/trl_peer.py``, always in a process of its own)."""


def grpo_command(sub: str, base_config: str, overlay: Path, module: str = "grpo_lab.cli") -> list[str]:
    """``python -m grpo_lab.cli <sub> --config <base> --config <overlay>`` (base.yaml comes first by default);
    ``module`` another entry point that takes the same arguments (``PEERS``)."""
    return [sys.executable, "-m", module, sub, "--config", base_config, "--config", str(overlay)]


def launch(cmd: list[str], log_path: Path, threads: int, cwd: str | Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log_path`` and ``threads`` BLAS/OpenMP threads, tied to this
    process's life (``grpo_lab.system.processes``): it, and every process it starts that calls
    ``die_with_parent``
    (any grpo_lab entry point, e.g. a DDP fit's second rank), is SIGKILLed when the runner dies."""
    env = {**child_env(), **thread_env(threads), **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            preexec_fn=parent_death_preexec(),
        )


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_fit(cmd: list[str], log_path: Path, threads: int, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` to completion (killing it if this thread is interrupted).

    Raises ``FitFailed`` with the log's tail if the command exits non-zero.
    """
    proc = launch(cmd, log_path, threads, cwd, env)
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise FitFailed(f"`{shlex.join(cmd)}` exited with {rc}; last lines of "
                        f"{log_path}:\n{log_tail(log_path)}")


def trainer_settings(base_config: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``trainer`` settings after base.yaml, the space's base config and the trial's overrides."""
    trainer: dict[str, Any] = {}
    for path in (REPO_ROOT / "configs" / "base.yaml", base_config):
        if Path(path).is_file():
            trainer.update((yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {})
    trainer.update({k.removeprefix("trainer."): v for k, v in overrides.items() if k.startswith("trainer.")})
    return trainer


def runs_in_process(base_config: str | Path, overrides: dict[str, Any]) -> bool:
    """Whether a trial can run inside a worker (``ablations/runner/worker.py``): one process, i.e. the
    Trainer's
    strategy is ``auto`` and it has one device and one node, after base.yaml, the space's base config and
    the trial's overrides. Several processes need their own: Lightning's DDP launcher starts the other
    ranks by running ``sys.argv`` again, and ``torch.distributed``'s state would outlive the trial."""
    trainer = trainer_settings(base_config, overrides)
    return trainer.get("strategy", "auto") in ("auto", None) and str(trainer.get("devices", 1)) == "1" \
        and str(trainer.get("num_nodes", 1)) == "1"


def execute(cmd: list[str], log_path: Path, threads: int, pool: WorkerPool | None = None,
            env: dict[str, str] | None = None, devices: list[str] | None = None) -> None:
    """Run ``grpo_command(...)``: in a worker of ``pool`` (its arguments after ``-m grpo_lab.cli``), or as
    its own process without one; ``devices``: on those GPUs only (``CUDA_VISIBLE_DEVICES``, a worker of
    theirs). Raises ``FitFailed`` with the log's tail if it fails or its worker dies."""
    visible = None if devices is None else ",".join(devices)  # its CUDA_VISIBLE_DEVICES
    if visible is not None:
        env = {**(env or {}), "CUDA_VISIBLE_DEVICES": visible}
    if pool is None:
        return run_fit(cmd, log_path, threads, env=env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    try:
        status = pool.run(cmd[3:], log_path, env, visible)
    except WorkerDied as err:
        raise FitFailed(f"{err}; last lines of {log_path}:\n{log_tail(log_path)}") from None
    if status != 0:
        raise FitFailed(f"`{shlex.join(cmd)}` exited with {status} in a worker; last lines of {log_path}:\n"
                        f"{log_tail(log_path)}")
