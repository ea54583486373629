"""Named search spaces of the ablation harness: what varies between the trials of a study.

A space is data, not code: a grid of values per key (or Optuna distributions for a tuning study), the YAML
overlay every trial starts from, the gradient-variance probe's settings and the reward level that counts as
"learned". The runner (``run.py``) and the objective (``objective.py``) only read it.

Keys are grpo-lab config keys in dotted form, exactly as on the ``grpo-lab fit`` command line without the
dashes: ``model.advantage``, ``model.aggregation``, ``model.clip_high``, ``model.beta``,
``model.num_iterations``, ``data.prompts_per_step``, ``trainer.strategy``, ``trainer.devices`` ... Two kinds
of keys are expanded before they reach the config:

- ``seed`` sets ``seed_everything`` and ``data.seed`` (and the probe's seed), so one seed fixes the RL
  sampling and the data order, and every estimator sees the same queries in the same order;
- a key listed in ``presets`` names a bundle of overrides per value (``"ddp2"`` -> strategy ddp, 2 devices,
  half the prompts per process). Use it when only some combinations make sense (auto + 2 devices does not)
  or when one factor is changed at a time (the ``objectives`` space).

Adding a space, without touching the runner::

    # my_spaces.py (anywhere importable)
    from ablations.spaces import Space, register_space

    temperature = register_space(Space(
        name="temperature",
        description="sampling temperature x seed with RLOO",
        grid={"model.temperature": [0.7, 1.0, 1.3], "seed": [0, 1, 2]},
        overrides={"model.advantage": "rloo"},
        baseline={"model.temperature": 1.0},
    ))

    grpo-lab-ablate --space my_spaces:temperature     # "module:attribute" imports it (my_spaces on sys.path)

or add the ``register_space(...)`` call at the end of this file and use ``--space temperature``.

A tuning space sets ``distributions`` (Optuna distributions) and ``n_trials`` instead of ``grid``: the
runner then uses ``TPESampler`` and prunes unpromising trials on ``prune_monitor`` at each validation (``pruning.py``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import optuna

from grpo_lab.errors import UserError
from grpo_lab.registry import import_object

DEFAULT_PRUNER: dict[str, Any] = {
    "class_path": "optuna.pruners.MedianPruner",
    "init_args": {"n_startup_trials": 4, "n_warmup_steps": 20},
}

PROBE_CLASS = "grpo_lab.variance.GradientVarianceProbe"


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of ``grpo_lab.variance.GradientVarianceProbe`` for every trial of a space.

    By default all four estimators are probed on the same rollouts (paired, at the trial's parameters); the
    reference gradient's ``reference_batches`` rollouts dominate the cost (measured: probing one estimator
    or four costs the same), so there is little to save. ``estimators="own"`` probes only the trial's own
    ``model.advantage``. The report uses each trial's own estimator's rows (its gradient quality along its
    own training trajectory).
    """

    estimators: tuple[str, ...] | str = ("reward", "mean_baseline", "group_norm", "rloo")
    num_batches: int = 16
    reference_batches: int = 64
    prompts_per_batch: int = 8
    at_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)

    def callback(self, advantage: str | None, seed: int) -> dict:
        """The callback entry (``class_path`` + ``init_args``) for a trial's overlay."""
        if self.estimators == "own":
            estimators = [advantage or "group_norm"]
        else:
            estimators = list(self.estimators)
        return {
            "class_path": PROBE_CLASS,
            "init_args": {
                "estimators": estimators,
                "num_batches": self.num_batches,
                "reference_batches": self.reference_batches,
                "prompts_per_batch": self.prompts_per_batch,
                "at_fractions": list(self.at_fractions),
                "seed": seed,
            },
        }


