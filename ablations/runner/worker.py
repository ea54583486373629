"""Long-lived worker processes that run a study's trials in-process: torch, Lightning and transformers are
imported once per worker instead of once per trial (≈ 5.7 s of a 2-core Xeon's CPU each time).

The runner side is :class:`WorkerPool`; the worker side is ``python -m ablations.runner.worker``
(:func:`serve`).

- A worker is started with ``grpo_lab.system.processes.child_env()`` and ``parent_death_preexec()``, from one
  thread of the pool that lives as long as the pool (the kernel's parent-death signal follows the *thread*
  that forked, and Optuna's ``n_jobs`` threads end with each ``optimize`` call). So a SIGKILLed runner takes
  its workers down, and each worker calls ``die_with_parent()``, so whatever a worker starts dies with it.
- A request is one JSON line on the worker's stdin: ``{"argv": [...], "log": path, "env": {...}}``, the
  arguments of ``grpo-lab`` (``fit --config base --config trial.yaml``, or ``warmstart ...``). The worker
  points its file descriptors 1 and 2 at ``log`` (so Python, Lightning and C-level output all land in the
  trial's ``fit.log``), runs ``grpo_lab.cli.main(argv)`` and answers one JSON line ``{"status": s}`` on the
  reply pipe (its original stdout): 0 done, 2 a user error (its ``error:`` line is the log's last line), 1 a
  crash (its traceback is in the log), as the exit status of ``grpo-lab`` would be.
- A worker that dies (a crash of the interpreter, SIGKILL) answers nothing: :meth:`WorkerPool.run` raises
  ``FitFailed`` as a dead fit process does, the trial fails and is retried (``--max-failures``), and the
  next trial gets a fresh worker.
- On GPUs (``grpo-lab-ablate --accelerator gpu``, ``placement.py``) a worker is started with the
  ``CUDA_VISIBLE_DEVICES`` of the devices its first trial was given and keeps them (CUDA reads the variable
  once): :meth:`WorkerPool.run` with ``devices`` hands out only a worker of those devices, or starts one.

Each trial must give the curves it would give in a fresh process. Seeds are set by ``seed_everything``
from the trial's config; what else a fit can leave behind in the process is put back after each trial:
the environment (Lightning sets ``PL_GLOBAL_SEED``), torch's thread count, deterministic-algorithms flag,
default dtype and float32 matmul precision, the ``warnings`` filters and once-registries
(``warnings.catch_warnings``), and the ``logging`` handlers. Caches that do persist (the warm start and the
probe points on disk, imported user modules) hold values, not state: a hit gives what a miss computes.
``tests/test_worker.py`` checks that every logged scalar of a trial run as the second trial of a worker
equals that of the same trial in its own process. Trials that cannot run in-process (several processes:
Lightning's DDP launcher starts the other ranks by running ``sys.argv`` again) keep their own process
(``ablations.runner.launch.runs_in_process``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from grpo_lab.system.process_env import thread_env
from grpo_lab.system.processes import child_env, parent_death_preexec

WORKER_MODULE = "ablations.runner.worker"


class WorkerDied(RuntimeError):
    """The worker process ended while it held a request (killed, or its interpreter crashed)."""


# ---- the worker process --------------------------------------------------------------------------------
def _torch_state():
    import torch

    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_default_dtype(),
            torch.get_float32_matmul_precision(), torch.is_grad_enabled())


def _restore_torch(state) -> None:
    import torch

    threads, deterministic, warn_only, dtype, precision, grad = state
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(dtype)
    torch.set_float32_matmul_precision(precision)
    torch.set_grad_enabled(grad)


@contextlib.contextmanager
def _output_to(path: str) -> Iterator[None]:
    """File descriptors 1 and 2 (and so ``sys.stdout``/``sys.stderr``, Lightning's handlers, C code) to
    ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _exit_status(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    print(err.code, file=sys.stderr)  # SystemExit("message"): Python prints it and exits with 1
    return 1


def run_one(argv: list[str], log: str, env: dict[str, str], clean) -> int:
    """Run ``grpo-lab <argv>`` in this process with its output in ``log``; the exit status it would have.
    ``clean`` is the state every trial starts from: ``(environ, torch state, logging handlers)``."""
    from grpo_lab.cli import main

    environ, torch_state, handlers = clean
    os.environ.clear()
    os.environ.update({**environ, **env})
    _restore_torch(torch_state)
    status = 1
    with _output_to(log), warnings.catch_warnings():  # filters back and once-registries reset after the trial
        try:
            main(list(argv))
            status = 0
        except SystemExit as err:
            status = _exit_status(err)
        except Exception:  # a crash: its traceback goes to the trial's log, the worker goes on
            traceback.print_exc()
            status = 1
    os.environ.clear()
    os.environ.update(environ)
    for name, kept in handlers.items():
        logging.getLogger(name or None).handlers[:] = kept
    _restore_torch(torch_state)
    gc.collect()
    return status


def serve(threads: int) -> int:
    """The worker's loop: requests on stdin, replies on the original stdout, until stdin closes."""
    from grpo_lab.system.processes import die_with_parent

    die_with_parent()
    # LightningCLI(args=...) warns about arguments on the command line: these are the worker's
    sys.argv[1:] = []
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # between trials, stray output goes where the worker's stderr goes
    import torch

    import grpo_lab.cli  # noqa: F401  (the imports this worker exists to pay once)

    torch.set_num_threads(threads)
    loggers = {"": logging.root, **{n: lg for n, lg in logging.root.manager.loggerDict.items()
                                     if isinstance(lg, logging.Logger)}}
    clean = (dict(os.environ), _torch_state(), {n: list(lg.handlers) for n, lg in loggers.items()})
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    reply.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        status = run_one(req["argv"], req["log"], req.get("env", {}), clean)
        reply.write(json.dumps({"status": status}) + "\n")
        reply.flush()
    return 0


# ---- the runner side -----------------------------------------------------------------------------------
class Worker:
    """One worker process and its pipes (used by one thread at a time: the pool hands it out)."""

    def __init__(self, proc, devices: str | None = None) -> None:
        self.proc = proc
        self.devices = devices  # its CUDA_VISIBLE_DEVICES (None: the runner's)
        self.trials = 0
        self.ready = False  # its "ready" line is read before its first answer

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerDied(f"worker {self.proc.pid} ended with status {self.proc.returncode} "
                             "during a trial")
        return json.loads(line)

    def run(self, argv: list[str], log: Path, env: dict[str, str]) -> int:
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "env": env}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            self.proc.wait()
            raise WorkerDied(f"worker {self.proc.pid} is gone (status {self.proc.returncode})") from err
        if not self.ready:
            self.ready = "ready" in self._read()
        self.trials += 1
        return int(self._read()["status"])

    def close(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()

    def kill(self) -> None:
        self.proc.kill()
        self.close()


class WorkerPool:
    """Idle workers handed out to the runner's threads, one trial at a time; a dead one is replaced.

    ``threads``: torch threads of each worker (``OMP_NUM_THREADS`` too); ``log``: where the workers' own
    output goes between trials; ``cwd``: their working directory (default: the runner's)."""

    def __init__(self, threads: int, log: Path, cwd: str | Path | None = None) -> None:
        self.threads, self.log, self.cwd = threads, Path(log), cwd
        self._idle: list[Worker] = []
        self._lock = threading.Lock()
        # One long-lived thread forks every worker: the parent-death signal is tied to the forking thread.
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                              thread_name_prefix="worker-spawner")
        self.started = 0

    def env(self) -> dict[str, str]:
        return {**child_env(), **thread_env(self.threads)}

    def _start(self, devices: str | None = None) -> Worker:
        import subprocess

        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env(), **({} if devices is None else {"CUDA_VISIBLE_DEVICES": devices})}

        def spawn():
            with open(self.log, "ab") as err:
                return subprocess.Popen(
                    [sys.executable, "-m", WORKER_MODULE, "--threads", str(self.threads), "--log",
                     str(self.log)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=self.cwd,
                    text=True, bufsize=1, preexec_fn=parent_death_preexec())

        self.started += 1
        return Worker(self._spawner.submit(spawn).result(), devices)

    def prestart(self, n: int, devices: str | None = None) -> None:
        """Start workers (on ``devices``, a ``CUDA_VISIBLE_DEVICES`` value) until ``n`` of them are idle,
        without waiting for their imports (they import in parallel with whatever runs next, e.g. the warm
        start in the first of them)."""
        with self._lock:
            missing = n - sum(w.devices == devices for w in self._idle)
        started = [self._start(devices) for _ in range(missing)]
        with self._lock:
            self._idle[:0] = started  # taken last: a worker that is already warm goes first

    def _take(self, devices: str | None = None) -> Worker:
        with self._lock:
            while True:
                mine = [w for w in self._idle if w.devices == devices]
                if not mine:
                    break
                worker = mine[-1]
                self._idle.remove(worker)
                if worker.alive():
                    return worker
                worker.close()  # died while idle: not this trial's fault
        return self._start(devices)

    def run(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
            devices: str | None = None) -> int:
        """``grpo-lab <argv>`` in a worker with its output in ``log``: the exit status (0, 1 or 2). Raises
        ``WorkerDied`` if the worker died during it (it is then replaced for the next trial). ``devices``:
        a worker started with that ``CUDA_VISIBLE_DEVICES`` (None: the runner's)."""
        worker = self._take(devices)
        try:
            status = worker.run(argv, log, env or {})
        except WorkerDied:
            worker.close()
            raise
        except BaseException:  # interrupted while waiting: the trial's state in the worker is unknown
            worker.kill()
            raise
        with self._lock:
            self._idle.append(worker)
        return status

    def close(self) -> None:
        """Stop the idle workers (each finishes nothing: it is between trials) and the spawner thread."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()
        self._spawner.shutdown(wait=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablations.runner.worker",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads of this worker")
    p.add_argument("--log", default=None, help="the worker's own log (only in its command line, to find it)")
    return serve(p.parse_args(argv).threads)


if __name__ == "__main__":
    sys.exit(main())
