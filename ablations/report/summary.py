"""``summary.json``: every number of an ablation report, machine-readable; the report's tables come from it.

    python -m ablations.report.summary runs/ablate/default/summary.json     # the README's markdown table

Schema (metrics are objects ``{"mean", "lo", "hi"}``, 95% Student-t intervals over seeds; comparisons add
``mde`` (a planning figure: 80% power, α = 0.05, two-sided paired t on the observed paired SD), ``n`` pairs
and verdicts). Strict JSON: a figure that is undefined (an interval under 2 seeds) is ``null``::

    {"study", "space", "population", "wall_s", "baseline", "threshold", "n_trials", "min_effect": {metric: x},
     "groups": {label: {"n_seeds", "seeds", "lift", "hard_lift", "auc", "final_acc", "final_acc_easy",
                        "final_acc_hard", "steps_to_threshold", "reached", "clipped_share",
                        "grad_norm_median", "snr", "hard_share", "cosine"}},
     "comparisons": {label: {"group", "baseline", "kind", "n", "auc_diff", "lift_diff", "hard_lift_diff",
                             "final_acc_diff", "steps_diff", "snr_ratio", "hard_share_diff",
                             "mde": {metric: x}, "verdict": {metric: code}, "verdict_text": {metric: text},
                             "verdicts": {metric: {"code", "size", "p", "p_equiv", "p_holm", "p_equiv_holm",
                                                   "seeds_needed", "role"}}, "settled", "seeds_planned",
                             "precise"}},
     "family": {"metrics", "correction", "members"}, "claims": {name: {"statement", "lines": [...]}},
     "controls": {"positive": {..., "passed"}, "aa": {..., "passed"}}, "decisive", "precise",
     "snr_precision": {"target", "widest": {"comparison", "point", "half_width"}, "met"}}

``snr_ratio`` is a ratio: its mean/lo/hi are exp of the mean/interval of the per-seed log ratios (a
geometric mean) and its ``mde`` a factor (1.15: ratios beyond ×1.15 or below ÷1.15 would be detected);
``probe_half_width`` is the median relative half-width of the probe's own per-point intervals, and
``by_point`` the same ratio at one probe point only (key: the fraction of training, "0" the warm start),
``{"mean", "lo", "hi", "mde", "n"}`` pooled over seeds like the ratio itself; both carry ``half_width``
(``(hi − lo) / 2 / mean``), and ``snr_precision`` gives the widest of them over the comparisons and whether
all are within the study's target (``--snr-precision``; ``{"target", "widest", "met"}``). A verdict
(``verdicts.verdict``) is ``holds``, ``opposite``, ``equivalent`` or ``cannot tell``; ``role`` says whether
the metric is in the declared family (``primary``, Holm-adjusted), ``exploratory`` or a ``control``
(``judge.py``). ``decisive``: no primary comparison is *cannot tell*; ``seeds_planned``: the seeds the
sequential rule plans from the first stage (the grid's seeds; ``verdicts.planned_seeds``), ``precise``:
every comparison has them. In a study grown past its grid's seeds every test is Stein's two-stage one
(``stats.stein``: the first stage's SD, its n₀ − 1 df; ``df`` and ``stein`` in the metric's entry).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from ablations.report.baseline_section import baseline_map_summary
from ablations.report.judge import controls, family_metrics, judge
from ablations.report.runs import (
    ProbeView,
    Run,
    baseline_group,
    group_of,
    load_runs,
    ordered_groups,
    point_half_widths,
    probe_fractions,
    probe_variance_by_seed,
    probe_view,
)
from ablations.report.stats import (
    Paired,
    differences,
    first_stage,
    interval_dict,
    paired,
    stein,
    stein_seeds,
    t_interval,
)

# The smallest effect worth detecting, per comparison metric (reward units; snr_ratio relative: 0.10 = ×1.10).
DEFAULT_MIN_EFFECT = {"auc_diff": 0.02, "lift_diff": 0.03, "hard_lift_diff": 0.03, "final_acc_diff": 0.05,
                      "snr_ratio": 0.10, "hard_share_diff": 0.01, "steps_diff": 25.0}
# comparison metric: (per-run value, higher is better)
DIFFS = {
    "auc_diff": (lambda r: r.attrs.get("auc", math.nan), True),
    "lift_diff": (lambda r: r.lift("train/reward"), True),
    "hard_lift_diff": (lambda r: r.lift("train/reward_hard"), True),
    "final_acc_diff": (lambda r: r.final("sampled"), True),
    "steps_diff": (lambda r: r.steps_censored(), False),
}


def _num(v) -> float:
    return math.nan if v is None else float(v)


def group_entry(runs: list[Run], view: ProbeView | None, label: str) -> dict[str, Any]:
    ci = lambda f: interval_dict(t_interval([f(r) for r in runs]))  # noqa: E731
    reached = sum(r.attrs.get("steps_to_threshold") is not None for r in runs)
    out = {"n_seeds": len(runs), "seeds": [r.seed for r in runs],
           "lift": ci(lambda r: r.lift("train/reward")),
           "hard_lift": ci(lambda r: r.lift("train/reward_hard")),
           "auc": ci(lambda r: _num(r.attrs.get("auc"))), "final_acc": ci(lambda r: r.final("sampled")),
           "final_acc_easy": ci(lambda r: r.final("sampled_easy")),
           "final_acc_hard": ci(lambda r: r.final("sampled_hard")),
           "final_acc_greedy": ci(lambda r: r.final("greedy")), "steps_to_threshold": ci(Run.steps_censored),
           "reached": f"{reached}/{len(runs)}", "wall_s": ci(lambda r: _num(r.attrs.get("wall_time_s")))}
    clip = [r.attrs.get("grad_clip") or {} for r in runs]
    out["clipped_share"] = interval_dict(t_interval([_num(c.get("clipped_share")) for c in clip]))
    out["grad_norm_median"] = interval_dict(t_interval([_num(c.get("median")) for c in clip]))
    if view is not None and label in view.by_group:
        for metric in ("snr", "hard_share", "cosine"):
            out[metric] = interval_dict(t_interval(list(view.values(label, metric).values())))
    return out


def compare(by_group: dict[str, list[Run]], view: ProbeView | None, g: str, b: str,
            kind: str, first: set) -> tuple[dict[str, Any], dict[str, tuple[Paired, bool]]]:
    """One comparison: every metric paired by seed (``{metric: (Paired, higher_is_better)}``, the tests
    ``judge.judge`` turns into verdicts) and its entry of ``summary.json`` without the verdicts yet. Seeds
    beyond the first stage ``first`` (added by ``--until-decisive``) make every test Stein's two-stage one
    (``stats.stein``); each SNR ratio records its first stage's SD (``sd0``, ``n0``) for the rounds'
    planning."""
    seeds = {r.seed for r in by_group[g]} & {r.seed for r in by_group[b]}
    out: dict[str, Any] = {"group": g, "baseline": b, "kind": kind, "n": len(seeds), "mde": {}}
    tests = {}
    for name, (value, higher) in DIFFS.items():
        tests[name] = (paired({r.seed: value(r) for r in by_group[g]},
                              {r.seed: value(r) for r in by_group[b]}), higher)
    probed = view is not None and g in view.by_group and b in view.by_group
    if probed:
        tests["snr_ratio"] = (differences(view.log_ratios(g, b), log=True), True)
        tests["hard_share_diff"] = (paired(view.values(g, "hard_share"), view.values(b, "hard_share")), True)
    tests = {name: (stein(p, first), higher) for name, (p, higher) in tests.items()}
    for name, (p, _) in tests.items():
        out[name] = p.as_dict()
        out["mde"][name] = out[name]["mde"]
    if probed and view.same_params:
        hw = point_half_widths(view.runs, view.estimator[g], view.estimator[b])
        out["snr_ratio"]["probe_half_width"] = float(np.median(hw)) if hw else math.nan
        out["snr_ratio"]["probe_points"] = len(hw)
    if probed:  # the same ratio at each probe point alone (the warm start; each trial's end)
        points = {f"{f:g}": f for f in probe_fractions(view.runs)}
        by_point = {k: differences(view.log_ratios(g, b, f), log=True) for k, f in points.items()}
        out["snr_ratio"]["by_point"] = {k: stein(p, first).as_dict() for k, p in by_point.items()}
        for entry, p in [(out["snr_ratio"], tests["snr_ratio"][0]),
                         *((out["snr_ratio"]["by_point"][k], p) for k, p in by_point.items())]:
            entry["sd0"], entry["n0"] = first_stage(p, first)
        for entry in (out["snr_ratio"], *out["snr_ratio"]["by_point"].values()):
            entry["half_width"] = relative_half_width(entry)
        if view.same_params:  # is the probe or the seeds' spread what limits each interval?
            eg, eb = view.estimator[g], view.estimator[b]
            for entry, f in [(out["snr_ratio"], None),
                             *((out["snr_ratio"]["by_point"][k], f) for k, f in points.items())]:
                entry["probe_noise_share"] = noise_share(view.log_ratios(g, b, f),
                                                         probe_variance_by_seed(view.runs, eg, eb, f))
    out["tests"] = sum(p.n >= 2 for p, _ in tests.values())
    return out, tests


def relative_half_width(d: dict) -> float:
    """Half the width of a ratio's 95% interval relative to the ratio, ``(hi − lo) / 2 / mean`` (the
    README's ±); NaN where it is not defined (fewer than 2 seeds)."""
    lo, hi, mean = (_num(d.get(k)) for k in ("lo", "hi", "mean"))
    return (hi - lo) / 2 / mean if np.isfinite([lo, hi, mean]).all() and mean > 0 else math.nan