@dataclass(frozen=True)
class Space:
    """One named ablation: the trials are the grid's cartesian product (or ``n_trials`` TPE samples)."""

    name: str
    description: str
    grid: dict[str, list] | None = None
    """``{key: [values]}``; keys are dotted grpo-lab config keys, ``seed``, or a ``presets`` key."""
    base_config: str = "configs/ablate.yaml"
    """The YAML overlay (on ``configs/base.yaml``) every trial starts from; relative to the working
    directory, or else to the repository root."""
    probe: ProbeSettings | None = ProbeSettings()
    """Gradient-variance probe settings (None: no probe)."""
    threshold: float = 0.4
    """``train/reward`` (moving average) that counts as learned, for steps-to-threshold."""
    presets: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    """``{key: {value: {dotted key: value}}}``: grid keys that stand for a bundle of overrides."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides common to every trial of the space."""
    baseline: dict[str, Any] | None = None
    """Params (without ``seed``) of the group the others are compared to, paired by seed, in the report."""
    distributions: dict[str, optuna.distributions.BaseDistribution] | None = None
    """For tuning spaces: ``{key: distribution}`` sampled by TPE instead of a grid."""
    n_trials: int | None = None
    """Trials of a tuning space (``distributions``); a grid space runs each point once."""
    pruner: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_PRUNER))
    """Tuning spaces: ``{"class_path": "optuna.pruners.X", "init_args": {...}}`` (default: median pruning
    after 4 trials and 20 steps). Grid spaces are never pruned."""
    prune_monitor: str = "val/acc_sampled"
    """Tuning spaces: the metric the pruner sees at every validation (higher is better)."""

    def __post_init__(self) -> None:
        if (self.grid is None) == (self.distributions is None):
            raise UserError(f"space {self.name!r}: give exactly one of grid= and distributions=")
        if self.distributions is not None and not self.n_trials:
            raise UserError(f"space {self.name!r}: a space with distributions needs n_trials")
        for key, values in (self.grid or {}).items():
            if not values:
                raise UserError(f"space {self.name!r}: grid key {key!r} has no values")
            if key in self.presets:
                unknown = [v for v in values if v not in self.presets[key]]
                if unknown:
                    raise UserError(f"space {self.name!r}: {key}={unknown} have no preset; known: {list(self.presets[key])}")

    @property
    def is_grid(self) -> bool:
        return self.grid is not None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as a params dict (keys sorted, values in grid order)."""
        if self.grid is None:
            return []
        keys = sorted(self.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def sampler(self, seed: int = 0) -> optuna.samplers.BaseSampler:
        if self.grid is not None:
            return optuna.samplers.GridSampler(self.grid, seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, self.n_trials or 4))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's params: grid values through ``suggest_categorical``, else the distributions."""
        if self.grid is not None:
            return {k: trial.suggest_categorical(k, self.grid[k]) for k in sorted(self.grid)}
        return {k: _suggest(trial, k, d) for k, d in sorted(self.distributions.items())}

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted config overrides of one trial: the space's ``overrides``, then each param expanded."""
        out = dict(self.overrides)
        for key, value in params.items():
            if key == "seed":
                out["seed_everything"] = int(value)
                out["data.seed"] = int(value)
            elif key in self.presets:
                out.update(self.presets[key][value])
            else:
                out[key] = value
        return out

    def group_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params that define a compared group (everything but the seed)."""
        return {k: v for k, v in params.items() if k != "seed"}

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary stored on the study (the report reads only the study)."""
        return {
            "name": self.name,
            "description": self.description,
            "grid": self.grid,
            "base_config": self.base_config,
            "threshold": self.threshold,
            "baseline": self.baseline,
            "probe": None if self.probe is None else {
                "estimators": self.probe.estimators, "num_batches": self.probe.num_batches,
                "reference_batches": self.probe.reference_batches,
                "prompts_per_batch": self.probe.prompts_per_batch, "at_fractions": list(self.probe.at_fractions),
            },
        }


def _suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    D = optuna.distributions
    if isinstance(dist, D.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, D.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, D.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise TypeError(f"unsupported distribution for {name!r}: {dist!r}")


SPACES: dict[str, Space] = {}


def register_space(space: Space) -> Space:
    """Add ``space`` to the registry under ``space.name`` (a later registration replaces an earlier one)."""
    SPACES[space.name] = space
    return space


def get_space(name: str) -> Space:
    """A registered space by name, or ``package.module:attribute`` (imported, registered if it is a Space)."""
    if name in SPACES:
        return SPACES[name]
    if ":" in name:
        obj = import_object(name, "space")
        if not isinstance(obj, Space):
            raise UserError(f"{name!r} is a {type(obj).__name__}, not an ablations.spaces.Space")
        return register_space(obj)
    raise UserError(f"unknown space {name!r}; known: {', '.join(sorted(SPACES))} (or give 'module:attribute')")


ESTIMATORS = ["reward", "mean_baseline", "group_norm", "rloo"]

register_space(Space(
    name="default",
    description="advantage estimator x seed on the arithmetic mixture, one cached warm start, probe at 3 points",
    grid={"model.advantage": ESTIMATORS, "seed": [0, 1, 2]},
    baseline={"model.advantage": "reward"},
))

register_space(Space(
    name="smoke",
    description="2 estimators x 2 seeds on a tiny policy: checks the harness end to end in about a minute",
    grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1]},
    base_config="configs/ablate_smoke.yaml",
    probe=ProbeSettings(num_batches=4, reference_batches=8, prompts_per_batch=4, at_fractions=(0.0, 1.0)),
    threshold=0.15,
    baseline={"model.advantage": "reward"},
))

