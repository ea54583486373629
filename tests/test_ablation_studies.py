"""Whole studies (slow): the smoke space end to end, resume after SIGKILL, a killed fit, PostgreSQL workers,
the controls at small shapes and --until-decisive."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ablations.report.tensorboard_runs import run_name
from ablations.runner.storage import make_storage
from ablations.runner.study_loop import open_study, run_grid
from ablations.spaces.space import SPACES, Space
from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.conftest import ROOT, process_commands
from tests.test_ablations import _fake_trial_runner
from tests.test_tensorboard_runs import hparams_table

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- slow: whole studies -----------------------------------------------------------------------------
def _runner(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ablations.run", "--space", "smoke", "--root", str(root), "--n-jobs", "2",
            *extra]


def _complete_by_point(db: Path) -> dict[tuple, list[int]]:
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    out: dict[tuple, list[int]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        out.setdefault(tuple(sorted(t.params.items())), []).append(t.number)
    return out


@pytest.mark.slow
def test_smoke_study_end_to_end_until_decisive_and_resumed(tmp_path):
    """``grpo-lab-ablate --space smoke --until-decisive --budget 1s`` from another directory: the grid's seeds
    as round 1, then the budget stops it; one COMPLETE trial per point, summary.json and a report. The same
    command again resumes the finished study: no trial is rerun, the budget is still spent."""
    cmd = _runner(tmp_path / "runs", "--until-decisive", "--budget", "1s")
    first = subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=600)
    assert "stopped: budget" in first.stderr.replace("\n", " ")
    db = tmp_path / "runs" / "ablate" / "smoke.db"
    done = _complete_by_point(db)
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    t = study.get_trials(states=(TrialState.COMPLETE,))[0]
    attrs = {"curves", "probe", "wall_time_s", "steps_to_threshold", "auc", "final", "command", "logdir"}
    assert attrs <= set(t.user_attrs)
    assert "train/reward" in t.user_attrs["curves"] and "val/acc_sampled_easy" in t.user_attrs["curves"]
    probe_keys = {"snr", "snr_ratio", "cosine", "hard_share"}
    assert t.user_attrs["probe"] and probe_keys <= set(t.user_attrs["probe"][0])
    out = tmp_path / "runs" / "ablate" / "smoke"
    assert (out / "report.md").is_file() and (out / "probe.png").is_file()
    trial_dir = Path(t.user_attrs["logdir"])  # runs/ablate/smoke/advantage=.../seed=.../trial_N
    assert trial_dir.relative_to(out).parts[-1] == f"trial_{t.number}"
    assert (trial_dir / "trial.yaml").is_file() and (trial_dir / "fit.log").is_file()
    assert "hp_metric" not in read_scalars(trial_dir)  # Lightning's constant -1 is off
    _, rows = hparams_table(out)  # TensorBoard's HParams tab: one row per trial, named by its params
    smoke = SPACES["smoke"]
    assert sorted(g["name"] for g in rows) == sorted(run_name(smoke, p) for p in smoke.points())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] > 0 and set(summary["comparisons"]) == {"rloo"}
    assert summary["groups"]["rloo"]["n_seeds"] == 2
    n = len(study.get_trials())
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    assert len(study.get_trials()) == n and study.user_attrs["until_decisive"]["seeds"] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["wall_s"] > summary["wall_s"]  # both runs counted


@pytest.mark.slow
def test_controls_end_to_end_at_small_shapes(tmp_path, monkeypatch):
    """``controls_smoke``: 3 arms x 3 seeds of real fits with the probe, in one long-lived worker (the
    runner's own path: one interpreter start-up, not 9). The report detects the reward shift and, for the A/A
    arms, counts false positives without claiming a difference."""
    from ablations.report.markdown import write_report
    from ablations.runner.trial import TrialRunner
    from ablations.runner.worker import WorkerPool

    monkeypatch.chdir(tmp_path)
    space = SPACES["controls_smoke"]
    study = open_study(space, "controls_smoke", make_storage(f"sqlite:///{tmp_path / 'c.db'}"))
    with WorkerPool(1, tmp_path / "workers.log") as pool:
        run_grid(study, space, TrialRunner(space, tmp_path / "study", tmp_path / "runs", pool=pool),
                 n_jobs=1)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 9
    text = write_report(study, tmp_path / "report").read_text()
    controls = json.loads((tmp_path / "report" / "summary.json").read_text())["controls"]
    assert controls["positive"]["passed"], controls["positive"]["line"]
    assert set(controls["positive"]["snr_diff_vs_reward"]) == {"mean_baseline", "group_norm", "rloo"}
    assert controls["aa"]["tests"] >= 5 and isinstance(controls["aa"]["passed"], bool)
    assert controls["aa"]["line"] in text and "positive control (reward shift +3) passed" in text
    # The warm start is probed once per probe seed: the reward+3 and rloo+3 trials of a seed share it
    # (3 hits), the A/A arm's seeds are its own; every end point is its own policy: 6 + 9 entries.
    hits = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))
            if any(r["cached"] for r in t.user_attrs["probe"] if r["fraction"] == 0.0)]
    assert len(hits) == 3 and len(list((tmp_path / "runs" / "probe_cache").glob("*.json"))) == 6 + 9
def _trial_log(root: Path, number: int) -> Path:
    """fit.log of trial ``number`` of the smoke study (its directory is named by its params)."""
    return next((root / "ablate" / "smoke").rglob(f"trial_{number}/fit.log"))


def _fits_of(root: Path, sub: str = "") -> list[int]:
    """Pids of live processes whose command line mentions ``root``: the runner's fits in their own process
    (``sub`` = "fit" leaves out the warm-start build) and its workers (``python -m ablations.runner.worker
    --log
    <root>/...``), which run the trials in-process."""
    return [pid for pid, cmd in process_commands()
            if str(root) in cmd and (f"grpo_lab.cli {sub}" in cmd or "ablations.runner.worker" in cmd)]


def _busy_worker(root: Path) -> int | None:
    """A worker of the runner under ``root`` that is running a trial now: its stdout is a trial's fit.log
    (between trials it points at the study's workers.log)."""
    for pid in _fits_of(root):
        try:
            if os.readlink(f"/proc/{pid}/fd/1").endswith("/fit.log"):
                return pid
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_resume_after_sigkill_reruns_only_what_is_missing(tmp_path):
    root = tmp_path / "runs"
    db = root / "ablate" / "smoke.db"
    proc = subprocess.Popen(_runner(root, "--grace-period", "3", "--no-report"), cwd=tmp_path,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        first: dict[tuple, list[int]] = {}
        while time.time() < deadline and not first:
            time.sleep(0.3)
            if db.is_file():
                try:
                    first = _complete_by_point(db)
                except (KeyError, sqlite3.OperationalError, Exception):  # study not created yet
                    first = {}
        assert first, "no trial completed in time"
        assert len(first) < len(SPACES["smoke"].points()), \
            "everything finished before the kill: nothing to resume"
        assert _fits_of(root), "the runner's workers should be alive before the kill"
        os.kill(proc.pid, signal.SIGKILL)  # the runner only: PR_SET_PDEATHSIG must take its workers down
        proc.wait()
        for _ in range(100):
            if not _fits_of(root):
                break
            time.sleep(0.2)
        assert not _fits_of(root), "orphaned workers or fits survived the runner"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_numbers = sorted(n for v in first.values() for n in v)
    stamps = {n: _trial_log(root, n).stat().st_mtime_ns for n in done_numbers}
    rerun = subprocess.run(_runner(root, "--grace-period", "3"), cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, f"the rerun failed:\n{rerun.stdout[-4000:]}\n{rerun.stderr[-4000:]}"
    done = _complete_by_point(db)
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    for key, numbers in first.items():
        assert done[key] == numbers  # the finished trials were kept, not rerun
    assert stamps == {n: _trial_log(root, n).stat().st_mtime_ns for n in done_numbers}
    assert (root / "ablate" / "smoke" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False], ids=["worker", "own-process"])
def test_a_killed_trial_fit_is_retried_and_counted_once(tmp_path, reuse):
    """SIGKILL of the process running one trial (a worker mid-trial; with --no-reuse the trial's own fit):
    that trial fails, its grid point is run again, and the study still ends with exactly one COMPLETE trial
    per point."""
    root = tmp_path / "runs"
    proc = subprocess.Popen(_runner(root, "--no-report", *([] if reuse else ["--no-reuse"])), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05 if reuse else 0.2)
            if reuse:  # killed at once: a trial in a worker takes about a second
                victim = _busy_worker(root)
            else:
                fits = _fits_of(root, "fit")
                victim = fits[0] if fits else None
                time.sleep(1.0)  # let it get going
        assert victim is not None, "no trial started"
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    db = root / "ablate" / "smoke.db"
    done = _complete_by_point(db)
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    assert any(t.state == TrialState.FAIL for t in study.get_trials()), \
        "the killed trial should be recorded as failed"


# ---- PostgreSQL: many workers, one study ---------------------------------------------------------------
def _pg_worker(url: str, study_name: str) -> None:
    """One runner process without fits (see the PostgreSQL test)."""
    space = Space(name="pg", description="pg",
                  grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1, 2]}, probe=None)
    study = open_study(space, study_name, make_storage(url, grace_period=10))
    run_grid(study, space, _fake_trial_runner(space, sleep=2.0), n_jobs=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _postgres_server():
    """A throwaway PostgreSQL server on a free port (skips the test when the server binaries are absent)."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    bindir = Path(initdb[-1]).parent
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
    tmp = Path(tempfile.mkdtemp(prefix="grpo_pg_", dir="/tmp"))
    if as_root:
        shutil.chown(tmp, "postgres", "postgres")

    def pg(*cmd: str) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        return subprocess.run(full, check=True, capture_output=True, text=True, timeout=120)

    port = _free_port()
    data = tmp / "data"
    started = False
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-o",
           f"-p {port} -k {tmp} -h 127.0.0.1", "start")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


def _pg_workers(url: str, study_name: str, n: int) -> list[subprocess.Popen]:
    code = f"from tests.test_ablation_studies import _pg_worker; _pg_worker({url!r}, {study_name!r})"
    return [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) for _ in range(n)]


def _pg_done(url: str, study_name: str) -> tuple[optuna.Study, list]:
    study = optuna.load_study(study_name=study_name, storage=make_storage(url))
    return study, [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study():
    with _postgres_server() as url:
        assert [w.wait(timeout=300) for w in _pg_workers(url, "shared", 2)] == [0, 0]
        _, done = _pg_done(url, "shared")
        keys = [tuple(sorted(t.params.items())) for t in done]
        assert len(done) == 6 and len(set(keys)) == 6  # every point once, none twice
        assert len({t.user_attrs["pid"] for t in done}) == 2  # both workers landed trials


@pytest.mark.slow
def test_a_postgresql_study_resumes_after_its_worker_is_killed():
    """SIGKILL a worker mid-trial; a new worker waits for the dead one's heartbeat to go stale, reruns that
    point and completes the grid with exactly one COMPLETE trial per point."""
    with _postgres_server() as url:
        (victim,) = _pg_workers(url, "killed", 1)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.5)
                try:
                    study, done = _pg_done(url, "killed")
                except KeyError:  # the study does not exist yet
                    continue
                if done and any(t.state == TrialState.RUNNING for t in study.get_trials()):
                    break
            assert done, "the first worker completed no trial"
            victim.kill()
            victim.wait(timeout=30)
        finally:
            victim.kill()
        assert [w.wait(timeout=300) for w in _pg_workers(url, "killed", 1)] == [0]
        study, done = _pg_done(url, "killed")
        keys = [tuple(sorted(t.params.items())) for t in done]
        assert len(done) == 6 and len(set(keys)) == 6
        assert any(t.state == TrialState.FAIL for t in study.get_trials()), "the killed trial should be FAIL"
        assert len({t.user_attrs["pid"] for t in done}) == 2  # the dead worker's trials were kept
