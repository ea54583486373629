"""Optuna pruning from inside a trial's fit: optuna-integration's Lightning callback, across a process
boundary.

A trial's fit runs in its own ``grpo-lab fit`` process (see ``trial.py``), so the runner's
``optuna.Trial`` cannot be handed to ``PyTorchLightningPruningCallback`` directly. ``StudyPruning`` is that
callback built from what a YAML config can carry: the storage URL, the study name and the trial number. It
re-opens the trial from the RDB storage (SQLite or PostgreSQL), and at every validation it

1. ``trial.report``s the monitored metric (default ``val/acc_sampled``) at ``trainer.global_step`` (the
   stock callback reports at the epoch number; a GRPO fit validates many times within one epoch);
2. asks the space's pruner (the same class and arguments the runner gave the study; Optuna does not store
   a study's pruner, so it travels in the config) whether to stop;
3. if so, marks the trial (system attr ``grpo_lab:pruned_at_step``) and stops the Trainer cleanly, as the
   stock callback does under DDP (rank 0 decides, the decision is broadcast). The fit exits 0 with its
   curves written; the runner sees the mark and raises ``TrialPruned``.

Rerunning a finished trial's ``trial.yaml`` by hand is safe: the callback sees that the trial is no longer
RUNNING and does nothing.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from ablations.runner.storage import make_storage
from ablations.spaces.space import DEFAULT_PRUNER
from grpo_lab.system.errors import UserError

PRUNED_AT = "grpo_lab:pruned_at_step"


def make_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """``{"class_path": "optuna.pruners.X", "init_args": {...}}`` -> the pruner (None: ``NopPruner``)."""
    if spec is None:
        return optuna.pruners.NopPruner()
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise UserError(f"pruner {spec['class_path']!r} is not an optuna.pruners.BasePruner subclass")
    return cls(**spec.get("init_args", {}))


class StudyPruning(PyTorchLightningPruningCallback):
    """Prune trial ``trial_number`` of ``study_name`` in ``storage`` on ``monitor`` (see the module
    docstring).

    Args:
        storage: the study's RDB URL (``sqlite:///...`` or ``postgresql://...``).
        study_name: the study's name.
        trial_number: the trial this fit measures.
        monitor: a metric in ``trainer.callback_metrics`` at validation end (higher is better).
        pruner: ``{"class_path": ..., "init_args": {...}}`` of an ``optuna.pruners`` class; the runner writes
            the one its study was created with.
    """

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str = "val/acc_sampled",
                 pruner: dict[str, Any] | None = None) -> None:
        self.storage = make_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=self.storage,
                                  pruner=make_pruner(pruner or DEFAULT_PRUNER))
        self.trial_id = trial_id(self.storage, study_name, trial_number)
        self.trial = optuna.trial.Trial(study, self.trial_id)
        super().__init__(self.trial, monitor)
        self.active = self.storage.get_trial(self.trial_id).state == TrialState.RUNNING
        if not self.active:
            warnings.warn(f"trial {trial_number} of study {study_name!r} is not running: not reporting to it",
                          stacklevel=2)

    def on_fit_start(self, trainer, pl_module) -> None:  # the stock check (RDB storage under DDP) still holds
        if self.active:
            super().on_fit_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.active:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            warnings.warn(f"pruning: {self.monitor!r} is not among the logged metrics "
                          f"({sorted(trainer.callback_metrics)}); not reporting", stacklevel=2)
            return
        step, prune = int(trainer.global_step), False
        if trainer.is_global_zero:
            self.trial.report(float(score), step=step)
            prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            if trainer.is_global_zero:
                self.storage.set_trial_system_attr(self.trial_id, PRUNED_AT, step)
            trainer.should_stop = True


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of ``study_name`` (Optuna's public storage API)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def pruned_at(trial: optuna.Trial) -> int | None:
    """The step at which ``StudyPruning`` stopped this trial's fit (None: it was not pruned)."""
    storage = trial.storage
    attrs = storage.get_trial_system_attrs(trial_id(storage, trial.study.study_name, trial.number))
    return attrs.get(PRUNED_AT)
