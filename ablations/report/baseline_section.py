"""The baseline map in a study's summary and report: V(c)/V(0) of A_i(c) = r_i − c·b̄₋ᵢ, pooled over seeds.

Each probe point that measured ``reward`` and ``rloo`` carries the family's quadratics in its ``rloo`` row
(``grpo_lab/probe/baseline_map.py``) and, where the probe measured per-completion scores, the mechanism's
moments (``grpo_lab/probe/mechanism.py``). Pooling is the harness's: per seed the mean over its distinct
probe points (the warm start once, each trial's end), then a Student-t interval over seeds; ratios are
pooled as logs (geometric means, as the SNR ratios are). With one seed the interval is the point's own
jackknife over batches (``interval: "jackknife"``).

``summary.json``'s ``baseline_map``::

    {"c": [...], "v_ratio": [{mean, lo, hi, n}, ...], "c_star": {...}, "v1_ratio": {...},
     "v_star_ratio": {...}, "score_norm_ratio": {...}, "c_star_pred": {...}, "v_ratio_pred": [...],
     "oracle_ratio_pred": {...}, "oracle_ratio": {...}, "interval": "seeds" | "jackknife",
     "by_point": {"0": {same keys}, ...}}

(``oracle_ratio``: V(oracle)/V(reward) measured, where the probe ran ``oracle_p``.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ablations.report.runs import Run, points
from ablations.report.stats import fmt_ci, t_interval
from ablations.spaces import regimes
from ablations.spaces.regimes import success_rate
from grpo_lab.probe.baseline_map import C_GRID, PAIR, curve

POINT_NAMES = {0.0: "warm start", 0.5: "middle", 1.0: "end"}
LOG_SCALARS = ("v1_ratio", "v_star_ratio")  # pooled as logs; c_star linearly
NAN = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}


def point_maps(runs: list[Run], fraction: float | None = None) -> dict[Any, list[dict]]:
    """Per seed, the baseline maps of its distinct probe points (those at ``fraction`` only, when given)."""
    out: dict[Any, list[dict]] = {}
    for seed, pts in points(runs).items():
        for p in pts:
            row = p.get(PAIR[1]) or {}
            m = row.get("baseline_map")
            if m and (fraction is None or math.isclose(float(row["fraction"]), fraction, abs_tol=1e-6)):
                out.setdefault(seed, []).append(m)
    return out


def _pool(per_seed: dict[Any, float], log: bool) -> dict[str, float]:
    """t-interval over seeds of per-seed values (logs when ``log``; exp'd back), with ``n``."""
    vals = [v for v in per_seed.values() if np.isfinite(v)]
    mean, lo, hi = t_interval(vals)
    if log:
        mean, lo, hi = (math.exp(x) if math.isfinite(x) else math.nan for x in (mean, lo, hi))
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(vals)}


def _per_seed(maps: dict[Any, list[dict]], value, log: bool) -> dict[Any, float]:
    out = {}
    for seed, ms in maps.items():
        vals = [value(m) for m in ms]
        vals = [math.log(v) if log and v > 0 else (math.nan if log else v) for v in vals
                if v is not None and np.isfinite(v)]
        vals = [v for v in vals if np.isfinite(v)]
        if vals:
            out[seed] = float(np.mean(vals))
    return out


def _mech(key: str):
    return lambda m: (m.get("mechanism") or {}).get(key, math.nan)


