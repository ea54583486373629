"""``grpo-lab-ablate --until-decisive --budget 20m``: Stein's two-stage design over seeds.

The first round is the space's grid (its seeds: the first stage). From the first stage's spread only, each
comparison plans the seeds at which its deciding metrics' 95% intervals (``judge.DECIDING``: the AUC
difference and the SNR ratio) are within ±half their smallest effect of interest (``--min-effect``,
``--min-snr-effect``; ``verdicts.planned_seeds``), and, with ``--snr-precision H``, every SNR ratio,
pooled and at each probe point, within ±H of the ratio (``summary.precision_seeds``). Later rounds enqueue
every group at ``--round-seeds`` new seeds (the next unused integers) until every comparison has its
planned seeds, and the report then tests every comparison with Stein's statistic: the mean over all seeds,
the first stage's SD and n₀ − 1 df (``stats.stein``), exactly Student's t whatever number of seeds the plan
chose (Stein 1945). The plan never looks at a mean, so the verdicts keep their error rates
(``python -m ablations.calibration``: the procedure simulated through ``planned_seeds``, ``should_stop``,
``stein`` and ``verdicts``); stopping when the running interval gets narrow enough instead (a Chow–Robbins
rule) gave a type-I error of 0.068 there. The rounds stop when every comparison has its planned seeds, when
the next round's expected cost (the mean trial wall time × its trials / workers) would pass the budget, or
at ``--max-seeds``.

Seeds are an integer parameter (``spaces.SEED_MAX``), so new seeds need no change of the study's search
space; enqueued trials carry all their params, and the rounds use a study handle whose sampler is
``RandomSampler`` (the grid sampler would stop the study once its own seeds were visited). The budget
spent so far and the seeds are stored on the study (user attr ``until_decisive``): rerunning the same
command after a kill completes the missing trials of the seeds it had reached, then goes on with what is
left of the budget. Time spent in a round that was killed is not counted.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from ablations.report.summary import build_summary, precision_seeds
from ablations.runner.study_loop import run_grid
from ablations.spaces.space import Space
from grpo_lab.system.errors import UserError

UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in ``"20m"``, ``"90s"``, ``"1.5h"`` or ``"1200"`` (seconds)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if not m:
        raise ValueError(f"budget {text!r} is not a duration: use e.g. 20m, 90s, 1.5h or a number of seconds")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def study_seeds(study: optuna.Study, space: Space) -> list[int]:
    """The space's grid seeds and every seed a trial of the study holds (waiting ones included)."""
    seeds = {int(s) for s in (space.grid or {}).get("seed", [0])}
    for t in study.get_trials(deepcopy=False):
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if "seed" in params:
            seeds.add(int(params["seed"]))
    return sorted(seeds)


def mean_trial_seconds(study: optuna.Study) -> float:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    walls = [t.user_attrs["wall_time_s"] for t in complete if "wall_time_s" in t.user_attrs]
    return sum(walls) / len(walls) if walls else math.nan


def open_comparisons(study: optuna.Study, min_effect: dict[str, float],
                     precision: float | None = None, max_seeds: int = 64) -> list[str]:
    """Labels of the comparisons with fewer seeds than their plan (all of them when there is none): the
    deciding metrics' ``seeds_planned`` and, with ``precision``, the SNR ratios' ``precision_seeds``, each
    from the first stage's spread. Controls (the A/A arm) are not waited for."""
    summary = build_summary(study, min_effect, precision)
    mine = {k: c for k, c in summary["comparisons"].items() if c["kind"] == "comparison"}
    if not mine:
        return ["(no comparison yet)"]
    return [label for label, c in mine.items()
            if c["n"] < min(max_seeds, max(c["seeds_planned"], precision_seeds(c, precision, max_seeds)
                                           if precision is not None and "snr_ratio" in c else 0))]


def should_stop(still_open: list[str], n_seeds: int, round_seeds: int, max_seeds: int, gave_up: int = 0,
                max_failures: int = 3) -> str | None:
    """Why the rounds stop after a round with ``n_seeds`` seeds (None: add a round). The budget is checked
    by the caller; the simulation of ``ablations.calibration`` runs this same rule."""
    if not still_open:
        return "every comparison has its planned seeds"
    if gave_up:
        return f"{gave_up} point(s) failed {max_failures} times"
    if n_seeds + round_seeds > max_seeds:
        return f"--max-seeds {max_seeds} reached"
    return None


