"""The study loop: open (or resume) a study, build the warm start once, and run trials until every grid point
has a COMPLETE trial (``run_grid``) or a tuning space has its trials (``run_tuning``).

``run.py`` (the ``grpo-lab-ablate`` command line) and ``sequential.py`` (``--until-decisive``: seeds added in
rounds, each round through ``run_grid``) both drive it; how a study runs, step by step, is in ``run.py``'s
docstring.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ablations.runner.launch import (
    FitFailed,
    execute,
    grpo_command,
    log_tail,
    runs_in_process,
    trainer_settings,
)
from ablations.runner.placement import Placement, devices_needed, worker_devices
from ablations.runner.progress import StudyProgress, console, point_key, point_status
from ablations.runner.pruning import make_pruner
from ablations.runner.storage import fail_stale
from ablations.runner.trial import TrialRunner, resolve_config, trial_overlay, write_overlay
from ablations.runner.worker import WorkerPool
from ablations.spaces.space import Space
from grpo_lab.system.errors import UserError

log = logging.getLogger("ablations")


# ---- the study -----------------------------------------------------------------------------------------
def open_study(space: Space, name: str, storage: RDBStorage) -> optuna.Study:
    pruner = make_pruner(space.pruner if not space.is_grid else None)
    study = optuna.create_study(study_name=name, storage=storage, sampler=space.sampler(seed=0),
                                direction="maximize", load_if_exists=True, pruner=pruner)
    changed = space.changed_settings(study.user_attrs.get("space"))
    if changed and study.get_trials(deepcopy=False):
        raise UserError(f"study {name!r} ran its trials with other settings ({', '.join(changed)}) than "
                        f"space {space.name!r} has now, and new trials would be mixed with them: start a new "
                        "study with --study NEW_NAME, or remove the old one")
    study.set_user_attr("space", space.describe())
    return study


# ---- the study loop ------------------------------------------------------------------------------------
def build_warm_start(space: Space, trial_runner: TrialRunner, study_dir: Path, threads: int) -> None:
    """``grpo-lab warmstart`` with the first point's config, so parallel trials only load the cache (in a
    worker of the trial runner's pool when it has one: that worker then runs trials)."""
    params = space.points()[0] if space.is_grid else {}
    overlay = trial_overlay(space, params, study_dir / "warmstart", trial_runner.root, probe=False)
    overlay = write_overlay(overlay, study_dir / "warmstart.yaml")
    t0 = time.perf_counter()
    try:
        in_process = runs_in_process(trial_runner.base_config, space.trial_overrides(params))
        slots = trial_runner.slots
        first = list(slots.placement.devices[:1]) if slots else None  # None: trains on the CPU
        execute(grpo_command("warmstart", trial_runner.base_config, overlay), study_dir / "warmstart.log",
                threads, trial_runner.pool if in_process else None, devices=first)
    except FitFailed as err:
        last = log_tail(study_dir / "warmstart.log", 1).strip()
        if last.startswith("error: "):  # the space's config is wrong: the fit said why in one line
            raise UserError(f"building the warm start failed: {last.removeprefix('error: ')} "
                            f"(see {study_dir / 'warmstart.log'})") from None
        raise SystemExit(f"building the warm start failed: {err}") from None
    console.print(f"warm start ready ({time.perf_counter() - t0:.0f} s; {study_dir / 'warmstart.log'})")


def run_grid(study: optuna.Study, space: Space, trial_runner: TrialRunner, n_jobs: int, max_failures: int = 3,
             wait: float = 5.0, max_rounds: int | None = None,
             points: list[dict] | None = None) -> dict[str, list[dict]]:
    """Optimize until every grid point (or every one of ``points``, all enqueued) has a COMPLETE trial (or
    failed ``max_failures`` times)."""
    use_grid, points = points is None, space.points() if points is None else points
    max_rounds = max_rounds or len(points) * (max_failures + 2) + 10
    gave_up: list[dict] = []
    rounds, waiting = 0, False
    with StudyProgress(study, points, n_jobs) as progress:
        while True:
            fail_stale(study)
            status = point_status(study.get_trials(deepcopy=False), points)
            missing = [p for p in points if not status[point_key(p)]["COMPLETE"]]
            gave_up = [p for p in missing if status[point_key(p)]["FAIL"] >= max_failures]
            todo = [p for p in missing if p not in gave_up]
            if not todo:
                break
            held = [p for p in todo if status[point_key(p)]["RUNNING"]]
            free = [p for p in todo if p not in held]
            if not free:  # other runners (or a killed one, until its heartbeat is stale) hold the rest:
                if not waiting:
                    progress.progress.console.print(
                        f"waiting for {len(held)} point(s) held by RUNNING trials of another runner, or of a "
                        f"killed one until its heartbeat is older than the grace period")
                waiting = True
                time.sleep(wait)  # they finish or go stale, so this wait ends
                continue
            waiting = False
            if rounds == max_rounds:
                log.warning("stopped after %d rounds with %d point(s) still missing", rounds, len(todo))
                break
            # Exception, not just FitFailed: a broken trial must not take the other trials down with it;
            # Optuna logs its traceback and the point is retried up to max_failures times.
            kw = dict(n_jobs=min(n_jobs, len(free)), catch=(Exception,), callbacks=[progress.on_trial_end])
            if rounds == 0 and use_grid and not space.sampler().is_exhausted(study):
                study.optimize(trial_runner, **kw)  # GridSampler hands out the points, then stops the study
            else:
                for p in free:
                    if not status[point_key(p)]["WAITING"]:
                        study.enqueue_trial(p)
                study.optimize(trial_runner, n_trials=len(free), **kw)
            rounds += 1
    return {"gave_up": gave_up}


def run_tuning(study: optuna.Study, space: Space, trial_runner: TrialRunner, n_jobs: int) -> None:
    """A distributions space: TPE until ``n_trials`` trials are finished (COMPLETE or PRUNED)."""
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    left = max(0, (space.n_trials or 0) - len(finished))
    with StudyProgress(study, [], n_jobs) as progress:
        progress.progress.update(progress.task, total=space.n_trials)
        if left:
            study.optimize(trial_runner, n_trials=left, n_jobs=n_jobs, catch=(Exception,),
                           callbacks=[progress.on_trial_end])


def devices_per_trial(space: Space) -> list[int]:
    """The devices (``trainer.devices``) each trial of ``space`` runs on."""
    base = resolve_config(space.base_config)
    return [devices_needed(trainer_settings(base, space.trial_overrides(p)).get("devices"))
            for p in (space.points() or [{}])]


def prestart(pool: WorkerPool, n_jobs: int, placement: Placement | None) -> None:
    """Start the workers of ``n_jobs`` parallel trials ahead (on the GPUs they will take first)."""
    if placement is None:
        return pool.prestart(n_jobs)
    for device, n in worker_devices(placement, n_jobs).items():
        pool.prestart(n, device)
