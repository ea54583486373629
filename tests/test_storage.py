"""The study storage: concurrent workers on one SQLite file never take the same trial twice."""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import optuna
from optuna.trial import TrialState

from ablations.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.ERROR)


def test_threads_never_take_the_same_waiting_trial(tmp_path):
    """Optuna pops a WAITING trial by a read "FOR UPDATE" then an update; SQLite ignores FOR UPDATE, so
    without ``BEGIN IMMEDIATE`` two threads could both set one trial RUNNING and both run it (the runner then
    crashed with "Cannot tell a COMPLETE trial"). Before the fix this loop gave 2-4 duplicates in 60 pops."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", grace_period=30)
    study = optuna.create_study(study_name="s", storage=storage)
    for i in range(60):
        study.enqueue_trial({"x": i}, skip_if_exists=False)
    taken: list[int] = []

    def worker() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                taken.append(study.ask().number)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(taken)
    twice = {k: v for k, v in counts.items() if v > 1}
    assert len(taken) >= 60 and all(n == 1 for n in counts.values()), twice
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(running) == len(taken)  # every ask got its own trial
