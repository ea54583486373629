"""The ``regimes`` space's data and its report: where baselines lower gradient variance, where they raise it.

Probe-only cells (one optimizer step, so the fit logs a reward; the probe runs at the warm start, before
it) over the group size G, the task mix (the success rate) and the reward's coding. Every coding is
``exact_match`` plus a constant: r·a + b with ``reward_weights`` [a, b], so one seed's cells of one G and
mix share their rollouts and differ only in the numbers the advantage sees. The map of each cell
(``ablations/report/baseline_section.py``): c*, V(1)/V(0) measured, and V(1)/V(0) predicted from the
mechanism's moments; the phase diagram colours each cell by the measured ratio and draws the predicted
boundary (predicted V(1)/V(0) = 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ablations.report.stats import end_mean

CODINGS = {"r": (1.0, 0.0), "2r-1": (2.0, -1.0), "r+1": (1.0, 1.0), "r+3": (1.0, 3.0)}  # (a, b): a·r + b
MIXES = {"easy": "arithmetic_easy", "mixed": "arithmetic"}  # success ≈ 0.36 and ≈ 0.11 at the warm starts
GROUP_SIZES = [4, 8, 16, 32]
PRESETS = {
    "coding": {name: {"model.rewards": ["exact_match", "ablations.spaces.controls:constant"],
                      "model.reward_weights": [a, b]} for name, (a, b) in CODINGS.items()},
    "mix": {name: {"data.dataset": dataset} for name, dataset in MIXES.items()},
}
OVERRIDES = {"model.advantage": "rloo", "trainer.max_steps": 1, "trainer.limit_val_batches": 0}
TRAINED_STEPS = 60
"""``regimes_trained``: each cell trained this many rloo steps (the offset does not change rloo's
advantages, so a seed's codings train alike up to scale) and probed again at the end."""
POINTS = {"0": "warm start", "1": "trained"}


def success_rate(run, last: bool = False) -> float:
    """The first (``last``: the mean of the last 10% of) logged ``train/reward`` decoded back to the 0/1
    scale: (r̄ − b)/a for the coding a·r + b."""
    curve = run.curve("train/reward")
    if not len(curve):
        return math.nan
    weights = (run.attrs.get("overrides") or {}).get("model.reward_weights") or [1.0, 0.0]
    a, b = (list(weights) + [0.0])[:2]
    r = end_mean(curve) if last else float(curve[0, 1])  # the last 10%, as the report's lift
    return (r - b) / a if a else math.nan


def _cells(by_group: dict) -> list[tuple[str, dict]]:
    return [(label, d) for label, d in by_group.items()
            if d and {"coding", "mix", "model.num_generations"} <= set(d.get("params", {}))]


def _mean(d: dict | None) -> float:
    v = (d or {}).get("mean")
    return math.nan if v is None else float(v)


def table_lines(by_group: dict, fmt) -> list[str]:
    """One row per cell: G, mix, coding, success rate, c*, V(1)/V(0) measured and predicted."""
    cells = _cells(by_group)
    if not cells:
        return []
    one = None
    md = ["| G | mix | coding | point | success rate | seeds | c* | V(1)/V(0) | V(1)/V(0) predicted | "
          "c* predicted | score-norm ratio |", "|" + "---|" * 11]
    order = {k: i for i, k in enumerate(CODINGS)}
    key = lambda x: (x[1]["params"]["mix"], x[1]["params"]["model.num_generations"],  # noqa: E731
                     order.get(x[1]["params"]["coding"], 9))
    for _, cell in sorted(cells, key=key):
        p = cell["params"]
        one = cell["c"].index(1.0) if one is None else one
        # a cell probed at its warm start and after a short training: a row per point
        rows = [(POINTS.get(k, k), d) for k, d in cell["by_point"].items()] if "by_point" in cell \
            else [("warm start", cell)]
        for point, d in rows:
            if d is None:
                continue
            rate = cell.get("success_rate_end" if point == "trained" else "success_rate", math.nan)
            md.append(f"| {p['model.num_generations']} | {p['mix']} | {p['coding']} | {point} | "
                      f"{rate:.2f} | {d['c_star']['n']} | {fmt(d['c_star'])} | "
                      f"{fmt(d['v1_ratio'], ratio=True)} | {fmt(d['v_ratio_pred'][one], ratio=True)} | "
                      f"{fmt(d['c_star_pred'])} | {fmt(d['score_norm_ratio'], ratio=True)} |")
    return md


def _warm_point(cell: dict) -> dict:
    """A cell probed after training too (``regimes_trained``): its warm-start point, as the other cells."""
    warm = (cell.get("by_point") or {}).get("0")
    return {**cell, **warm} if warm else cell


def plot_phase(by_group: dict, path: Path) -> Path | None:
    """Per mix, a G × coding grid coloured by the measured log V(1)/V(0) (blue: the leave-one-out baseline
    lowers the variance; red: raises it), each cell labelled with c* and the ratio; the dashed line is the
    predicted boundary (predicted V(1)/V(0) = 1, from the mechanism's moments)."""
    cells = _cells(by_group)
    if not cells:
        return None
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    mixes = [m for m in MIXES if any(d["params"]["mix"] == m for _, d in cells)]
    gs = sorted({d["params"]["model.num_generations"] for _, d in cells})
    codes = [c for c in CODINGS if any(d["params"]["coding"] == c for _, d in cells)]
    one = cells[0][1]["c"].index(1.0)
    fig = Figure(figsize=(5.2 * len(mixes) + 1.2, 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(mixes)))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0)
    image = None
    cells = [(label, _warm_point(d)) for label, d in cells]
    for ax, mix in zip(axes, mixes, strict=True):
        meas, pred = np.full((len(codes), len(gs)), np.nan), np.full((len(codes), len(gs)), np.nan)
        rate = []
        for _, d in cells:
            p = d["params"]
            if p["mix"] != mix:
                continue
            i, j = codes.index(p["coding"]), gs.index(p["model.num_generations"])
            meas[i, j] = math.log(_mean(d["v1_ratio"])) if _mean(d["v1_ratio"]) > 0 else np.nan
            v = _mean(d["v_ratio_pred"][one])
            pred[i, j] = math.log(v) if v > 0 else np.nan
            rate.append(d.get("success_rate", math.nan))
            ax.text(j, i, f"c*={_mean(d['c_star']):.2f}\n×{_mean(d['v1_ratio']):.2f}", ha="center",
                    va="center", fontsize=7)
        image = ax.imshow(np.clip(meas, -1, 1), cmap="RdBu_r", norm=norm, origin="lower", aspect="auto")
        # a predicted ratio ≤ 0 (pooled as NaN: the moments of 4 queries overshoot) predicts "lowers"
        filled = np.nan_to_num(pred, nan=-1.0)
        if np.isfinite(pred).sum() >= 4 and filled.min() < 0 < filled.max():
            ax.contour(np.arange(len(gs)), np.arange(len(codes)), filled, levels=[0.0],
                       colors="k", linestyles="--", linewidths=1.2)
        ax.set_xticks(range(len(gs)), [str(g) for g in gs])
        ax.set_yticks(range(len(codes)), codes)
        ax.set_xlabel("group size G")
        ax.set_ylabel("reward coding")
        ax.set_title(f"{mix} mix (success ≈ {np.nanmean(rate) if rate else math.nan:.2f})", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="log V(1)/V(0)  (< 0: rloo's baseline lowers variance)")
    fig.suptitle("Baseline regimes: measured V(rloo)/V(reward) per cell; dashed: predicted boundary",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    return path
