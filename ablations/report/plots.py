"""The report's PNG plots: reward curves with seed bands, easy vs hard queries, the probe per point.

Figures are built with ``matplotlib.figure.Figure`` and saved directly: no pyplot, no backend to choose,
nothing global changed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ablations.report.curves import moving_average
from ablations.report.runs import ProbeView, Run
from ablations.report.stats import t_half_width, t_interval

POINT_NAMES = {0.0: "warm start", 0.5: "middle", 1.0: "end"}


COLORS = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _band(runs: list[Run], tag: str, smooth: bool = True):
    """Common steps, per-seed curves (smoothed), their mean and 95% t-band, and the smoothing window."""
    curves = [c for c in (r.curve(tag) for r in runs) if len(c)]
    if not curves:
        return None
    steps = curves[0][:, 0]
    window = max(1, len(steps) // 20) if smooth else 1
    ys = np.stack([moving_average(np.interp(steps, c[:, 0], c[:, 1]), window) for c in curves])
    mean = ys.mean(axis=0)
    half = t_half_width(ys.std(axis=0, ddof=1), len(ys)) if len(ys) >= 2 else np.full_like(mean, np.nan)
    return steps, ys, mean, mean - half, mean + half, window


def _plot_band(ax, runs: list[Run], tag: str, label: str, color: str, smooth: bool = True,
               marker=None) -> int | None:
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
    # Every line on the axes is a seed's curve or a mean of them: their range is the seeds' range so far
    # (read from the axes, not kept in an attribute set on matplotlib's object).
    curves = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    low, high = min(float(y.min()) for y in curves), max(float(y.max()) for y in curves)
    pad = 0.1 * (high - low) or 0.05
    ax.set_ylim(low - pad, high + pad)
    return window


def plot_reward_curves(by_group: dict[str, list[Run]], path: Path) -> Path:
    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    window = None
    for i, (g, runs) in enumerate(by_group.items()):
        window = _plot_band(ax, runs, "train/reward", f"{g} (n={len(runs)})",
                            COLORS[i % len(COLORS)]) or window
    n = max(len(r) for r in by_group.values())
    ax.set_title(f"Training reward: mean over seeds (thin: each seed), 95% t-band\n"
                 f"moving average over {window or 1} logged points", fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/reward (mean reward of the rollout batch)")
    ax.grid(alpha=0.3)
    ax.legend(title=f"group (seeds, up to {n})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_easy_hard(by_group: dict[str, list[Run]], path: Path) -> Path:
    panels = [("train/reward_easy", "train reward, easy queries (1+1 digits)", True),
              ("train/reward_hard", "train reward, hard queries (2+2 digits)", True),
              ("val/acc_sampled_easy", "val accuracy (sampled), easy", False),
              ("val/acc_sampled_hard", "val accuracy (sampled), hard", False)]
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (tag, title, smooth) in zip(axes.flat, panels, strict=True):
        for i, (g, runs) in enumerate(by_group.items()):
            _plot_band(ax, runs, tag, g, COLORS[i % len(COLORS)], smooth=smooth,
                       marker=None if smooth else "o")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes.flat[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=9)
    fig.suptitle("Easy vs hard queries: mean over seeds (thin: each seed) with 95% t-band; train curves "
                 "smoothed")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    return path


def plot_probe(view: ProbeView, fractions: list[float], path: Path) -> Path:
    metrics = [("snr", "SNR  S / V  ≈  ‖E g‖² / tr Cov(g)"),
               ("hard_share", "share of ‖g‖² from hard queries")]
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    x = np.arange(len(fractions))
    width = 0.8 / max(1, len(view.by_group))
    for ax, (metric, ylabel) in zip(axes, metrics, strict=True):
        positive = True
        for i, g in enumerate(view.by_group):
            cis = [t_interval(list(view.values(g, metric, f).values())) for f in fractions]
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
    axes[1].set_title("Hard queries' share of the gradient", fontsize=10)
    axes[0].legend(fontsize=9)
    how = "same policies for every estimator" if view.same_params else "each estimator on its own trajectory"
    fig.suptitle(f"Gradient-variance probe ({how}): mean over seeds with 95% t-interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


