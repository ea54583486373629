"""A study's COMPLETE trials as runs: one per (group, seed), with the per-seed numbers the report compares.

Trials are grouped by their params without ``seed``. If a grid point has more than one COMPLETE trial (a
race the runner avoids) the lowest-numbered one is used and the others are listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats as sps

from ablations.report.stats import lift


@dataclass
class Run:
    """One COMPLETE trial, i.e. one (group, seed) point."""

    number: int
    params: dict[str, Any]
    group: str
    seed: Any
    attrs: dict[str, Any] = field(default_factory=dict)

    def curve(self, tag: str) -> np.ndarray:
        pts = self.attrs.get("curves", {}).get(tag) or []
        return np.asarray(pts, dtype=float).reshape(-1, 2)

    def final(self, key: str) -> float:
        return float(self.attrs.get("final", {}).get(key, math.nan))

    def lift(self, tag: str = "train/reward") -> float:
        """First 10% → last 10% of the curve (``stats.lift``)."""
        return lift(self.curve(tag))

    def steps_censored(self) -> float:
        """Steps to the threshold, or the run's length + 1 when it never got there."""
        s = self.attrs.get("steps_to_threshold")
        return float(self.attrs.get("last_step", math.nan)) + 1 if s is None else float(s)

    @property
    def advantage(self) -> str | None:
        """The run's advantage estimator: its trial's override (a preset arm such as ``rloo (A/A)`` names
        its estimator there), else the swept param."""
        overrides = self.attrs.get("overrides") or {}  # a preset's estimator, else the param itself
        return overrides.get("model.advantage") or self.params.get("model.advantage")

    def probe_rows(self, estimator: str | None = None) -> list[dict]:
        """Probe rows of ``estimator``; by default the run's own estimator's (all rows if the probe measured
        only one estimator)."""
        rows = self.attrs.get("probe") or []
        if estimator is not None:
            return [r for r in rows if r.get("estimator") == estimator]
        mine = [r for r in rows if r.get("estimator") == self.advantage]
        if mine:
            return mine
        return rows if len({r.get("estimator") for r in rows}) <= 1 else []

    def probe_estimators(self) -> set[str]:
        return {r.get("estimator") for r in self.attrs.get("probe") or []}

    def probe_value(self, metric: str, fraction: float | None = None, estimator: str | None = None) -> float:
        """A probe metric at one probe point, or averaged over the points (``fraction=None``)."""
        vals = [_num(r.get(metric)) for r in self.probe_rows(estimator)
                if fraction is None or _at(r, fraction)]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _at(row: dict, fraction: float) -> bool:
    return math.isclose(float(row["fraction"]), fraction, abs_tol=1e-6)


