"""The report of an ablation study: ``summary.json``, ``report.md`` and PNG plots, from the study alone.

    python -m ablations.report.markdown --study default --storage sqlite:///runs/ablate/default.db
    grpo-lab-ablate --space default --report-only          # the same, with the runner's defaults

Everything comes from the Optuna study (trial params and the user attrs written by ``runner/trial.py``), so a
report can be rebuilt anywhere the database is reachable, without the run directories. The numbers are
computed once, in ``summary.py`` (statistics in ``stats.py``: Student-t intervals over seeds, paired
comparisons with their minimum detectable effect, verdicts), written to ``summary.json``, and every table
below is generated from that summary; ``plots.py`` draws the figures from the runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ablations.report.baseline_section import report_lines as baseline_map_lines
from ablations.report.plots import POINT_NAMES, plot_easy_hard, plot_probe, plot_reward_curves
from ablations.report.runs import ProbeView, Run, load_runs, ordered_groups, probe_fractions, probe_view
from ablations.report.stats import fmt_ci, fmt_diff, t_interval
from ablations.report.summary import build_summary, relative_half_width, write_summary

NOTES = """\
Caveats on what is compared:
- `mean_baseline` and `group_norm` put r_i into its own baseline (the group mean includes it), which
  correlates baseline and sample and biases the gradient estimate (by a factor (G−1)/G for the mean;
  `group_norm`'s division by the group std also reweights queries). `rloo` leaves r_i out and is unbiased,
  as is `reward` (no baseline).
- `rloo` is exactly G/(G−1) × `mean_baseline`, and SNR, cosine and the hard share are scale-free, so the two
  measure the same on the same policies; they differ in training only through the step size.
- The default `token_mean` aggregation divides each batch by its own number of completion tokens, a
  length normalisation that also biases the gradient (Dr. GRPO); `constant` does not.
- The probe's reference gradient is `rloo` with a constant normalizer (unbiased for ∇J), on the same
  batches; cosines use pairs of different batches only, so they compare expected gradients and are not
  pulled towards 0 by noise. A biased estimator can have a high SNR and still a cosine below 1."""

VERDICTS = """\
A verdict is **holds** (the two-sided t-test rejects no difference and the effect points the claimed way),
**the opposite** (it points the other way), **equivalent** (two one-sided tests at the smallest effect of
interest, SESOI, reject: the 90% interval lies inside ±SESOI) or **cannot tell at this n** (neither; the line
says how many seeds would resolve an effect of the SESOI). A holds or opposite also says its size: *larger
than the SESOI* (the 95% interval lies beyond it), *negligible* (equivalence holds too) or *of unclear
size*. The seed post's claims are declared up front as the family and Holm-adjusted together (difference and
equivalence tests; p and Holm's p on each line); other metrics are *exploratory*. The MDE is a planning
figure, never a verdict (`ablations/report/verdicts.py`; error rates by simulation:
`python -m ablations.calibration`)."""


def groups_table(summary: dict, probe: bool) -> list[str]:
    t = summary.get("threshold")
    head = ["group", "seeds", "lift (first → last 10%)", "hard-query lift", "AUC (mean train reward)",
            f"steps to reward ≥ {t:g}" if t is not None else "steps to threshold",
            "final val acc sampled: all", "easy", "hard", "clipped steps", "median ‖g‖ before clip"]
    head += ["SNR (mean over probe points)", "hard share of ‖g‖²", "cosine to ∇J"] if probe else []
    lines = ["| " + " | ".join(head + ["wall (s)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, g in summary["groups"].items():
        k, n = (int(x) for x in g["reached"].split("/"))
        steps = fmt_ci(g["steps_to_threshold"], ".0f", prefix="≥ " if k < n else "")
        row = [f"**{label}**", str(g["n_seeds"]), fmt_ci(g["lift"]), fmt_ci(g["hard_lift"]), fmt_ci(g["auc"]),
               steps + f" ({g['reached']} reached)",
               fmt_ci(g["final_acc"]), fmt_ci(g["final_acc_easy"]), fmt_ci(g["final_acc_hard"]),
               fmt_ci(g.get("clipped_share", NA), ".0%"), fmt_ci(g.get("grad_norm_median", NA), ".2f")]
        if probe:
            row += [fmt_ci(g.get(m, NA), spec) for m, spec in (("snr", ".3g"), ("hard_share", ".3f"),
                                                                ("cosine", ".3f"))]
        lines.append("| " + " | ".join(row + [fmt_ci(g["wall_s"], ".0f")]) + " |")
    return lines


NA = {"mean": math.nan, "lo": math.nan, "hi": math.nan}
COLUMNS = [("auc_diff", "AUC", ".3f"), ("lift_diff", "lift", ".3f"),
           ("hard_lift_diff", "hard-query lift", ".3f"),
           ("final_acc_diff", "final val acc", ".3f"), ("steps_diff", "steps to threshold", ".0f"),
           ("snr_ratio", "SNR ratio", ".3g"), ("hard_share_diff", "hard share", ".3f")]


def comparisons_table(summary: dict) -> list[str]:
    cols = [c for c in COLUMNS if any(c[0] in x for x in summary["comparisons"].values())]
    lines = ["| comparison | vs | pairs | " + " | ".join(name for _, name, _ in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for label, c in summary["comparisons"].items():
        cells = [fmt_diff(c[m], spec, ratio=m == "snr_ratio") if m in c else "n/a" for m, _, spec in cols]
        lines.append(f"| **{label}** | {c['baseline']} | {c['n']} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(summary: dict) -> list[str]:
    if summary["claims"]:
        md = []
        for claim in summary["claims"].values():
            md += [f"- **{claim['statement']}** — {claim['summary']}."]
            md += [f"  - {line}" for line in claim["lines"]]
        return md
    md = []
    for label, c in summary["comparisons"].items():
        if c["kind"] == "comparison":
            text = c["verdict_text"]
            md.append(f"- **{label}** vs **{c['baseline']}**: AUC {text['auc_diff']}"
                      + (f"; SNR {text['snr_ratio']}" if "snr_ratio" in text else "") + ".")
    return md


def clipping_check(summary: dict, out_dir: Path, other: str = "default_noclip") -> dict:
    """The clipping confound: each group's share of clipped steps and median pre-clip norm, and, where the
    study ``other`` (the same arms with clipping off) has a summary beside this one, each comparison's AUC
    verdict with and without clipping and whether any differs (``depends``; None when not run)."""
    groups = {g: {"clipped_share": v.get("clipped_share"), "grad_norm_median": v.get("grad_norm_median")}
              for g, v in summary["groups"].items()}
    path = out_dir.parent / other / "summary.json"
    if summary.get("space") == other or not path.is_file():
        return {"groups": groups, "unclipped_study": None, "auc_verdicts": {}, "depends": None}
    unclipped = json.loads(path.read_text()).get("comparisons", {})
    both = {label: {"clipped": c["verdict"].get("auc_diff"),
                    "unclipped": unclipped[label]["verdict"].get("auc_diff"),
                    "unclipped_text": unclipped[label]["verdict_text"].get("auc_diff")}
            for label, c in summary["comparisons"].items()
            if c["kind"] == "comparison" and label in unclipped}
    depends = any(v["clipped"] != v["unclipped"] for v in both.values()) if both else None
    return {"groups": groups, "unclipped_study": str(path), "auc_verdicts": both, "depends": depends}


def clipping_lines(check: dict) -> list[str]:
    shares = ", ".join(f"{g} {fmt_ci(v['clipped_share'] or NA, '.0%')} (median ‖g‖ "
                       f"{fmt_ci(v['grad_norm_median'] or NA, '.2f')})" for g, v in check["groups"].items())
    md = [f"- Steps clipped (pre-clip `train/grad_norm` above `max_grad_norm`), per arm: {shares}."]
    if check["depends"] is None:
        return md + ["- Claim (iii) with clipping off: not run beside this study "
                     "(`grpo-lab-ablate --space default_noclip`)."]
    md += [f"- Claim (iii) with clipping off (study at {check['unclipped_study']}): "
           + "; ".join(f"{label}: {v['clipped']} with clipping, {v['unclipped_text']} without"
                       for label, v in check["auc_verdicts"].items())]
    return md + [f"- The AUC verdict {'DEPENDS' if check['depends'] else 'does not depend'} on clipping."]


def unsettled_sentence(summary: dict) -> str:
    """' (cannot tell: label metric, about N seeds; ...)' for the primary verdicts not settled."""
    open_ = [f"{label} {m}" + (f", about {v['seeds_needed']} seeds" if v.get("seeds_needed") else "")
             for label, c in summary["comparisons"].items() for m, v in c.get("verdicts", {}).items()
             if v["role"] == "primary" and v["code"] == "cannot tell"]
    return f" (cannot tell: {'; '.join(open_)})" if open_ else ""


def controls_lines(summary: dict, out_dir: Path) -> list[str]:
    """This study's controls (passed or FAILED), and the full ones of a `controls` study beside it; which
    ran is said, and how to run what did not."""
    own = summary.get("controls") or {}
    md = [f"- {own[k]['line']}" for k in ("positive", "aa") if k in own]
    if own.get("positive", {}).get("kind") == "shift":
        return md
    for name in ("controls", "controls_smoke"):
        path = out_dir.parent / name / "summary.json"
        if path.is_file():
            other = json.loads(path.read_text()).get("controls") or {}
            return md + [f"- (the full controls, study `{name}`, {path}) {other[k]['line']}"
                         for k in ("positive", "aa") if k in other]
    return md + ["- the full controls were not run beside this study: `grpo-lab-ablate --space controls` "
                 "checks that the harness detects a reward shift (positive control) and finds no difference "
                 "between identical arms (A/A)."]


def precision_sentence(precision: dict | None) -> str:
    """' Widest SNR-ratio interval: ±x% (comparison, point)', and whether every one is within the target."""
    if not precision or not precision.get("widest"):
        return ""
    w = precision["widest"]
    where = "pooled" if w["point"] == "all" else f"at {POINT_NAMES.get(float(w['point']), w['point'])}"
    half = w["half_width"]
    width = f"±{half:.1%}" if math.isfinite(half) else "none (under 2 seeds with a ratio)"
    text = f" Widest SNR-ratio interval: {width} ({w['comparison']}, {where})"
    if precision.get("target") is None:
        return text + "."
    return text + (f"; every SNR ratio, pooled and at each probe point, within ±{precision['target']:.0%}: "
                   f"{'yes' if precision['met'] else 'no'}.")


def point_ratio_lines(summary: dict, names: list[str], fractions: list[float]) -> list[str]:
    """Each comparison's SNR ratio at each probe point alone, pooled over seeds (``by_point``), with its
    half-width relative to the ratio."""
    rows = []
    for c in summary["comparisons"].values():
        by_point = c.get("snr_ratio", {}).get("by_point") or {}
        if not by_point:  # not probed (an A/A arm)
            continue
        cells = []
        for f in fractions:
            d = by_point.get(f"{f:g}")
            half = relative_half_width(d) if d else math.nan
            share = d.get("probe_noise_share", math.nan) if d else math.nan
            noise = f"; probe {share:.0%}" if math.isfinite(share) else ""
            cells.append(f"{fmt_diff({**d, 'mde': math.nan}, '.3g', ratio=True)} (±{half:.0%}, n = {d['n']}"
                         f"{noise})" if d and math.isfinite(half) else "n/a")
        rows.append(f"| {c['group']} vs {c['baseline']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return (["SNR ratio at each probe point alone (per seed the mean log ratio over the seed's points there, "
             "then the t-interval over seeds; ± is the half-width relative to the ratio; *probe*: the share "
             "of the per-seed values' variance across seeds that the probe's own intervals account for. Near "
             "100%, more batches per point would narrow the interval; well below, the seeds' policies "
             "differ and only more seeds would. At a few seeds the share itself is rough and can pass "
             "100%):", "",
             "| comparison | " + " | ".join(f"SNR ratio @ {n}" for n in names) + " |",
             "|" + "---|" * (len(names) + 1)] + rows + [""])


def probe_lines(by_group: dict[str, list[Run]], view: ProbeView, fractions: list[float],
                summary: dict) -> list[str]:
    names = [POINT_NAMES.get(f, f"{f:g}") for f in fractions]
    widths = ", ".join(f"{c['group']} {c['snr_ratio']['probe_half_width']:.0%} "
                       f"({c['snr_ratio']['probe_points']} points)"
                       for c in summary["comparisons"].values()
                       if math.isfinite(c.get("snr_ratio", {}).get("probe_half_width", math.nan)))
    md = [f"How: {view.description}. The probe's own paired interval of an SNR ratio at one point has a "
          "median half-width of " + widths + " of the ratio; the comparisons pool the points and seeds.", ""]
    md += point_ratio_lines(summary, names, fractions)
    md += ["| group | " + " | ".join(f"SNR @ {n}" for n in names) + " | "
          + " | ".join(f"hard share @ {n}" for n in names) + " |", "|" + "---|" * (2 * len(fractions) + 1)]
    for g in view.by_group:  # the probed groups (an A/A arm trains without the probe)
        cells = [fmt_ci(t_interval(list(view.values(g, m, f).values())), spec)
                 for m, spec in (("snr", ".3g"), ("hard_share", ".3f"))
                 for f in fractions]
        md.append(f"| **{g}** | " + " | ".join(cells) + " |")
    return md + [""]


def write_report(study: optuna.Study, out_dir: str | Path,
                 min_effect: dict[str, float] | None = None) -> Path:
    """Write ``out_dir/summary.json``, ``report.md`` and its PNGs from the study's COMPLETE trials; return the
    markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = study.user_attrs.get("space", {})
    summary = build_summary(study, min_effect)
    summary["clipping"] = clipping_check(summary, out)
    write_summary(summary, out / "summary.json")
    runs, extras = load_runs(study)
    md = [f"# Ablation report: study `{study.study_name}`", ""]
    if space.get("description"):
        md += [f"Space `{space.get('name')}`: {space['description']}.", ""]
    grid = space.get("grid") or {}
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING)}
    md += [f"{len(runs)} COMPLETE trials used; also in the study: {states['FAIL']} failed, "
           f"{states['PRUNED']} pruned (duplicates or by the pruner), {states['RUNNING']} running."
           + (f" Extra COMPLETE trials ignored: {extras}." if extras else "")
           + f" Wall time {summary['wall_s'] / 60:.1f} min. Numbers: `summary.json`.", ""]
    if not runs:
        path = out / "report.md"
        path.write_text("\n".join(md + ["No COMPLETE trials yet: nothing to report."]) + "\n")
        return path
    by_group = {g: sorted((r for r in runs if r.group == g), key=lambda r: str(r.seed))
                for g in ordered_groups(runs, space)}
    view = probe_view(by_group)
    plots = [plot_reward_curves(by_group, out / "reward_curves.png"),
             plot_easy_hard(by_group, out / "easy_hard.png")]
    fractions = probe_fractions(runs) if view else []
    if fractions:
        plots.append(plot_probe(view, fractions, out / "probe.png"))
    md += ["## Summary", "",
           "Mean ± half-width of the 95% Student-t interval over seeds (n/a with fewer than 2). Lift: "
           "mean `train/reward` of the last 10% of training minus the first 10% (hard-query lift: the same "
           "on `train/reward_hard`). AUC: the normalised area under the `train/reward` curve. Steps to "
           "threshold: first step whose moving average reaches it; a run that never does counts as its "
           "length (marked ≥). Clipped: the share of steps whose pre-clip gradient norm passed "
           "`max_grad_norm`, and the median pre-clip norm (`train/grad_norm`). Population: "
           + summary["population"] + "."
           + (f" Probe columns: {view.description}." if view else ""), ""]
    md += groups_table(summary, view is not None) + [""]
    if not grid:  # a tuning study: no groups to pair, the best trials are the result
        md += ["## Best trials", "", "| trial | AUC | params |", "|---|---|---|"]
        for r in sorted(runs, key=lambda r: -r.attrs.get("auc", -math.inf))[:10]:
            md.append(f"| {r.number} | {r.attrs.get('auc', math.nan):.3f} | "
                      + ", ".join(f"{k}={v}" for k, v in sorted(r.params.items())) + " |")
        md += [""]
    elif summary["comparisons"]:
        md += ["## Paired comparisons", "",
               "Same seed value, same warm start: mean of the per-seed differences (group − "
               "baseline; SNR: geometric mean of the per-seed ratios) with its 95% Student-t interval and "
               "the minimum detectable effect at this number of pairs (a planning figure). " + VERDICTS, ""]
        md += comparisons_table(summary) + ["", "## Verdicts", ""] + verdict_lines(summary) + [""]
        effects = ", ".join(f"{k} {v:g}" for k, v in summary["min_effect"].items())
        md += [f"Smallest effects of interest: {effects} (SNR: relative). Every primary comparison settled "
               f"(not *cannot tell*): {'yes' if summary['decisive'] else 'no'}"
               + unsettled_sentence(summary) + "." + precision_sentence(summary.get("snr_precision")), ""]
    md += ["## Controls", ""] + controls_lines(summary, out) + [""]
    if summary["comparisons"]:
        md += ["## Clipping", ""] + clipping_lines(summary["clipping"]) + [""]
    if fractions:
        md += ["## Probe points", ""] + probe_lines(by_group, view, fractions, summary)
    md += baseline_map_lines(summary, out)  # ablations/report/baseline_section.py: [] without a map
    md += [NOTES, "", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["## Trials", "", "Rerun any trial by hand from its `cwd` with its `command` (Optuna user attrs).",
           "", "| trial | params | AUC | wall (s) | logdir |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r.number):
        md.append(f"| {r.number} | {', '.join(f'{k}={v}' for k, v in sorted(r.params.items()))} | "
                  f"{r.attrs.get('auc', math.nan):.3f} | {r.attrs.get('wall_time_s', math.nan):.0f} | "
                  f"`{r.attrs.get('logdir', '')}` |")
    if runs[0].attrs.get("command"):
        md += ["", "For example:", "", "```", runs[0].attrs["command"], "```"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write summary.json, report.md and PNG plots for a stored "
                                            "ablation study.")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: sqlite:///runs/ablate/<study>.db)")
    p.add_argument("--out", default=None, help="output directory (default: runs/ablate/<study>)")
    args = p.parse_args(argv)
    storage = args.storage or f"sqlite:///runs/ablate/{args.study}.db"
    study = optuna.load_study(study_name=args.study, storage=storage)
    print(write_report(study, args.out or Path("runs/ablate") / args.study))


if __name__ == "__main__":
    main()
