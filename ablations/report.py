"""The report of an ablation study: ``report.md`` and PNG plots, from the study's COMPLETE trials only.

    python -m ablations.report --study default --storage sqlite:///runs/ablate/default.db
    grpo-lab-ablate --space default --report-only          # the same, with the runner's defaults

Everything comes from the Optuna study (trial params and the user attrs written by ``objective.py``), so a
report can be rebuilt anywhere the database is reachable, without the run directories. Trials are grouped
by their params without ``seed``; each group is compared to the space's baseline group (``reward`` in the
default space) paired by seed. If a grid point has more than one COMPLETE trial (a race the runner avoids)
the lowest-numbered one is used and the others are listed.

Statistics (all with numpy only):
- mean ± half-width of the two-sided 95% Student t-interval over seeds (``t_interval``);
- paired differences against the baseline: mean over seeds of (group − baseline) with a 95% percentile
  bootstrap CI from 10,000 resamples of the seeds, fixed seed (``paired_bootstrap``);
- with fewer than 2 seeds a CI is "n/a" rather than an error.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ablations.objective import moving_average  # noqa: E402

POINT_NAMES = {0.0: "warm start", 0.5: "middle", 1.0: "end"}


# ---- statistics ----------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes, Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` by bisection (``t_quantile(0.975, 2)`` = 4.303)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student t-interval of the mean; NaN bounds with < 2 values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return (mean, math.nan, math.nan)
    half = t_quantile(0.5 + confidence / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return (mean, mean - half, mean + half)


def paired_bootstrap(a, b, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean difference, low, high)`` of ``a − b`` (paired samples): percentile bootstrap over pairs."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return (math.nan, math.nan, math.nan)
    if len(d) < 2:
        return (float(d.mean()), math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return (float(d.mean()), float(lo), float(hi))


def excludes_zero(lo: float, hi: float) -> bool | None:
    """Whether a CI excludes 0 (None when the CI is n/a)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return lo > 0 or hi < 0


def fmt_ci(ci: tuple[float, float, float], spec: str = ".3f", prefix: str = "") -> str:
    """``0.412 ± 0.031`` (mean ± half-width of a symmetric CI), ``0.412 (CI n/a)``, or ``n/a``."""
    mean, lo, hi = ci
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{prefix}{mean:{spec}} (CI n/a)"
    return f"{prefix}{mean:{spec}} ± {(hi - lo) / 2:{spec}}"


def fmt_diff(ci: tuple[float, float, float], spec: str = ".3f") -> str:
    """``+0.031 [+0.010, +0.052] *`` (a star when the CI excludes 0), ``+0.031 (CI n/a)``, or ``n/a``."""
    mean, lo, hi = ci
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{mean:+{spec}} (CI n/a)"
    flag = " *" if excludes_zero(lo, hi) else ""
    return f"{mean:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]{flag}"


# ---- the study's runs ----------------------------------------------------------------------------------
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

    @property
    def advantage(self) -> str | None:
        """The run's advantage estimator: a swept param, or a fixed override of its space."""
        return self.params.get("model.advantage") or (self.attrs.get("overrides") or {}).get("model.advantage")

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
        rows = [r for r in self.probe_rows(estimator) if fraction is None or math.isclose(r["fraction"], fraction, abs_tol=1e-6)]
        vals = [float(r[metric]) for r in rows if r.get(metric) is not None and np.isfinite(r[metric])]
        return float(np.mean(vals)) if vals else math.nan