def _mean(values) -> float:
    vals = [v for v in values if np.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def points(runs: list[Run]) -> dict[Any, list[dict[str, dict]]]:
    """Per seed, the distinct probe points of its runs, each ``{estimator: row}``. The warm start
    (fraction 0) is one policy for every run of a seed, so it counts once; every other fraction of every
    run is its own point."""
    out: dict[Any, dict[tuple, dict[str, dict]]] = {}
    for r in runs:
        for row in r.attrs.get("probe") or []:
            f = round(float(row["fraction"]), 6)
            key = ("warm start", f) if f == 0.0 else (r.number, f)
            out.setdefault(r.seed, {}).setdefault(key, {}).setdefault(row.get("estimator"), row)
    return {seed: list(pts.values()) for seed, pts in out.items()}


def probe_fractions(runs: list[Run]) -> list[float]:
    """The fractions of training at which the runs were probed, sorted (0: the warm start)."""
    return sorted({round(float(r["fraction"]), 6) for run in runs for r in run.probe_rows()})


def log_ratio_by_seed(runs: list[Run], estimator: str, base: str,
                      fraction: float | None = None) -> dict[Any, float]:
    """Per seed, the mean over its probe points (those at ``fraction`` only, when given) of
    log(SNR_estimator / SNR_base), both measured on the same rollouts at each point (paired). Points where
    either SNR is not positive are left out."""
    return _by_seed(runs, estimator, base, lambda a, b: math.log(a / b) if a > 0 and b > 0 else math.nan,
                    fraction)


def snr_difference_by_seed(runs: list[Run], estimator: str, base: str) -> dict[Any, float]:
    """Per seed, the mean over its probe points of SNR_estimator − SNR_base (paired, as above): defined
    even where a signal estimate is ≤ 0, which a ratio is not (``reward`` under a large reward shift)."""
    return _by_seed(runs, estimator, base, lambda a, b: a - b)


def _by_seed(runs: list[Run], estimator: str, base: str, how,
             fraction: float | None = None) -> dict[Any, float]:
    out = {}
    for seed, pts in points(runs).items():
        vals = [how(_num(p[estimator].get("snr")), _num(p[base].get("snr"))) for p in pts
                if estimator in p and base in p and (fraction is None or _at(p[estimator], fraction))]
        vals = [v for v in vals if np.isfinite(v)]
        if vals:
            out[seed] = float(np.mean(vals))
    return out


def _own_intervals(pts: list[dict[str, dict]], estimator: str, base: str,
                   fraction: float | None = None):
    """``(ratio, lo, hi)`` of the probe's own paired interval of SNR_estimator / SNR_base at each point of
    ``pts`` where it measured ratios to ``base`` (those at ``fraction`` only, when given)."""
    for p in pts:
        row = p.get(estimator)
        if row and row.get("ratio_to") == base and (fraction is None or _at(row, fraction)):
            yield tuple(_num(row.get(k)) for k in ("snr_ratio", "snr_ratio_lo", "snr_ratio_hi"))


def point_half_widths(runs: list[Run], estimator: str, base: str) -> list[float]:
    """Relative half-widths of the probe's own paired intervals of SNR_estimator / SNR_base (when the probe
    measured ratios to ``base``), one per point."""
    return [(hi - lo) / 2 / ratio for pts in points(runs).values()
            for ratio, lo, hi in _own_intervals(pts, estimator, base) if np.isfinite([ratio, lo, hi]).all()]


def probe_variance_by_seed(runs: list[Run], estimator: str, base: str,
                           fraction: float | None = None) -> dict[Any, float]:
    """Per seed, the variance of its mean log(SNR_estimator / SNR_base) (as :func:`log_ratio_by_seed`) that
    the probe's own noise alone implies: each point's standard error read off its 95% interval,
    log(hi / lo) / (2 z_0.975), the points taken as independent. Compared with the spread of the per-seed
    values across seeds it says what limits a pooled interval: the probe (more batches help) or the
    policies themselves differing from seed to seed (only more seeds help)."""
    z = float(sps.norm.ppf(0.975))
    out = {}
    for seed, pts in points(runs).items():
        var = [(math.log(hi / lo) / (2 * z)) ** 2
               for _, lo, hi in _own_intervals(pts, estimator, base, fraction) if lo > 0 and np.isfinite(hi)]
        if var:
            out[seed] = float(np.mean(var)) / len(var)
    return out


class ProbeView:
    """Per group and seed, a probe metric of the group's estimator, at the same parameters when possible.

    Variance reduction is a property of an estimator at *fixed* parameters. When every trial probed every
    group's estimator (the default: all four on the same rollouts) and the groups are the estimators, a
    group's value for seed s is its estimator's metric averaged over the distinct probe points of the seed
    (the warm start once, then each trial's own later points): every estimator on exactly the same policies
    and rollouts, paired. Otherwise each trial's own estimator along its own trajectory is used.
    """

    def __init__(self, by_group: dict[str, list[Run]]) -> None:
        self.by_group = by_group
        self.runs = [r for rs in by_group.values() for r in rs]
        self.estimator = {g: rs[0].advantage for g, rs in by_group.items()}
        common = set.intersection(*(r.probe_estimators() for r in self.runs)) if self.runs else set()
        ests = list(self.estimator.values())
        self.same_params = bool(common) and len(set(ests)) == len(ests) and all(e in common for e in ests)

    @property
    def description(self) -> str:
        if self.same_params:
            return ("each estimator measured on the same policies and rollouts: per seed, averaged over its "
                    "distinct probe points (the warm start once, then each trial's own later points), paired "
                    "across estimators")
        return "each trial's own estimator along its own training trajectory"

    def values(self, group: str, metric: str, fraction: float | None = None) -> dict[Any, float]:
        if not self.same_params:
            return {r.seed: r.probe_value(metric, fraction) for r in self.by_group[group]}
        est, out = self.estimator[group], {}
        for seed, pts in points(self.runs).items():
            if seed in {r.seed for r in self.by_group[group]}:
                out[seed] = _mean(_num(p[est].get(metric)) for p in pts if est in p
                                  and (fraction is None or _at(p[est], fraction)))
        return out

    def log_ratios(self, group: str, base: str, fraction: float | None = None) -> dict[Any, float]:
        """Per seed, the log SNR ratio of ``group`` to ``base`` (over the probe points at ``fraction`` only,
        when given): paired on the same rollouts when the estimators were probed together, else the runs'
        own geometric-mean SNRs."""
        if self.same_params:
            return log_ratio_by_seed(self.runs, self.estimator[group], self.estimator[base], fraction)
        own = {g: {r.seed: _mean(math.log(v) for v in (_num(x.get("snr")) for x in r.probe_rows()
                                                         if fraction is None or _at(x, fraction)) if v > 0)
                   for r in self.by_group[g]} for g in (group, base)}
        return {s: own[group][s] - own[base][s] for s in own[group] if s in own[base]}


def probe_view(by_group: dict[str, list[Run]]) -> ProbeView | None:
    """The view of the groups whose runs were probed (an A/A arm trains without the probe), or None."""
    probed = {g: rs for g, rs in by_group.items() if any(r.probe_rows() for r in rs)}
    return ProbeView(probed) if probed else None


def _fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def group_label(params: dict[str, Any]) -> str:
    rest = {k: v for k, v in sorted(params.items()) if k != "seed"}
    if len(rest) == 1:
        return _fmt_value(next(iter(rest.values())))
    return ", ".join(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in rest.items()) or "all"


def load_runs(study: optuna.Study) -> tuple[list[Run], list[int]]:
    """One Run per distinct params (the lowest-numbered COMPLETE trial) and the numbers of the extras."""
    seen: dict[tuple, Run] = {}
    extras = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        key = tuple(sorted(t.params.items()))
        if key in seen:
            extras.append(t.number)
            continue
        seen[key] = Run(t.number, dict(t.params), group_label(t.params), t.params.get("seed", 0),
                        dict(t.user_attrs))
    return list(seen.values()), extras


def ordered_groups(runs: list[Run], space: dict) -> list[str]:
    """Groups in grid order (the order the space lists its values), else in order of appearance."""
    labels = list(dict.fromkeys(r.group for r in runs))
    grid = space.get("grid") or {}
    keys = [k for k in sorted(grid) if k != "seed"]
    if not keys:
        return labels

    def rank(label: str) -> tuple:
        params = next(r.params for r in runs if r.group == label)
        return tuple(grid[k].index(params[k]) if params.get(k) in grid[k] else 1e9 for k in keys)

    return sorted(labels, key=rank)


def baseline_group(runs: list[Run], groups: list[str], space: dict) -> str | None:
    base = space.get("baseline")
    if base:
        for r in runs:
            if all(r.params.get(k) == v for k, v in base.items()):
                return r.group
    if "reward" in groups:
        return "reward"
    return groups[0] if groups else None


def group_of(runs: list[Run], params: dict) -> str | None:
    """The label of the group whose runs have ``params`` (None if no run has them)."""
    for r in runs:
        if all(r.params.get(k) == v for k, v in params.items()):
            return r.group
    return None
