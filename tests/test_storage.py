"""The study storage: concurrent workers on one SQLite file never take the same trial twice."""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import optuna
from optuna.trial import TrialState

from ablations.runner.storage import (
    ENV_URL,
    STORAGE_ENV,
    make_storage,
    public_url,
    storage_url,
    trial_storage_url,
)

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


SECRET = "Pw-never-shown-7f3a"


def test_public_url_hides_the_password_and_the_env_var_is_read(tmp_path, monkeypatch):
    assert public_url(f"postgresql://u:{SECRET}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert SECRET not in public_url(f"not a url://u:{SECRET}@h/db")
    assert public_url("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert storage_url(None, tmp_path, "s") == f"sqlite:///{tmp_path / 'ablate' / 's.db'}"
    monkeypatch.setenv(STORAGE_ENV, "postgresql://u@h/db")
    assert storage_url(None, tmp_path, "s") == "postgresql://u@h/db"
    assert storage_url("sqlite:///x.db", tmp_path, "s") == "sqlite:///x.db"  # --storage wins


def test_a_trial_config_names_the_environment_instead_of_a_password(tmp_path, monkeypatch):
    """A tuning trial's pruning callback opens the study from its YAML: with a password in the URL, the YAML
    says ``env:GRPO_LAB_STORAGE`` and the callback's ``make_storage`` reads the URL there."""
    assert trial_storage_url(f"postgresql://u:{SECRET}@h/db") == ENV_URL
    assert trial_storage_url("postgresql://u@h/db") == "postgresql://u@h/db"
    monkeypatch.setenv(STORAGE_ENV, f"sqlite:///{tmp_path / 's.db'}")
    optuna.create_study(study_name="s", storage=make_storage(ENV_URL))
    assert optuna.load_study(study_name="s", storage=make_storage(ENV_URL)).study_name == "s"
