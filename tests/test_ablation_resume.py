"""Resuming a study: which trial owns a grid point, trials killed before their first heartbeat, duplicates
pruned before any fit, and a study whose space has changed since its trials ran."""

from __future__ import annotations

import datetime
import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from ablations.runner.duplicates import find_duplicate
from ablations.runner.storage import beat_for_silent_trials, fail_stale, make_storage
from ablations.runner.study_loop import open_study
from ablations.runner.trial import TrialRunner
from ablations.spaces.space import SPACES, ProbeSettings, Space
from grpo_lab.system.errors import UserError
from tests.conftest import frozen_trial


def test_find_duplicate_prefers_complete_then_the_earlier_running_trial():
    p, q = {"model.advantage": "rloo", "seed": 0}, {"model.advantage": "reward", "seed": 0}
    trials = [frozen_trial(TrialState.COMPLETE, q, 0, 1.0), frozen_trial(TrialState.RUNNING, p, 5),
              frozen_trial(TrialState.FAIL, p, 1)]
    for i, t in enumerate(trials):
        t.number = i
    start = lambda s: datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=s)  # noqa: E731
    assert find_duplicate(trials, 9, q, start(9)).number == 0  # a COMPLETE one always wins
    assert find_duplicate(trials, 9, p, start(9)).number == 1  # an earlier RUNNING one wins
    assert find_duplicate(trials, 0, p, start(2)) is None  # a later RUNNING one does not; FAIL never does
    assert find_duplicate(trials, 1, p, start(5)) is None  # not a duplicate of itself


def test_a_trial_killed_before_its_first_heartbeat_goes_stale_once_a_runner_starts(tmp_path):
    """Optuna fails a RUNNING trial only by its heartbeat: one without any stayed RUNNING for good and held
    its point (a resumed study waited forever). A starting runner beats once for it; then it goes stale."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    silent = study.ask()  # RUNNING with no heartbeat, as a runner killed before the first beat leaves it
    time.sleep(1.5)
    fail_stale(study)
    state = lambda: study.trials[silent.number].state  # noqa: E731
    assert state() == TrialState.RUNNING  # heartbeats alone never fail it
    assert beat_for_silent_trials(study, storage) == [silent.number]
    fail_stale(study)
    assert state() == TrialState.RUNNING  # its beat is fresh
    # SQLite's now() has whole seconds and Optuna wants now − beat > grace (1 s): up to 3 s must pass
    time.sleep(3.1)
    fail_stale(study)
    assert state() == TrialState.FAIL


def test_a_running_trial_owns_its_grid_point_before_its_params_are_written():
    """GridSampler hands a running point to a second worker once every point has started: the first trial
    may not have written all its params when the second checks, so the point is read off its grid_id (or
    the params it was enqueued with). Without that both ran to COMPLETE (seen once in CI)."""
    p = {"model.advantage": "reward", "seed": 0}
    space = {"model.advantage": ["reward", "rloo"], "seed": [0, 1]}

    def running(params, second, system_attrs):
        t = frozen_trial(TrialState.RUNNING, params, second)
        t._system_attrs = system_attrs
        return t
    first = running({"model.advantage": "reward"}, 1, {"grid_id": 3, "search_space": space})  # seed unset
    second = running(p, 2, {"grid_id": 3, "search_space": space})
    other = running(p, 2, {"grid_id": 2, "search_space": space})  # another point (its params not yet set)
    other.params.clear()
    first.number, second.number, other.number = 0, 1, 2
    start = lambda s: datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=s)  # noqa: E731
    assert find_duplicate([first, second], 1, p, start(2)).number == 0  # the later one gives up
    assert find_duplicate([first, second], 0, p, start(1)) is None  # the earlier one goes on
    assert find_duplicate([first, other], 2, {"model.advantage": "rloo", "seed": 1}, start(2)) is None
    enqueued = running({}, 1, {"fixed_params": p})
    enqueued.number = 0
    assert find_duplicate([enqueued, second], 1, p, start(2)).number == 0


def test_a_duplicate_trial_is_pruned_before_any_fit(tmp_path):
    space = SPACES["smoke"]
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'd.db'}", direction="maximize")
    params = {"model.advantage": "reward", "seed": 0}
    study.add_trial(frozen_trial(TrialState.COMPLETE, params, 0, 0.5, grid=space.grid))
    study.enqueue_trial(params)
    trial_runner = TrialRunner(space, tmp_path / "study", tmp_path)
    study.optimize(trial_runner, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED and t.user_attrs["duplicate_of"] == 0
    assert not (tmp_path / "study").exists()  # no fit was started


def test_a_study_whose_trials_ran_with_other_settings_is_not_resumed_by_a_changed_space(tmp_path):
    """Resuming a study after its space changed (another probe, other overrides) would mix trials of two
    designs in one report: a user error, unless the study has no trials yet. A grid that only grows (more
    seeds) is a resumable change, and a key an older study did not store is not compared."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}")
    grid = {"model.advantage": ["reward", "rloo"], "seed": [0, 1]}

    def space(grid=grid, steps=200, probe=ProbeSettings(num_batches=64)):
        return Space(name="s", description="d", grid=grid, overrides={"trainer.max_steps": steps},
                     probe=probe)

    old, more_seeds = space(), space(grid={**grid, "seed": [0, 1, 2, 3]})
    fewer_steps = space(steps=150, probe=ProbeSettings(num_batches=32, prompts_per_batch=16))
    study = open_study(old, "s", storage)
    assert more_seeds.changed_settings(study.user_attrs["space"]) == []
    assert fewer_steps.changed_settings(study.user_attrs["space"]) == ["overrides", "probe"]
    study.add_trial(frozen_trial(TrialState.COMPLETE, {"seed": 0}, 0, 0.5, grid={"seed": [0, 1]}))
    assert open_study(more_seeds, "s", storage).study_name == "s"
    with pytest.raises(UserError, match=r"other settings \(overrides, probe\).*--study NEW_NAME"):
        open_study(fewer_steps, "s", storage)
    open_study(old, "t", storage)  # a study without trials takes the new settings: nothing to mix
    stored = open_study(fewer_steps, "t", storage).user_attrs["space"]
    assert stored["overrides"] == {"trainer.max_steps": 150}
    legacy = {k: v for k, v in old.describe().items() if k != "overrides"}  # stored before 'overrides' was
    assert space(steps=150).changed_settings(json.loads(json.dumps(legacy))) == []