def snr_precision(comparisons: dict, target: float | None) -> dict[str, Any]:
    """How precise the SNR ratios are: the widest relative half-width over every comparison's ratio,
    pooled (point ``"all"``) and at each probe point alone, and whether all of them are within ``target``
    (None without a target; a ratio without an interval counts as not within)."""
    widths = [(label, point, d.get("half_width", math.nan))
              for label, c in comparisons.items() if "snr_ratio" in c
              for point, d in [("all", c["snr_ratio"]), *c["snr_ratio"].get("by_point", {}).items()]]
    if not widths:
        return {"target": target, "widest": None, "met": None}
    label, point, width = max(widths, key=lambda w: w[2] if math.isfinite(w[2]) else math.inf)
    met = None if target is None else all(math.isfinite(w) and w <= target for *_, w in widths)
    widest = {"comparison": label, "point": point, "half_width": width}
    return {"target": target, "widest": widest, "met": met}


def precision_seeds(comparison: dict, target: float, max_seeds: int) -> int:
    """The seeds at which every SNR ratio of the comparison (pooled, and at each probe point) would be within
    ±``target`` of the ratio, planned from its first stage's SD (``sd0``, ``n0``; Stein's second stage):
    a relative half-width sinh(h) ≤ target on the log scale."""
    entries = [comparison["snr_ratio"], *comparison["snr_ratio"].get("by_point", {}).values()]
    return max((stein_seeds(_num(e.get("sd0")), int(e.get("n0") or 0), math.asinh(target), max_seeds)
                for e in entries), default=0)


