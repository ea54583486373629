"""A finished trial's numbers from its TensorBoard scalars and ``probe.json``: the reward curve's AUC, the
steps to the threshold, downsampled curves, the gradient clipping, as the study stores them (user attrs,
``runner/trial.py``'s docstring). Pure but for reading the trial's files. Split from ``trial.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ablations.report.stats import clip_stats
from ablations.runner.launch import FitFailed
from grpo_lab.train.tensorboard_scalars import read_scalars

CURVE_PREFIXES = ("train/reward", "val/acc_sampled", "val/acc_greedy")
MAX_POINTS = 200


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def auc(points: list[tuple[int, float]]) -> float:
    """Normalised area under a curve: trapezoid area / step span (a single point: its value)."""
    if not points:
        return float("nan")
    steps, values = np.array(points, dtype=float).T
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(values.mean())
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def steps_to_threshold(points: list[tuple[int, float]], threshold: float,
                       window: int | None = None) -> int | None:
    """First step at which the mean of the last ``window`` values reaches ``threshold``; None if never.

    Only full windows count (from the ``window``-th point on), so one lucky early batch does not count as
    learned. The default window is a tenth of the curve, between 3 and 20 points.
    """
    if not points:
        return None
    steps, values = np.array(points, dtype=float).T
    window = min(len(values), window or max(3, min(20, len(values) // 10)))
    full = np.convolve(values, np.ones(window) / window, mode="valid")  # full[i] ends at point i + window - 1
    hit = np.nonzero(full >= threshold)[0]
    return int(steps[hit[0] + window - 1]) if len(hit) else None


def downsample(points: list[tuple[int, float]], max_points: int = MAX_POINTS) -> list[list[float]]:
    """At most ``max_points`` ``[step, value]`` pairs: consecutive points averaged in equal bins."""
    if len(points) <= max_points:
        return [[int(s), float(v)] for s, v in points]
    arr = np.array(points, dtype=float)
    return [[float(b[:, 0].mean()), float(b[:, 1].mean())] for b in np.array_split(arr, max_points)]


def _dedup(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Sorted by step, the last value kept where a step was logged twice (e.g. a resumed event file)."""
    return sorted(dict(points).items())


def trial_metrics(logdir: Path, threshold: float) -> dict[str, Any]:
    """The user attrs of a finished trial, from its TensorBoard scalars and ``probe.json``."""
    scalars = {tag: _dedup(pts) for tag, pts in read_scalars(logdir).items()}
    reward = scalars.get("train/reward")
    if not reward:
        raise FitFailed(f"no train/reward scalars under {logdir}; the fit logged nothing (see fit.log)")
    probe_file = Path(logdir) / "probe.json"
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else []
    if isinstance(probe, dict):  # {"config": ..., "results": [rows]}
        probe = probe.get("results", [])
    return {
        "auc": auc(reward),
        "steps_to_threshold": steps_to_threshold(reward, threshold),
        "final": {tag.removeprefix("val/acc_"): pts[-1][1]
                  for tag, pts in scalars.items() if tag.startswith("val/acc_")},
        "curves": {tag: downsample(pts) for tag, pts in scalars.items() if tag.startswith(CURVE_PREFIXES)},
        "probe": probe,
        "last_step": int(reward[-1][0]),
        "grad_clip": clip_stats([v for _, v in scalars.get("train/grad_norm", [])], max_grad_norm(logdir)),
    }


def max_grad_norm(logdir: Path) -> float | None:
    """``model.max_grad_norm`` of the fit's saved ``config.yaml`` (LightningCLI writes it to the log dir);
    base.yaml's 1.0 when the file is missing."""
    path = Path(logdir) / "config.yaml"
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {}) if path.is_file() else {}
    return model.get("max_grad_norm", 1.0)