def pooled(maps: dict[Any, list[dict]], grid=C_GRID) -> dict[str, Any] | None:
    """The map's entry (module docstring) from per-seed point maps; None without any."""
    if not maps:
        return None
    curves = {seed: [curve(m, grid) for m in ms] for seed, ms in maps.items()}
    out: dict[str, Any] = {"c": list(grid), "v_ratio": [], "snr_ratio": []}
    zero = list(grid).index(0.0)
    for key, name in (("v_ratio", "v_ratio"), ("snr", "snr_ratio")):  # X(c)/X(0), X = V or SNR
        for i in range(len(grid)):
            per = {seed: float(np.mean(logs)) for seed, cs in curves.items()
                   if (logs := [math.log(cv[key][i] / cv[key][zero]) for cv in cs
                                if _positive(cv[key][i], cv[key][zero])])}
            out[name].append(_pool(per, log=True))
    for name in ("c_star", *LOG_SCALARS):
        out[name] = _pool(_per_seed(maps, lambda m, k=name: m.get(k, math.nan), name in LOG_SCALARS),
                          name in LOG_SCALARS)
    out["score_norm_ratio"] = _pool(_per_seed(maps, _mech("score_norm_ratio"), True), True)
    out["c_star_pred"] = _pool(_per_seed(maps, _mech("c_star_pred"), False), False)
    out["oracle_ratio_pred"] = _pool(_per_seed(maps, _mech("oracle_ratio_pred"), True), True)
    out["oracle_ratio"] = _pool(_per_seed(maps, lambda m: m.get("oracle_ratio", math.nan), True), True)
    out["v_ratio_pred"] = [_pool(_per_seed(maps, lambda m, c=c: _predicted_ratio(m, c), True), True)
                           for c in grid]
    out["interval"] = "seeds"
    if len(maps) == 1 and sum(len(ms) for ms in maps.values()) == 1:  # one point: its own jackknife
        (m,) = next(iter(maps.values()))
        out["interval"] = "jackknife"
        for name in ("c_star", *LOG_SCALARS):
            out[name].update(lo=m.get(f"{name}_lo", math.nan), hi=m.get(f"{name}_hi", math.nan))
    return out


def _positive(a: float, b: float) -> bool:
    return a is not None and b is not None and np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0


def _predicted_ratio(m: dict, c: float) -> float:
    """V(c)/V(0) the mechanism predicts: 1 + (c²·B₂ − 2c·B₁)/V_measured(0) (``mechanism.py``)."""
    mech = m.get("mechanism") or {}
    if "b1" not in mech or not m["v"][0] > 0:
        return math.nan
    return 1.0 + (c * c * mech["b2"] - 2 * c * mech["b1"]) / m["v"][0]


def baseline_map_summary(runs: list[Run]) -> dict[str, Any] | None:
    """``summary.json``'s ``baseline_map``: pooled over every probe point, and ``by_point`` per fraction."""
    out = pooled(point_maps(runs))
    if out is None:
        return None
    fractions = sorted({round(float(r["fraction"]), 6) for run in runs
                        for r in run.probe_rows(PAIR[1]) if r.get("baseline_map")})
    out["by_point"] = {f"{f:g}": pooled(point_maps(runs, f)) for f in fractions}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    if len(groups) > 1:  # each group's own points (the warm start is shared by the groups of a seed)
        out["by_group"] = {}
        for label, rs in groups.items():
            entry = pooled(point_maps(rs))
            if entry is not None:
                rates = [x for x in (success_rate(r) for r in rs) if np.isfinite(x)]
                entry.update(params={k: v for k, v in rs[0].params.items() if k != "seed"},
                             success_rate=float(np.mean(rates)) if rates else math.nan)
                if len(fractions) > 1:  # a cell probed at its warm start and after training: each apart
                    entry["by_point"] = {f"{f:g}": pooled(point_maps(rs, f)) for f in fractions}
                    ends = [x for x in (success_rate(r, last=True) for r in rs) if np.isfinite(x)]
                    entry["success_rate_end"] = float(np.mean(ends)) if ends else math.nan
            out["by_group"][label] = entry
    return out


# ---- the report ----------------------------------------------------------------------------------------
def _fmt(d: dict | None, spec: str = ".3g", ratio: bool = False) -> str:
    d = {k: math.nan if v is None else v for k, v in (d or {}).items()}  # summary.json writes NaN as null
    if not np.isfinite(d.get("mean", math.nan)):
        return "n/a"
    x = "×" if ratio else ""
    if not (np.isfinite(d.get("lo", math.nan)) and np.isfinite(d.get("hi", math.nan))):
        return f"{x}{d['mean']:{spec}} (CI n/a)"
    return f"{x}{d['mean']:{spec}} [{x}{d['lo']:{spec}}, {x}{d['hi']:{spec}}]"