class ProbeView:
    """Per group and seed, a probe metric of the group's estimator, compared at the same parameters if possible.

    Variance reduction is a property of an estimator at *fixed* parameters. When every trial probed every
    group's estimator (the default: all four on the same rollouts), a group's value for seed s is its
    estimator's metric averaged over the policies of all trials with seed s (the warm start, and each
    trial's middle and end): every estimator is measured on exactly the same policies, paired. Otherwise
    (``estimators="own"``, or groups that are not estimators) each trial's own estimator along its own
    trajectory is used, which mixes the estimator's noise with where it drove the policy.
    """

    def __init__(self, by_group: dict[str, list[Run]]) -> None:
        self.by_group = by_group
        self.runs = [r for rs in by_group.values() for r in rs]
        self.estimator = {g: rs[0].advantage for g, rs in by_group.items()}
        common = set.intersection(*(r.probe_estimators() for r in self.runs)) if self.runs else set()
        ests = list(self.estimator.values())
        # Pooling policies across groups is only fair when the groups *are* the estimators (one each).
        self.same_params = bool(common) and len(set(ests)) == len(ests) and all(e in common for e in ests)

    @property
    def description(self) -> str:
        if self.same_params:
            return ("each estimator measured on the same policies: averaged per seed over every trial's policy "
                    "at that probe point (warm start, and each trial's middle and end), paired across estimators")
        return "each trial's own estimator along its own training trajectory"

    def values(self, group: str, metric: str, fraction: float | None = None) -> dict[Any, float]:
        if not self.same_params:
            return {r.seed: r.probe_value(metric, fraction) for r in self.by_group[group]}
        est = self.estimator[group]
        out = {}
        for seed in dict.fromkeys(r.seed for r in self.by_group[group]):
            vals = [r.probe_value(metric, fraction, est) for r in self.runs if r.seed == seed]
            vals = [v for v in vals if np.isfinite(v)]
            out[seed] = float(np.mean(vals)) if vals else math.nan
        return out

    def ci(self, group: str, metric: str, fraction: float | None = None) -> tuple[float, float, float]:
        return t_interval(list(self.values(group, metric, fraction).values()))


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
        seen[key] = Run(t.number, dict(t.params), group_label(t.params), t.params.get("seed", 0), dict(t.user_attrs))
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