def noise_share(log_ratios: dict, probe_variances: dict) -> float:
    """How much of the spread of the per-seed log ratios across seeds the probe's own noise explains: the
    mean per-seed probe variance over the sample variance across seeds (about 1 when the probe is all of
    it, near 0 when the seeds' policies differ; noisy at a few seeds). NaN with < 2 seeds or no spread."""
    seeds = [s for s, v in log_ratios.items() if s in probe_variances and np.isfinite(v)]
    if len(seeds) < 2:
        return math.nan
    spread = float(np.var([log_ratios[s] for s in seeds], ddof=1))
    return float(np.mean([probe_variances[s] for s in seeds])) / spread if spread > 0 else math.nan


def _by_verdict(comparisons: dict, metric: str) -> str:
    found: dict[str, list[str]] = {}
    for c in comparisons.values():
        if metric in c["verdict"]:
            found.setdefault(c["verdict"][metric], []).append(c["group"])
    return "; ".join(f"{code}: {', '.join(gs)}" for code, gs in found.items()) or "n/a"


def claims(comparisons: dict, groups: dict, base: str) -> dict[str, dict]:
    """The seed post's three claims, each with a verdict line per estimator (comparisons against ``base``)."""
    mine = {k: c for k, c in comparisons.items() if c["kind"] == "comparison" and c["baseline"] == base}

    def lines(m: str) -> list[str]:
        return [f"{c['group']} vs {base}: {c['verdict_text'][m]}"
                for c in mine.values() if m in c["verdict_text"]]

    out = {}
    if any("snr_ratio" in c for c in mine.values()):
        out["baselines_lower_variance"] = {
            "statement": f"(i) baselines lower gradient variance: gradient SNR against `{base}` (ratio > 1)",
            "summary": _by_verdict(mine, "snr_ratio"), "lines": lines("snr_ratio")}
    shares = [f"{g} {groups[g]['hard_share']['mean']:.3f}" for g in groups if "hard_share" in groups[g]
              and np.isfinite(groups[g]["hard_share"]["mean"])]
    share_lines = []
    if shares:
        share_lines = [f"share of the gradient's squared norm from hard queries: {', '.join(shares)}"]
        share_lines += [f"{c['group']} vs {base}, hard share: {c['verdict_text']['hard_share_diff']}"
                        for c in mine.values() if "hard_share_diff" in c]
    out["group_credit_helps_hard_queries"] = {
        "statement": "(ii) group-relative credit helps hard queries: hard-query reward lift against "
                     f"`{base}`",
        "summary": _by_verdict(mine, "hard_lift_diff"),
        "lines": lines("hard_lift_diff") + share_lines}
    out["advantages_speed_up_learning"] = {
        "statement": f"(iii) advantages speed up learning: AUC of the reward curve against `{base}` (steps "
                     "to threshold below, runs that never reach it counted at their length)",
        "summary": _by_verdict(mine, "auc_diff"),
        "lines": lines("auc_diff") + [f"{c['group']} vs {base}, steps to threshold: "
                                      f"{c['verdict_text']['steps_diff']}"
                                      for c in mine.values()]}
    return out