def report_lines(summary: dict, out_dir: Path) -> list[str]:
    """The report's "Baseline map" section (a table and the plot); [] without a map."""
    bmap = summary.get("baseline_map")
    if not bmap:
        return []
    cells = regimes.table_lines(bmap.get("by_group") or {}, _fmt)
    if cells:  # the regimes space: its cells differ in G, task and coding, so nothing is pooled across them
        phase = regimes.plot_phase(bmap["by_group"], Path(out_dir) / "baseline_regimes.png")
        return ["## Baseline map: regimes", "", "Per cell (G, task mix, reward coding a·r + b): success rate "
                "(the first step's reward, decoded; after training, the last 10% of steps'), "
                "c* = argmin V(c) of A_i(c) = r_i − c·b̄₋ᵢ and V(1)/V(0) = V(rloo)/V(reward) at the warm "
                "start (and after training, where probed) with 95% t-intervals over seeds, and the "
                "same predicted from per-completion score moments (score-norm ratio: failures' mean "
                "‖∇log π‖² over successes').", ""] + cells + ["", f"![regimes]({phase.name})", ""]
    path = plot_map(bmap, Path(out_dir) / "baseline_map.png")
    rows = [("all points", bmap)] + [(POINT_NAMES.get(float(k), k), v) for k, v in bmap["by_point"].items()]
    md = ["## Baseline map", "",
          "The family A_i(c) = r_i − c·b̄₋ᵢ (b̄₋ᵢ: the leave-one-out mean of the group; unbiased for every c; "
          "c = 0 is `reward`, c = 1 is `rloo`), measured from the cross-Gram of the `reward` and `rloo` "
          "gradients on the probe's own batches. V: total variance of one batch's gradient; "
          "c* = argmin V(c). "
          "Geometric means (c*: means) over seeds, 95% t-intervals over seeds"
          + (" (one point: jackknife over batches)" if bmap.get("interval") == "jackknife" else "")
          + ". *Predicted*: from per-completion score norms (failures' mean ‖∇log π‖² over successes' is "
          "the score-norm ratio) through the closed form V(c) = V(0) − 2c·E[p·C] + c²·E[p²Q + (σ²Q + "
          "‖μ‖²)/(G − 1)].", "",
          "| probe point | seeds | c* | V(1)/V(0) | V(c*)/V(0) | score-norm ratio (fail/success) "
          "| c* predicted | V(1)/V(0) predicted | oracle b = p: V/V(0) predicted | measured |",
          "|" + "---|" * 10]
    one = C_GRID.index(1.0)
    for name, d in rows:
        if d is None:
            continue
        md.append(f"| {name} | {d['c_star']['n']} | {_fmt(d['c_star'])} | "
                  f"{_fmt(d['v1_ratio'], ratio=True)} | {_fmt(d['v_star_ratio'], ratio=True)} | "
                  f"{_fmt(d['score_norm_ratio'], ratio=True)} | "
                  f"{_fmt(d['c_star_pred'])} | {_fmt(d['v_ratio_pred'][one], ratio=True)} | "
                  f"{_fmt(d['oracle_ratio_pred'], ratio=True)} | {_fmt(d.get('oracle_ratio'), ratio=True)} |")
    return md + ["", f"![baseline map]({path.name})", ""]


def plot_map(bmap: dict, path: Path) -> Path:
    """V(c)/V(0) with its band per probe point (and pooled), the predicted curve dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    c = np.asarray(bmap["c"])
    series = [("all points", bmap)] + [(POINT_NAMES.get(float(k), k), v) for k, v in bmap["by_point"].items()
                                       if v is not None]
    for i, (name, d) in enumerate(series):
        color = f"C{i}"
        mean = np.array([x["mean"] for x in d["v_ratio"]], float)
        lo, hi = (np.array([x[k] for x in d["v_ratio"]], float) for k in ("lo", "hi"))
        ax.plot(c, mean, color=color, label=f"{name} (measured, n = {d['c_star']['n']})")
        if np.isfinite(lo).any():
            ax.fill_between(c, lo, hi, color=color, alpha=0.15, linewidth=0)
        pred = np.array([x["mean"] for x in d["v_ratio_pred"]], float)
        if np.isfinite(pred).any():
            ax.plot(c, pred, color=color, linestyle="--", label=f"{name} (predicted)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    for x in (0.0, 1.0):
        ax.axvline(x, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("c in A_i = r_i − c · (leave-one-out mean)   (0: reward, 1: rloo)")
    ax.set_ylabel("V(c) / V(0)")
    ax.set_title("Baseline map: gradient variance of the baseline family, 95% band over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fmt_line(bmap: dict | None) -> str:
    """One line for a table cell: c* and V(1)/V(0) with intervals."""
    if not bmap:
        return "n/a"
    return f"c* {fmt_ci(bmap['c_star'], '.2f')}, V(1)/V(0) {_fmt(bmap['v1_ratio'], ratio=True)}"