def check_arguments(round_seeds: int, max_seeds: int, precision: float | None,
                    until_decisive: bool = True) -> None:
    """The rounds' settings (``UserError``: one ``error:`` line); ``grpo-lab-ablate`` checks them before any
    work, ``run_until_decisive`` again for its other callers."""
    if precision is not None and not (until_decisive and 0 < precision < 1):
        raise UserError(f"--snr-precision {precision:g} needs --until-decisive and a fraction in (0, 1), "
                        "e.g. 0.10 for ±10%")
    if until_decisive and (round_seeds < 1 or max_seeds < 2):
        raise UserError(f"--round-seeds must be >= 1 and --max-seeds >= 2, got {round_seeds} and {max_seeds}")


def run_until_decisive(study: optuna.Study, space: Space, trial_runner, n_jobs: int, budget_s: float,
                       min_effect: dict[str, float], round_seeds: int = 2, max_seeds: int = 64,
                       max_failures: int = 3, say: Callable[[str], Any] = print,
                       evaluate: Callable[[optuna.Study, dict, float | None, int], list[str]]
                       = open_comparisons,
                       *, storage: optuna.storages.BaseStorage | str,
                       precision: float | None = None) -> dict[str, Any]:
    """Rounds of seeds until every comparison is settled, the budget is spent, or ``max_seeds`` (see the
    module docstring). ``precision``: also wait for every SNR ratio to be within ± this fraction (kept on the
    study, as ``min_effect`` is, for its report). ``storage``: the study's storage (the rounds open the
    study again on it with a ``RandomSampler``; Optuna has no public accessor for a study's storage).
    Returns ``{"reason", "seeds", "spent_s", "open", "gave_up"}``."""
    if not space.is_grid or "seed" not in (space.grid or {}):
        raise ValueError(f"space {space.name!r}: --until-decisive needs a grid with a 'seed' key")
    if len(space.grid["seed"]) < 2:
        raise UserError(f"space {space.name!r}: --until-decisive needs at least 2 seeds in the grid (the "
                        f"first stage, whose spread plans the rest), got {space.grid['seed']}")
    check_arguments(round_seeds, max_seeds, precision)
    study.set_user_attr("min_effect", min_effect)
    if precision is not None:
        study.set_user_attr("snr_precision", precision)
    spent = float(study.user_attrs.get("until_decisive", {}).get("spent_s", 0.0))
    rounds = optuna.load_study(study_name=study.study_name, storage=storage,
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               pruner=optuna.pruners.NopPruner())
    seeds = study_seeds(study, space)
    wider = "" if precision is None else f" or wider than ±{precision:.0%}"
    gave_up: list[dict] = []
    while True:
        t0 = time.perf_counter()
        gave_up = run_grid(rounds, space, trial_runner, n_jobs, max_failures,
                           points=space.points_for(seeds))["gave_up"]
        spent += time.perf_counter() - t0
        study.set_user_attr("until_decisive", {"spent_s": spent, "seeds": seeds, "budget_s": budget_s})
        still = evaluate(study, min_effect, precision, max_seeds)
        say(f"{len(seeds)} seeds, {spent / 60:.1f} of {budget_s / 60:.1f} min spent: "
            + (f"{len(still)} comparison(s) short of their planned seeds (±SESOI/2{wider}): "
               f"{', '.join(still)}" if still else "every comparison has its planned seeds"))
        reason = should_stop(still, len(seeds), round_seeds, max_seeds, len(gave_up), max_failures)
        if reason is not None:
            break
        cost = mean_trial_seconds(study) * len(space.groups()) * round_seeds / max(1, n_jobs)
        if not spent + cost <= budget_s:
            reason = f"budget: the next round (~{cost / 60:.1f} min) would pass {budget_s / 60:.1f} min"
            break
        seeds = seeds + [max(seeds) + 1 + i for i in range(round_seeds)]
    say(f"stopped: {reason}")
    return {"reason": reason, "seeds": seeds, "spent_s": spent, "open": still, "gave_up": gave_up}