def build_summary(study: optuna.Study, min_effect: dict[str, float] | None = None,
                  precision: float | None = None) -> dict[str, Any]:
    """The summary of a study's COMPLETE trials (see the module docstring); ``min_effect`` overrides the
    study's stored smallest effects of interest, which override ``DEFAULT_MIN_EFFECT``; ``precision``
    (else the study's stored ``snr_precision``) is the SNR ratios' target relative half-width."""
    space = study.user_attrs.get("space", {})
    effects = {**DEFAULT_MIN_EFFECT, **study.user_attrs.get("min_effect", {}), **(min_effect or {})}
    runs, extras = load_runs(study)
    groups = ordered_groups(runs, space)
    by_group = {g: sorted((r for r in runs if r.group == g), key=lambda r: str(r.seed)) for g in groups}
    base = baseline_group(runs, groups, space)
    view = probe_view(by_group)
    out: dict[str, Any] = {"study": study.study_name, "space": space.get("name"), "baseline": base,
                           "population": population_sentence(space),
                           "threshold": space.get("threshold"), "n_trials": len(runs), "extra_trials": extras,
                           "wall_s": wall_seconds(study), "min_effect": effects, "alpha": 0.05, "power": 0.8,
                           "probe": None if view is None else view.description,
                           "groups": {g: group_entry(rs, view, g) for g, rs in by_group.items()}}
    out["baseline_map"] = baseline_map_summary(runs)  # ablations/report/baseline_section.py
    specs = space.get("comparisons") or [{"label": g, "group": None, "baseline": None, "kind": "comparison"}
                                         for g in groups if g != base]
    # the first stage: the grid's seeds; seeds beyond them were added by --until-decisive (Stein's rule)
    first = set((space.get("grid") or {}).get("seed") or [r.seed for r in runs])
    entries = {}
    for spec in specs if space.get("grid") else []:
        g = spec["label"] if spec["group"] is None else group_of(runs, spec["group"])
        b = base if spec["baseline"] is None else group_of(runs, spec["baseline"])
        if g in by_group and b in by_group:
            entries[spec["label"]] = compare(by_group, view, g, b, spec["kind"], first)
    estimators = _estimator_study(space, base)
    judge(entries, effects, family_metrics(estimators), first)
    comparisons = out["comparisons"] = {label: c for label, (c, _) in entries.items()}
    out["family"] = {"metrics": list(family_metrics(estimators)), "correction": "holm",
                     "members": sum(v["role"] == "primary" for c in comparisons.values()
                                    for v in c["verdicts"].values())}
    out["claims"] = claims(comparisons, out["groups"], base) if estimators else {}
    out["controls"] = controls(by_group, entries, effects)
    out["decisive"] = bool(comparisons) and all(c["settled"] for c in comparisons.values()
                                                if c["kind"] == "comparison")
    out["precise"] = bool(comparisons) and all(c["precise"] for c in comparisons.values()
                                               if c["kind"] == "comparison")
    out["snr_precision"] = snr_precision(comparisons, precision or study.user_attrs.get("snr_precision"))
    return out