# ---- plots ---------------------------------------------------------------------------------------------
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _band(runs: list[Run], tag: str, smooth: bool = True):
    """Common steps, per-seed curves (smoothed), their mean and 95% t-band, and the smoothing window."""
    curves = [c for c in (r.curve(tag) for r in runs) if len(c)]
    if not curves:
        return None
    steps = curves[0][:, 0]
    window = max(1, len(steps) // 20) if smooth else 1
    ys = np.stack([moving_average(np.interp(steps, c[:, 0], c[:, 1]), window) for c in curves])
    mean = ys.mean(axis=0)
    if len(ys) >= 2:
        half = t_quantile(0.975, len(ys) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(ys))
    else:
        half = np.full_like(mean, np.nan)
    return steps, ys, mean, mean - half, mean + half, window


def _plot_band(ax, runs: list[Run], tag: str, label: str, color: str, smooth: bool = True, marker=None) -> int | None:
    """Mean curve, 95% band and faint per-seed curves; the y-range follows the seeds, not the band
    (with 2-3 seeds the t-band is wide and would flatten every curve)."""
    band = _band(runs, tag, smooth)
    if band is None:
        return None
    steps, ys, mean, lo, hi, window = band
    for y in ys:
        ax.plot(steps, y, color=color, alpha=0.25, linewidth=0.7)
    ax.plot(steps, mean, color=color, label=label, marker=marker, linewidth=1.8)
    if np.isfinite(lo).any():
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    seen = getattr(ax, "_seed_range", (np.inf, -np.inf))
    ax._seed_range = (min(seen[0], float(ys.min())), max(seen[1], float(ys.max())))
    low, high = ax._seed_range
    pad = 0.1 * (high - low) or 0.05
    ax.set_ylim(low - pad, high + pad)
    return window


def plot_reward_curves(by_group: dict[str, list[Run]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    window = None
    for i, (g, runs) in enumerate(by_group.items()):
        window = _plot_band(ax, runs, "train/reward", f"{g} (n={len(runs)})", COLORS[i % len(COLORS)]) or window
    n = max(len(r) for r in by_group.values())
    ax.set_title(f"Training reward: mean over seeds (thin: each seed), 95% t-band\n"
                 f"moving average over {window or 1} logged points", fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/reward (mean reward of the rollout batch)")
    ax.grid(alpha=0.3)
    ax.legend(title=f"group (seeds, up to {n})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_easy_hard(by_group: dict[str, list[Run]], path: Path) -> Path:
    panels = [("train/reward_easy", "train reward, easy queries (1+1 digits)", True),
              ("train/reward_hard", "train reward, hard queries (2+2 digits)", True),
              ("val/acc_sampled_easy", "val accuracy (sampled), easy", False),
              ("val/acc_sampled_hard", "val accuracy (sampled), hard", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (tag, title, smooth) in zip(axes.flat, panels, strict=True):
        for i, (g, runs) in enumerate(by_group.items()):
            _plot_band(ax, runs, tag, g, COLORS[i % len(COLORS)], smooth=smooth, marker=None if smooth else "o")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes.flat[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=9)
    fig.suptitle("Easy vs hard queries: mean over seeds (thin: each seed) with 95% t-band; train curves smoothed")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_fractions(runs: list[Run]) -> list[float]:
    return sorted({round(float(r["fraction"]), 6) for run in runs for r in run.probe_rows()})


def plot_probe(view: ProbeView, fractions: list[float], path: Path) -> Path:
    metrics = [("snr", "SNR  (‖ḡ‖² − V/K) / V  ≈  ‖∇J‖² / tr Cov(g)"), ("relative_variance", "relative variance  V / ‖ḡ‖²")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    x = np.arange(len(fractions))
    width = 0.8 / max(1, len(view.by_group))
    for ax, (metric, ylabel) in zip(axes, metrics, strict=True):
        positive = True
        for i, g in enumerate(view.by_group):
            cis = [view.ci(g, metric, f) for f in fractions]
            mean = np.array([c[0] for c in cis])
            err = np.array([[c[0] - c[1], c[2] - c[0]] for c in cis]).T
            err = np.where(np.isfinite(err), err, 0.0)
            xs = x - 0.4 + width * (i + 0.5)
            ax.errorbar(xs, mean, yerr=err, fmt="o", capsize=4, color=COLORS[i % len(COLORS)], label=g)
            positive &= bool(np.all(mean[np.isfinite(mean)] > 0))
        if positive:
            ax.set_yscale("log")
        ax.set_xticks(x, [f"{POINT_NAMES.get(f, 'at')} ({f:g})" for f in fractions])
        ax.set_xlabel("probe point (fraction of training)")
        ax.set_ylabel(ylabel + (" [log]" if positive else ""))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("Gradient signal-to-noise (higher is better)", fontsize=10)
    axes[1].set_title("Relative variance (lower is better)", fontsize=10)
    axes[0].legend(fontsize=9)
    how = "same policies for every estimator" if view.same_params else "each estimator on its own trajectory"
    fig.suptitle(f"Gradient-variance probe ({how}): mean over seeds with 95% t-interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the markdown --------------------------------------------------------------------------------------
def _col(runs: list[Run], fn) -> tuple[float, float, float]:
    return t_interval([fn(r) for r in runs])


def summary_table(by_group: dict[str, list[Run]], view: ProbeView | None, threshold: float | None) -> list[str]:
    head = ["group", "seeds", f"steps to reward ≥ {threshold:g}" if threshold is not None else "steps to threshold",
            "AUC (mean train reward)", "final val acc sampled: all", "easy", "hard", "greedy: all"]
    if view:
        head += ["SNR (mean over probe points)", "cosine to reference"]
    head += ["wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, runs in by_group.items():
        reached = [r.attrs.get("steps_to_threshold") for r in runs]
        censored = [r.attrs.get("last_step", math.nan) + 1 if s is None else s for s, r in zip(reached, runs, strict=True)]
        n_reached = sum(s is not None for s in reached)
        stt = fmt_ci(t_interval(censored), ".0f", prefix="≥ " if n_reached < len(runs) else "") + f" ({n_reached}/{len(runs)} reached)"
        row = [f"**{g}**", str(len(runs)), stt, fmt_ci(_col(runs, lambda r: r.attrs.get("auc"))),
               fmt_ci(_col(runs, lambda r: r.final("sampled"))), fmt_ci(_col(runs, lambda r: r.final("sampled_easy"))),
               fmt_ci(_col(runs, lambda r: r.final("sampled_hard"))), fmt_ci(_col(runs, lambda r: r.final("greedy")))]
        if view:
            row += [fmt_ci(view.ci(g, "snr"), ".3g"), fmt_ci(view.ci(g, "cosine"))]
        row += [fmt_ci(_col(runs, lambda r: r.attrs.get("wall_time_s")), ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


PAIRED = [("AUC", ".3f"), ("final val acc (sampled)", ".3f"), ("SNR", ".3g")]


def paired_differences(by_group: dict[str, list[Run]], base: str, view: ProbeView | None) -> dict[str, dict[str, Any]]:
    """``{group: {"n": pairs, metric: (mean diff, lo, hi)}}`` against ``base``, paired by seed."""

    def per_seed(g: str) -> dict[str, dict[Any, float]]:
        vals = {"AUC": {r.seed: r.attrs.get("auc", math.nan) for r in by_group[g]},
                "final val acc (sampled)": {r.seed: r.final("sampled") for r in by_group[g]}}
        if view:
            vals["SNR"] = view.values(g, "snr")
        return vals

    ref = per_seed(base)
    out: dict[str, dict[str, Any]] = {}
    for g in by_group:
        if g == base:
            continue
        mine = per_seed(g)
        seeds = [s for s in mine["AUC"] if s in ref["AUC"]]
        out[g] = {"n": len(seeds)}
        for name, vals in mine.items():
            out[g][name] = paired_bootstrap([vals[s] for s in seeds], [ref[name][s] for s in seeds])
    return out


def verdict(by_group: dict[str, list[Run]], base: str, diffs: dict, view: ProbeView | None) -> list[str]:
    """Plain sentences from the numbers: what beat the baseline, by how much, and how sure we are."""

    def said(ci: tuple, what: str, spec: str) -> str:
        mean, lo, hi = ci
        if not np.isfinite(mean):
            return f"{what}: n/a"
        ex = excludes_zero(lo, hi)
        sure = ("CI n/a with fewer than 2 paired seeds" if ex is None else
                "the 95% CI excludes 0" if ex else "the 95% CI includes 0, so no detectable difference")
        word = "higher" if mean > 0 else "lower" if mean < 0 else "equal"
        return f"{what} {word} by {abs(mean):{spec}} ({sure})"

    lines = []
    snr_wins, speed_wins = [], []
    for g, d in diffs.items():
        parts = []
        if view and "SNR" in d:
            a, b = view.ci(g, "snr")[0], view.ci(base, "snr")[0]
            ratio = f" (×{a / b:.2f} of {base}'s)" if np.isfinite(a) and np.isfinite(b) and b > 0 else ""
            parts.append(said(d["SNR"], "gradient SNR" + ratio, ".3g"))
            if d["SNR"][0] > 0 and excludes_zero(*d["SNR"][1:]):
                snr_wins.append(g)
        parts.append(said(d["AUC"], "AUC of the reward curve", ".3f"))
        parts.append(said(d["final val acc (sampled)"], "final sampled val accuracy", ".3f"))
        if d["AUC"][0] > 0 and excludes_zero(*d["AUC"][1:]):
            speed_wins.append(g)
        lines.append(f"- **{g}** vs **{base}** ({d['n']} paired seeds): " + "; ".join(parts) + ".")
    if diffs:
        n = len(diffs)
        summary = []
        if view:
            summary.append(f"{len(snr_wins)} of {n} beat {base} on gradient SNR with a CI excluding 0"
                           + (f" ({', '.join(snr_wins)})" if snr_wins else ""))
        summary.append(f"{len(speed_wins)} of {n} learned faster (higher AUC) with a CI excluding 0"
                       + (f" ({', '.join(speed_wins)})" if speed_wins else ""))
        lines.insert(0, "In short: " + "; ".join(summary) + ".")
    return lines


def probe_tables(by_group: dict[str, list[Run]], view: ProbeView, fractions: list[float]) -> list[str]:
    """SNR and relative variance at each probe point: as in the plot, and along each run's own trajectory."""
    names = [POINT_NAMES.get(f, f"{f:g}") for f in fractions]
    head = ["| group | " + " | ".join(f"SNR @ {n}" for n in names) + " | " + " | ".join(f"rel. var @ {n}" for n in names)
            + " |", "|" + "---|" * (2 * len(fractions) + 1)]
    md = [f"How: {view.description}.", ""] + head
    for g in by_group:
        md.append(f"| **{g}** | " + " | ".join(fmt_ci(view.ci(g, "snr", f), ".3g") for f in fractions) + " | "
                  + " | ".join(fmt_ci(view.ci(g, "relative_variance", f), ".3g") for f in fractions) + " |")
    if view.same_params:
        md += ["", "Each estimator along its own training trajectory instead (its own trials' policies only; "
               "this mixes the estimator's noise with where it drove the policy):", ""] + head
        for g, rs in by_group.items():
            md.append(f"| **{g}** | " + " | ".join(fmt_ci(t_interval([r.probe_value("snr", f) for r in rs]), ".3g") for f in fractions)
                      + " | " + " | ".join(fmt_ci(t_interval([r.probe_value("relative_variance", f) for r in rs]), ".3g")
                                           for f in fractions) + " |")
    return md + [""]


NOTES = """\
Caveats on what is compared:
- `mean_baseline` and `group_norm` put r_i into its own baseline (the group mean includes it), which
  correlates baseline and sample and biases the gradient estimate (by a factor (G−1)/G for the mean;
  `group_norm`'s division by the group std also reweights queries). `rloo` leaves r_i out and is unbiased,
  as is `reward` (no baseline).
- `rloo` is exactly G/(G−1) × `mean_baseline`, and SNR, cosine and relative variance are scale-free, so
  the two measure the same on the same policies; they differ in training only through the step size.
- The default `token_mean` aggregation divides each batch by its own number of completion tokens, a
  length normalisation that also biases the gradient (Dr. GRPO); `constant` does not.
- The probe's reference gradient is REINFORCE (raw reward, no baseline) with a constant normalizer,
  averaged over many batches; cosines are measured against it, so a biased estimator can have a high SNR
  and still a cosine below 1."""


def write_report(study: optuna.Study, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its PNGs from the study's COMPLETE trials; return the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = study.user_attrs.get("space", {})
    runs, extras = load_runs(study)
    md = [f"# Ablation report: study `{study.study_name}`", ""]
    if space.get("description"):
        md += [f"Space `{space.get('name')}`: {space['description']}.", ""]
    grid = space.get("grid") or {}
    n_points = math.prod(len(v) for v in grid.values()) if grid else None
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in (TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING)}
    md += [f"{len(runs)} COMPLETE trials used" + (f" of {n_points} grid points" if n_points else "")
           + f"; also in the study: {states['FAIL']} failed, {states['PRUNED']} pruned (duplicates or by the pruner), "
           f"{states['RUNNING']} running." + (f" Extra COMPLETE trials ignored: {extras}." if extras else ""), ""]
    if not runs:
        md += ["No COMPLETE trials yet: nothing to report."]
        path = out / "report.md"
        path.write_text("\n".join(md) + "\n")
        return path
    groups = ordered_groups(runs, space)
    by_group = {g: sorted((r for r in runs if r.group == g), key=lambda r: str(r.seed)) for g in groups}
    base = baseline_group(runs, groups, space)
    view = ProbeView(by_group) if any(r.probe_rows() for r in runs) else None
    threshold = space.get("threshold")

    plots = [plot_reward_curves(by_group, out / "reward_curves.png"), plot_easy_hard(by_group, out / "easy_hard.png")]
    fractions = probe_fractions(runs) if view else []
    if fractions:
        plots.append(plot_probe(view, fractions, out / "probe.png"))

    md += ["## Summary", "",
           "Mean ± half-width of the 95% t-interval over seeds (n/a with fewer than 2 seeds). AUC is the "
           "normalised area under the `train/reward` curve (its mean over training). Steps to threshold: first "
           "step whose moving average of `train/reward` reaches it; a run that never does counts as its full "
           "length (marked ≥). Final accuracies are the last validation."
           + (f" SNR and cosine (to the reference gradient) are the probe's, averaged over the probe points, "
              f"{view.description}." if view else ""), ""]
    md += summary_table(by_group, view, threshold) + [""]
    if not grid:  # a tuning study: no groups to pair, the best trials are the result
        md += ["## Best trials", "", "| trial | AUC | params |", "|---|---|---|"]
        for r in sorted(runs, key=lambda r: -r.attrs.get("auc", -math.inf))[:10]:
            md.append(f"| {r.number} | {r.attrs.get('auc', math.nan):.3f} | "
                      + ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(r.params.items())) + " |")
        md += [""]
    elif base and len(by_group) > 1:
        diffs = paired_differences(by_group, base, view)
        n_pairs = min((d["n"] for d in diffs.values()), default=0)
        md += [f"## Paired differences against `{base}`", "",
               "Same seed, same data order, same warm start: mean of (group − baseline) with a 95% bootstrap CI "
               "(10,000 resamples of the seeds, numpy, seed 0); * marks a CI that excludes 0."
               + (f" With {n_pairs} seeds the bootstrap has at most {n_pairs ** n_pairs} distinct resamples and its "
                  "CI is optimistic: read * as a hint, not a test." if 2 <= n_pairs < 5 else ""), ""]
        names = [n for n, _ in PAIRED if n != "SNR" or view]
        md += ["| group | pairs | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        specs = dict(PAIRED)
        for g, d in diffs.items():
            md.append(f"| **{g}** | {d['n']} | " + " | ".join(fmt_diff(d[n], specs[n]) for n in names) + " |")
        md += ["", "## Verdict", ""] + verdict(by_group, base, diffs, view) + [""]
    if fractions:
        md += ["## Probe points", ""] + probe_tables(by_group, view, fractions)
    md += [NOTES, "", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["## Trials", "", "Rerun any trial by hand from its `cwd` with its `command` (Optuna user attrs).", "",
           "| trial | params | AUC | wall (s) | logdir |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r.number):
        md.append(f"| {r.number} | {', '.join(f'{k}={v}' for k, v in sorted(r.params.items()))} | "
                  f"{r.attrs.get('auc', math.nan):.3f} | {r.attrs.get('wall_time_s', math.nan):.0f} | `{r.attrs.get('logdir', '')}` |")
    example = runs[0].attrs.get("command")
    if example:
        md += ["", "For example:", "", "```", example, "```"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write report.md and PNG plots for a stored ablation study.")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///runs/ablate/<study>.db)")
    p.add_argument("--out", default=None, help="output directory (default: runs/ablate/<study>)")
    args = p.parse_args(argv)
    storage = args.storage or f"sqlite:///runs/ablate/{args.study}.db"
    study = optuna.load_study(study_name=args.study, storage=storage)
    print(write_report(study, args.out or Path("runs/ablate") / args.study))


if __name__ == "__main__":
    main()
