"""Fault injection, part 2: a whole study (slow). A full disk while a study writes, then two runners on one
SQLite study; the study runs ``TINY`` (the smoke policy, 4 steps, no probe), so that each case costs
seconds, not minutes. A worker SIGKILLed mid-trial (as the OOM killer would) is
``tests/test_ablation_studies.py::test_a_killed_trial_fit_is_retried_and_counted_once``. The matrix is in
docs/errors.md."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ablations.runner.storage import make_storage
from ablations.spaces.space import Space
from tests.conftest import ROOT

TINY = Space(
    name="tiny", description="fault-injection tests: 2 estimators x 2 seeds, 4 steps, no probe",
    grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1]}, base_config="configs/ablate_smoke.yaml",
    overrides={"trainer.max_steps": 4, "trainer.val_check_interval": 2, "model.warm_start.steps": 20},
    probe=None, threshold=0.15, baseline={"model.advantage": "reward"},
)
"""The study of the fault-injection tests (``--space tests.test_faults_study:TINY``)."""


def ablate(root: Path, *extra: str) -> list[str]:
    """``grpo-lab-ablate`` on :data:`TINY` under ``root`` with 2 workers and a 5 s grace period."""
    return [sys.executable, "-m", "ablations.run", "--space", "tests.test_faults_study:TINY", "--root",
            str(root), "--n-jobs", "2", "--grace-period", "5", *extra]  # a second --space wins


def complete_by_point(url: str, study: str = "tiny") -> dict[tuple, int]:
    """COMPLETE trials per grid point of ``study``."""
    done: dict[tuple, int] = {}
    for t in optuna.load_study(study_name=study, storage=make_storage(url)).get_trials():
        if t.state == TrialState.COMPLETE:
            key = tuple(sorted(t.params.items()))
            done[key] = done.get(key, 0) + 1
    return done


def _limited(limit_bytes: int):
    def preexec() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return preexec


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


WIDE = dataclasses.replace(TINY, name="wide", overrides={**TINY.overrides, "model.policy.hidden_size": 64})
"""TINY with a wider policy: its warm start's weights (288 KB) outgrow the study's database (~120 KB)."""


def _two_runners(cmd: list[str], cwd: Path) -> None:
    """``cmd`` twice, the second 2 s after the first (a new user's way to share a study): both must end
    with status 0."""
    procs = []
    for delay in (0, 2):
        time.sleep(delay)
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_a_full_disk_stops_the_study_in_one_line_and_two_runners_complete_it(tmp_path):
    """The runner (and so its workers) under a 200 KiB file-size limit: the study's database fits, the warm
    start's weights do not. One ``error:`` line naming the warm start, exit 2, no warm start entry and no
    temporary directory kept. With the limit gone, two runners started 2 s apart on the same SQLite study
    (they also race to build the warm starts) complete the grid: one COMPLETE trial per point."""
    root = tmp_path / "runs"
    cmd = ablate(root, "--space", "tests.test_faults_study:WIDE", "--n-jobs", "1")
    full = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=_limited(200 * 1024))
    err = full.stderr.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert err[-1].startswith("error: building the warm start failed: could not write the warm start "), \
        err[-1]
    assert "File too large" in err[-1] and str(root / "warmstart") in err[-1]
    assert not [p for p in (root / "warmstart").iterdir() if not p.name.endswith(".lock")]
    _two_runners(cmd, tmp_path)
    done = complete_by_point(f"sqlite:///{root / 'ablate' / 'wide.db'}", "wide")
    assert len(done) == len(WIDE.points()) and set(done.values()) == {1}, done
    assert (root / "ablate" / "wide" / "report.md").is_file()