# One factor at a time around the default GRPO objective (group_norm, token_mean, clip 0.2, beta 0, mu 1):
# the full product of the four factors would be 24 points x seeds, most of them uninformative.
register_space(Space(
    name="objectives",
    description="loss variants around group_norm, one factor at a time: aggregation, clip_high, KL, mu",
    grid={"variant": ["grpo", "sequence_mean", "constant", "clip_high_0.28", "beta_0.04", "mu_2"], "seed": [0, 1, 2]},
    presets={"variant": {
        "grpo": {},
        "sequence_mean": {"model.aggregation": "sequence_mean"},
        "constant": {"model.aggregation": "constant"},
        "clip_high_0.28": {"model.clip_high": 0.28},
        "beta_0.04": {"model.beta": 0.04},
        # max_steps counts optimizer steps, so mu=2 makes as many updates from half as many rollouts.
        "mu_2": {"model.num_iterations": 2},
    }},
    overrides={"model.advantage": "group_norm"},
    probe=None,
    baseline={"variant": "grpo"},
))

# Single process vs DDP on CPU (gloo). The global batch is the same everywhere: data.prompts_per_step is
# global, so ddp2 runs 2 processes with half the prompts each. 'auto' with 2 devices is not a valid
# combination, hence one key with presets.
register_space(Space(
    name="strategies",
    description="single process vs DDP with 1 and 2 CPU processes (gloo), same global batch",
    grid={"strategy": ["single", "ddp1", "ddp2"], "seed": [0, 1]},
    presets={"strategy": {
        "single": {"trainer.strategy": "auto", "trainer.devices": 1},
        "ddp1": {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 1},
        "ddp2": {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 2},
    }},
    overrides={"model.advantage": "group_norm"},
    probe=None,
    baseline={"strategy": "single"},
))

# A tuning space: TPE over the learning rate and clip_high, median-pruned on sampled validation accuracy.
register_space(Space(
    name="tune_lr",
    description="TPE over AdamW lr and clip_high with RLOO, median-pruned on val/acc_sampled",
    distributions={
        "model.optimizer.init_args.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
        "model.clip_high": optuna.distributions.FloatDistribution(0.2, 0.4),
    },
    n_trials=12,
    overrides={"model.advantage": "rloo"},
    probe=None,
))

# The field's GRPO variants (README "The variants"), one factor at a time around GRPO (group_norm, token-level
# clip 0.2, token_mean, beta 0), each arm 6 seeds with the probe on. Two settings are common to every arm so
# that each variant can act at all: mu = 2 (at mu = 1 the ratio is exactly 1 and GSPO, CISPO and dual-clip have
# GRPO's gradient) and max_new_tokens = 6 (a 2-token overlong buffer then only reaches completions longer than
# any correct answer). The probe measures the advantage estimators on the same rollouts (gradient_weighted needs
# the rollout's log-probabilities, which the probe does not pass, so it is left out of the probe's list).
FIELD_PROBE_ESTIMATORS = ("reward", "mean_baseline", "group_norm", "rloo", "batch_norm", "batch_whiten", "james_stein")
OVERLONG = {"model.rewards": ["exact_match", "overlong_penalty"], "model.overlong_buffer": 2}
FIELD_VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "gspo": {"model.importance_level": "sequence"},
    "cispo": {"model.objective": "cispo"},
    "dual_clip_3": {"model.dual_clip": 3.0},
    "entropy_0.01": {"model.entropy_coef": 0.01},
    "top_entropy_0.2": {"model.top_entropy_quantile": 0.2},
    "kl_loss_0.04": {"model.beta": 0.04},
    "kl_reward_0.04": {"model.beta": 0.04, "model.kl_in": "reward"},
    "dr_grpo": {"model.advantage": "mean_baseline"},
    "rloo": {"model.advantage": "rloo"},
    "batch_norm": {"model.advantage": "batch_norm"},
    "batch_whiten": {"model.advantage": "batch_whiten"},
    "james_stein": {"model.advantage": "james_stein"},
    "gradient_weighted": {"model.advantage": "gradient_weighted"},
    "overlong": dict(OVERLONG),
    "overlong_normalized": {**OVERLONG, "model.reward_aggregation": "normalize_then_sum"},
    "dynamic_sampling": {"model.dynamic_sampling": True, "model.max_resample_rounds": 3},
}

register_space(Space(
    name="field",
    description="the field's GRPO variants one at a time around GRPO (mu 2, 6 tokens): loss, advantage, reward, sampling",
    grid={"variant": list(FIELD_VARIANTS), "seed": [0, 1, 2, 3, 4, 5]},
    presets={"variant": FIELD_VARIANTS},
    overrides={"model.advantage": "group_norm", "model.num_iterations": 2, "model.max_new_tokens": 6},
    probe=ProbeSettings(estimators=FIELD_PROBE_ESTIMATORS),
    baseline={"variant": "grpo"},
))
