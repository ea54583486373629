"""The runner's live progress line: trials done / running / failed and an ETA, polled from the storage."""

from __future__ import annotations

import threading
import time
from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True)


def point_key(params: dict) -> tuple:
    """A grid point's key in :func:`point_status` (its params, sorted)."""
    return tuple(sorted(params.items()))


def point_status(trials: list[FrozenTrial], points: list[dict]) -> dict[tuple, Counter]:
    """Per grid point, how many trials are in each state (a WAITING trial's params are its fixed params)."""
    status = {point_key(p): Counter() for p in points}
    for t in trials:
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if point_key(params) in status:
            status[point_key(params)][t.state.name] += 1
    return status


class StudyProgress:
    """A live line (trials done / running / failed, ETA) from polling the storage in a background thread."""

    def __init__(self, study: optuna.Study, points: list[dict], n_jobs: int, interval: float = 2.0) -> None:
        self.study, self.points, self.n_jobs, self.interval = study, points, n_jobs, interval
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=console, transient=False,
        )
        self.task = self.progress.add_task(study.study_name, total=len(points) or None, status="", eta="?")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.time()

    def update(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        status = point_status(trials, self.points)
        done = sum(1 for c in status.values() if c["COMPLETE"])
        states = Counter(t.state.name for t in trials)
        walls = [t.user_attrs["wall_time_s"] for t in trials
                 if t.state == TrialState.COMPLETE and "wall_time_s" in t.user_attrs]
        left = len(self.points) - done
        eta = "?"
        if walls and left:
            eta = f"{left * (sum(walls) / len(walls)) / self.n_jobs / 60:.1f} min"
        elif not left:
            eta = "0"
        # A tuning space (no points) is done with a trial once it is COMPLETE or PRUNED.
        self.progress.update(
            self.task, completed=done if self.points else states["COMPLETE"] + states["PRUNED"], eta=eta,
            status=f"running {states['RUNNING']} | failed {states['FAIL']} | pruned {states['PRUNED']}",
        )

    def on_trial_end(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: one line per finished trial."""
        what = {k: v for k, v in trial.params.items()}
        if trial.state == TrialState.COMPLETE:
            msg = f"auc {trial.value:.3f}  ({trial.user_attrs.get('wall_time_s', 0):.0f} s)"
        elif trial.state == TrialState.PRUNED:
            duplicate = "duplicate_of" in trial.user_attrs
            why = f"duplicate of trial {trial.user_attrs['duplicate_of']}" if duplicate else "by the pruner"
            msg = f"pruned ({why})"
        else:
            msg = f"[red]{trial.state.name}[/red]; see {trial.user_attrs.get('logdir', '?')}/fit.log"
        self.progress.console.print(f"trial {trial.number} {what}: {msg}")
        self.update()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.update()
            except Exception:  # a transient storage error must not kill the display
                pass

    def __enter__(self) -> StudyProgress:
        self.update()
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.update()
        finally:
            self.progress.stop()
