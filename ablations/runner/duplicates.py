"""Duplicate trials: which trial owns a grid point, so that a second runner (or a GridSampler that hands a
running point out again) prunes itself instead of running it twice. Split from ``trial.py``."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def find_duplicate(trials: list[FrozenTrial], number: int, params: dict[str, Any],
                   start) -> FrozenTrial | None:
    """Another trial that owns ``params``: COMPLETE, or RUNNING and started before (start, number). A
    RUNNING trial owns the point of its params, of its enqueued ``fixed_params``, or of its GridSampler
    ``grid_id`` (with the same search space) when that is this trial's too: those are set before a trial
    suggests its params, so a trial whose params are still being written is seen (GridSampler hands a
    running point to a second worker once every point has started)."""
    me = next((t for t in trials if t.number == number), None)
    grid = _grid_point(me) if me is not None else None
    for t in trials:
        if t.number == number:
            continue
        if t.state == TrialState.COMPLETE and t.params == params:
            return t
        if t.state == TrialState.RUNNING and t.datetime_start is not None and start is not None:
            owns = (t.params == params or t.system_attrs.get("fixed_params") == params
                    or (grid is not None and _grid_point(t) == grid))
            if owns and (t.datetime_start, t.number) < (start, number):
                return t
    return None


def _grid_point(t: FrozenTrial) -> tuple | None:
    """``(grid_id, search space)`` that GridSampler gave the trial, or None."""
    attrs = t.system_attrs
    return (attrs["grid_id"], attrs.get("search_space")) if "grid_id" in attrs else None


def check_duplicate(trial: optuna.Trial, params: dict[str, Any]) -> None:
    """Raise ``TrialPruned("duplicate of trial M")`` if another trial owns ``params`` (see the docstring)."""
    dup = find_duplicate(trial.study.get_trials(deepcopy=False), trial.number, params, trial.datetime_start)
    if dup is not None:
        trial.set_user_attr("duplicate_of", dup.number)
        raise optuna.TrialPruned(f"duplicate of trial {dup.number}")