def population_sentence(space: dict) -> str:
    """Which population the study's verdicts cover (``Space.population``; a study stored before it existed
    ran every seed from one network)."""
    if space.get("population", "one_network") == "networks":
        return ("initial policies and RL seeds: each seed starts from its own warm-start network (warm-start "
                "seed 1234 + seed), shared by every arm of that seed")
    return "RL seeds from one network: every seed starts from the same warm start"


def _estimator_study(space: dict, base: str | None) -> bool:
    """A study that compares advantage estimators against `reward` (the seed post's claims apply)."""
    return "model.advantage" in (space.get("grid") or {}) and base == "reward"


def wall_seconds(study: optuna.Study) -> float:
    """The runner's recorded wall time (warm start included), else first trial start → last trial end."""
    if "wall_s" in study.user_attrs:
        return float(study.user_attrs["wall_s"])
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    if not trials:
        return math.nan
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def min_effects(args: argparse.Namespace) -> dict[str, float]:
    """The runner's ``--min-effect``/``--min-snr-effect`` overrides of ``DEFAULT_MIN_EFFECT`` that were
    given."""
    given = {"auc_diff": args.min_effect, "snr_ratio": args.min_snr_effect}
    return {k: float(v) for k, v in given.items() if v is not None}


def add_wall_time(study: optuna.Study, seconds: float) -> None:
    """Add a runner's wall time (warm start included) to the study's ``wall_s`` (read by ``wall_seconds``)."""
    study.set_user_attr("wall_s", float(study.user_attrs.get("wall_s", 0.0)) + seconds)


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None: JSON has no NaN, and ``JSON.parse``
    rejects the ``NaN`` Python's json writes by default."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_summary(summary: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict(summary), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# ---- the README table ------------------------------------------------------------------------------------
NA = {"mean": None, "lo": None, "hi": None}


def readme_table(summary: dict) -> str:
    """The markdown table the README quotes: one row per group, its comparison against the baseline."""
    from ablations.report.stats import fmt_ci, fmt_diff

    by_group = {c["group"]: c for c in summary["comparisons"].values() if c["kind"] == "comparison"}
    probe = any("snr" in g for g in summary["groups"].values())
    head = ["group", "seeds", "lift", "AUC", "final acc (sampled)"] + (["SNR", "hard share"] if probe else [])
    head += [f"AUC − {summary['baseline']}"] + ([f"SNR / {summary['baseline']}'s"] if probe else [])
    head += ["verdicts (AUC; SNR)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in summary["groups"].items():
        c = by_group.get(label)
        row = [f"`{label}`", str(g["n_seeds"]), fmt_ci(g["lift"]), fmt_ci(g["auc"]), fmt_ci(g["final_acc"])]
        if probe:
            row += [fmt_ci(g.get("snr", NA), ".3g"), fmt_ci(g.get("hard_share", NA))]
        if c is None:
            role = "(baseline)" if label == summary["baseline"] else "(A/A control)"
            row += [role] + ([role] if probe else []) + [""]
        else:
            row += [fmt_diff(c["auc_diff"])] + ([fmt_diff(c["snr_ratio"], ratio=True)] if probe else [])
            row += ["; ".join(c["verdict"][m] for m in ("auc_diff", "snr_ratio") if m in c["verdict"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablations.report.summary",
                                description="Print the README's markdown table "
                                "(groups, comparisons, verdicts) from a study's summary.json.")
    p.add_argument("summary", help="path to runs/ablate/<study>/summary.json")
    args = p.parse_args(argv)
    path = Path(args.summary)
    if not path.is_file():
        print(f"error: {path} does not exist; run grpo-lab-ablate (or --report-only) first", file=sys.stderr)
        return 2
    summary = json.loads(path.read_text())
    print(readme_table(summary))
    print(f"\n{summary['n_trials']} trials, wall {summary['wall_s'] / 60:.1f} min; study "
          f"`{summary['study']}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
