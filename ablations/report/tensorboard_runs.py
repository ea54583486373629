"""A study in TensorBoard: each trial's run is named by its parameters, and each finished trial writes its
parameters with its final metrics through TensorBoard's HParams plugin, one row per trial::

    tensorboard --logdir runs/ablate/<study>

    runs/ablate/<study>/advantage=rloo/seed=0/trial_3/     trial.yaml, fit.log, probe.json, the events

The run's name is ``<key>=<value>/...`` in the space's key order, keys shortened to their last dotted part
(``model.optimizer.init_args.lr`` -> ``lr``) unless two keys would share it; the trial number is the last
part, so a retried grid point (a failed or killed attempt, then the one that completed) keeps each attempt's
curves and logs apart. The HParams row's trial id is the name without the number.

The protocol buffers come from ``tensorboard.plugins.hparams.summary_v2`` (``hparams_config_pb``,
``hparams_pb``: the plugin's own format, no TensorFlow needed) and are written next to Lightning's events
by torch's ``SummaryWriter``, with the metrics as scalars under ``study/`` (the HParams tab reads a metric's
value as the last value of its scalar tag in the run). Lightning's own ``hp_metric`` (a constant -1) is
turned off in the trial's logger (``default_hp_metric: false``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from tensorboard.plugins.hparams import summary_v2 as hp

from ablations.spaces.space import Space

# (scalar tag, column title): the HParams table's metric columns, in this order.
METRICS = (
    ("study/auc", "AUC (mean train reward)"),
    ("study/final_acc_sampled", "final acc, sampled"),
    ("study/snr", "SNR, own estimator"),  # mean over the probe points
    ("study/steps_to_threshold", "steps to threshold"),
    ("study/wall_time_s", "wall time (s)"),
    ("study/final_acc_sampled_easy", "final acc, sampled, easy"),
    ("study/final_acc_sampled_hard", "final acc, sampled, hard"),
)
ALWAYS = ("study/auc", "study/final_acc_sampled", "study/steps_to_threshold", "study/wall_time_s")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=:,-]+")


def space_keys(space: Space) -> list[str]:
    """The space's param keys in the order the space defines them."""
    return list(space.grid if space.is_grid else space.distributions)


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """``{key: column name}``: the last dotted part of each key, or the whole key where two would clash."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _fmt(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return _UNSAFE.sub("_", text) or "_"


def run_name(space: Space, params: dict[str, Any]) -> str:
    """``advantage=rloo/seed=0``: the trial's params as a relative path (keys the space does not know
    last)."""
    known = space_keys(space)
    keys = [k for k in known if k in params] + sorted(k for k in params if k not in known)
    names = short_names(keys)
    return "/".join(f"{names[k]}={_fmt(params[k])}" for k in keys) or "trial"


def trial_dir(study_dir: Path, space: Space, params: dict[str, Any], number: int) -> Path:
    return Path(study_dir) / run_name(space, params) / f"trial_{number}"


def _hparam_value(value: Any) -> bool | float | str:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return str(value)


def _domain(space: Space, key: str):
    """The HParams domain of a key: the grid's values, or the distribution's range (None if mixed)."""
    if space.is_grid:
        values = [_hparam_value(v) for v in space.grid[key]]
        return hp.Discrete(values) if len({type(v) for v in values}) == 1 else None
    dist = space.distributions[key]
    D = optuna.distributions
    if isinstance(dist, D.FloatDistribution):
        return hp.RealInterval(float(dist.low), float(dist.high))
    if isinstance(dist, D.IntDistribution):
        return hp.IntInterval(int(dist.low), int(dist.high))
    if isinstance(dist, D.CategoricalDistribution):
        values = [_hparam_value(v) for v in dist.choices]
        return hp.Discrete(values) if len({type(v) for v in values}) == 1 else None
    return None


def own_snr(probe: list[dict], estimator: str | None) -> float | None:
    """Mean SNR over the probe points of the trial's own estimator (all rows if only one estimator was
    probed); None without probe rows or finite values."""
    rows = [r for r in probe if r.get("estimator") == estimator]
    if not rows and len({r.get("estimator") for r in probe}) == 1:
        rows = probe
    values = [float(r["snr"]) for r in rows if r.get("snr") is not None and math.isfinite(r["snr"])]
    return sum(values) / len(values) if values else None


def final_metrics(attrs: dict[str, Any], estimator: str | None) -> dict[str, float]:
    """``{tag: value}`` of the METRICS a finished trial has (``attrs``: its user attrs from ``trial_metrics``
    plus ``wall_time_s``); absent or undefined ones are left out (an empty cell, not a made-up number)."""
    final = attrs.get("final") or {}
    values = {
        "study/auc": attrs.get("auc"),
        "study/final_acc_sampled": final.get("sampled"),
        "study/final_acc_sampled_easy": final.get("sampled_easy"),
        "study/final_acc_sampled_hard": final.get("sampled_hard"),
        "study/snr": own_snr(attrs.get("probe") or [], estimator),
        "study/steps_to_threshold": attrs.get("steps_to_threshold"),
        "study/wall_time_s": attrs.get("wall_time_s"),
    }
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def write_hparams(run_dir: Path, space: Space, params: dict[str, Any], attrs: dict[str, Any], probed: bool,
                  step: int = 0) -> dict[str, float]:
    """Write a finished trial's HParams row into its run directory; returns the metrics written.

    The columns (the experiment config every trial writes alike; TensorBoard reads one of them) are the
    space's keys and the metrics of ``METRICS``: the SNR only when the trials were ``probed``, the easy/hard
    accuracies only when the dataset has those difficulties (the same for every trial of a study)."""
    from torch.utils.tensorboard import SummaryWriter  # torch's writer, as Lightning's logger uses

    keys = [k for k in space_keys(space) if k in params]
    names = short_names(keys)
    estimator = space.trial_overrides(params).get("model.advantage")
    metrics = final_metrics(attrs, estimator)
    config = hp.hparams_config_pb(
        hparams=[hp.HParam(names[k], _domain(space, k)) for k in keys],
        metrics=[hp.Metric(tag, display_name=title) for tag, title in METRICS
                 if tag in metrics or tag in ALWAYS or (tag == "study/snr" and probed)],
    )
    row = hp.hparams_pb({names[k]: _hparam_value(params[k]) for k in keys}, trial_id=run_name(space, params))
    with SummaryWriter(log_dir=str(run_dir), filename_suffix=".hparams") as writer:
        writer.file_writer.add_summary(config)
        writer.file_writer.add_summary(row)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=step)
    return metrics
