"""Trials in long-lived workers (``ablations/runner/worker.py``): the same curves as a fresh process, exit
statuses
as ``grpo-lab``'s, a dead worker fails its trial and is replaced, and no worker outlives a killed runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ablations.runner import launch as fits
from ablations.runner.trial import resolve_config, trial_overlay, write_overlay
from ablations.runner.trial_timing import CLASS_PATH as TIMING
from ablations.runner.worker import WorkerDied, WorkerPool
from ablations.spaces.space import SPACES
from grpo_lab.system import processes
from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.conftest import CONFIGS, ROOT, alive

SMOKE = ["--config", str(CONFIGS / "smoke.yaml"), "--trainer.enable_progress_bar", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]


def _smoke_argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["fit", *SMOKE, "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
            "--trainer.logger.init_args.name", name, "--model.warm_start.cache_dir", str(tmp / "ws"), *extra]


def _trial_cmd(tmp: Path, params: dict, name: str) -> tuple[list[str], Path]:
    """A smoke-space trial's command as the trial runner writes it (probe at the start and the end, no probe
    cache so each run computes its own points, the timing callback), logging to ``tmp/name``."""
    space = SPACES["smoke"]
    cfg = trial_overlay(space, params, tmp / name, tmp)
    for cb in cfg["trainer"]["callbacks"]:
        cb["init_args"]["cache_dir"] = None
    cfg["trainer"]["callbacks"].append({"class_path": TIMING})
    overlay = write_overlay(cfg, tmp / f"{name}.yaml")
    return fits.grpo_command("fit", resolve_config(space.base_config), overlay), tmp / name


def _probe_rows(logdir: Path) -> list[dict]:
    rows = json.loads((logdir / "probe.json").read_text())["results"]
    return [{k: v for k, v in r.items() if k != "cached"} for r in rows]


@pytest.mark.slow
def test_a_trial_logs_the_same_scalars_in_a_worker_after_another_trial_as_in_its_own_process(tmp_path):
    """The smoke trial (reward, seed 0) in its own process, then in one worker after another trial (rloo, seed
    1) and once more: every logged scalar (train, validation, probe) and every probe row are equal, bit for
    bit."""
    trial, other = {"model.advantage": "reward", "seed": 0}, {"model.advantage": "rloo", "seed": 1}
    cmd, fresh = _trial_cmd(tmp_path, trial, "fresh")
    fits.run_fit(cmd, fresh / "fit.log", threads=1)
    runs = []
    with WorkerPool(threads=1, log=tmp_path / "workers.log") as pool:
        for name, params in (("other", other), ("second", trial), ("third", trial)):
            cmd, logdir = _trial_cmd(tmp_path, params, name)
            assert pool.run(cmd[3:], logdir / "fit.log") == 0, (logdir / "fit.log").read_text()[-3000:]
            runs.append(logdir)
        assert pool.started == 1  # one worker ran all three
    want = read_scalars(fresh)
    tags = {"train/reward", "train/loss", "train/grad_norm", "val/acc_sampled", "probe/snr_reward"}
    assert tags <= set(want)
    assert len(want["train/reward"]) == 16
    for logdir in runs[1:]:
        got = read_scalars(logdir)
        assert set(got) == set(want)
        for tag, points in want.items():
            if not tag.startswith("perf/"):  # tokens per second: a timing, not a result
                assert got[tag] == points, tag
        assert _probe_rows(logdir) == _probe_rows(fresh)
    assert read_scalars(runs[0])["train/reward"] != want["train/reward"]  # the other trial was another trial
    timing = json.loads((runs[2] / "timing.json").read_text())
    assert timing["n_steps"] == 16 and timing["seconds"]["steps"] > 0


@pytest.mark.slow
def test_a_worker_answers_user_errors_and_crashes_with_grpo_labs_exit_status_and_goes_on(tmp_path):
    (tmp_path / "broken_estimator.py").write_text("def boom(rewards, eps):\n"
                                                  "    raise RuntimeError('estimator bug')\n")
    with WorkerPool(threads=1, log=tmp_path / "workers.log", cwd=tmp_path) as pool:
        log = tmp_path / "bad" / "fit.log"
        assert pool.run(_smoke_argv(tmp_path, "bad", "--model.advantage", "nope"), log) == 2
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("error: unknown advantage estimator 'nope'")
        log = tmp_path / "crash" / "fit.log"
        crash = _smoke_argv(tmp_path, "crash", "--model.advantage", "broken_estimator:boom")
        assert pool.run(crash, log) == 1
        text = log.read_text()
        assert "Traceback" in text and "RuntimeError: estimator bug" in text
        log = tmp_path / "ok" / "fit.log"
        ok = _smoke_argv(tmp_path, "ok", "--model.advantage", "rloo")
        assert pool.run(ok, log) == 0, log.read_text()[-2000:]
        assert len(read_scalars(tmp_path / "runs" / "ok")["train/reward"]) == 4
        assert pool.started == 1
    # each trial's output went to its log
    assert "estimator bug" not in (tmp_path / "workers.log").read_text()


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_and_the_next_trial_gets_a_fresh_one(tmp_path):
    long = _smoke_argv(tmp_path, "long", "--trainer.max_steps", "100000", "--trainer.val_check_interval",
                       "100000")
    with WorkerPool(threads=1, log=tmp_path / "workers.log") as pool:
        pool.prestart(1)
        (worker,) = pool._idle
        errors: list[BaseException] = []

        def run() -> None:
            try:
                pool.run(long, tmp_path / "long" / "fit.log")
            except BaseException as err:  # noqa: BLE001 - the test looks at it
                errors.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        log = tmp_path / "long" / "fit.log"
        deadline = time.time() + 300
        while time.time() < deadline and "train" not in (log.read_text() if log.is_file() else ""):
            time.sleep(0.2)  # the fit is under way: Lightning printed its model summary
        os.kill(worker.proc.pid, signal.SIGKILL)
        thread.join(timeout=60)
        assert len(errors) == 1 and isinstance(errors[0], WorkerDied), errors
        assert not pool._idle  # the dead worker is not handed out again
        assert pool.run(_smoke_argv(tmp_path, "after"), tmp_path / "after" / "fit.log") == 0
        assert pool.started == 2
        (fresh,) = pool._idle
        fresh.proc.kill()  # killed between trials: the next trial is not failed, it gets a new worker
        fresh.proc.wait()
        assert pool.run(_smoke_argv(tmp_path, "after2"), tmp_path / "after2" / "fit.log") == 0
        assert pool.started == 3


def test_only_single_process_trials_run_in_a_worker():
    base = resolve_config("configs/ablate.yaml")
    assert fits.runs_in_process(base, {"model.advantage": "rloo"})
    space = SPACES["strategies"]
    assert fits.runs_in_process(base, space.trial_overrides({"strategy": "single", "seed": 0}))
    for strategy in ("ddp1", "ddp2"):
        assert not fits.runs_in_process(base, space.trial_overrides({"strategy": strategy, "seed": 0}))
    assert not fits.runs_in_process(base, {"trainer.devices": 2})
    assert not fits.runs_in_process(base, {"trainer.num_nodes": 2})


@pytest.mark.skipif(not processes.supported(), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.slow
def test_sigkill_of_the_runner_kills_its_workers_started_from_any_thread(tmp_path):
    """A runner whose pool starts a worker at the request of a thread that then ends (as Optuna's n_jobs
    threads do after each optimize call): the worker outlives that thread, and dies with the runner."""
    pids = tmp_path / "pids"
    runner = (
        "import threading, time\nfrom pathlib import Path\nfrom ablations.runner.worker import WorkerPool\n"
        f"pool = WorkerPool(1, Path({str(tmp_path / 'w.log')!r}))\n"
        "t = threading.Thread(target=pool.prestart, args=(2,))\nt.start(); t.join()\n"
        f"Path({str(pids)!r}).write_text(' '.join(str(w.proc.pid) for w in pool._idle))\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (pids.is_file() and pids.read_text()):
            time.sleep(0.2)
        workers = [int(p) for p in pids.read_text().split()]
        time.sleep(2.0)  # the thread that asked for them is gone; they must still be alive
        assert len(workers) == 2 and all(alive(p) for p in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if alive(p)]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
