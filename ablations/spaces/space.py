"""Named search spaces of the ablation harness: what varies between the trials of a study.

A space is data, not code: a grid of values per key (or Optuna distributions for a tuning study), the YAML
overlay every trial starts from, the gradient-variance probe's settings and the reward level that counts as
"learned". The runner (``run.py``) and the trial runner (``runner/trial.py``) only read it.

Keys are grpo-lab config keys in dotted form, exactly as on the ``grpo-lab fit`` command line without the
dashes: ``model.advantage``, ``model.aggregation``, ``model.clip_high``, ``model.beta``,
``model.num_iterations``, ``data.prompts_per_step``, ``trainer.strategy``, ``trainer.devices`` ... Two kinds
of keys are expanded before they reach the config:

- ``seed`` sets ``seed_everything`` and ``data.seed`` (and the probe's seed), so one seed fixes the RL
  sampling and the data order, and every estimator sees the same queries in the same order;
- a key listed in ``presets`` names a bundle of overrides per value (``"ddp2"`` -> strategy ddp, 2 devices,
  half the prompts per process). Use it when only some combinations make sense (auto + 2 devices does not)
  or when one factor is changed at a time (the ``objectives`` space). A bundle's ``seed_offset`` shifts
  the seed of its trials (an independent seed stream that still pairs with the same ``seed`` value: the
  A/A control of the ``controls`` space).

``seed`` is an integer parameter (``suggest_int`` over [0, 2³¹)), so a study can grow by seeds
(``grpo-lab-ablate --until-decisive`` enqueues new ones); the grid's list is the first round.
Each group is compared to ``baseline`` paired by seed, or the space lists its ``comparisons``.

Adding a space, without touching the runner::

    # my_spaces.py (anywhere importable)
    from ablations.spaces.space import Space, register_space

    temperature = register_space(Space(
        name="temperature",
        description="sampling temperature x seed with RLOO",
        grid={"model.temperature": [0.7, 1.0, 1.3], "seed": [0, 1, 2]},
        overrides={"model.advantage": "rloo"},
        baseline={"model.temperature": 1.0},
    ))

    grpo-lab-ablate --space my_spaces:temperature     # "module:attribute" imports it (my_spaces on sys.path)

or add the ``register_space(...)`` call to ``ablations/spaces/builtin.py`` and use ``--space temperature``.

A tuning space sets ``distributions`` (Optuna distributions) and ``n_trials`` instead of ``grid``: the
runner then uses ``TPESampler`` and prunes unpromising trials on ``prune_monitor`` at each validation
(``pruning.py``).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import optuna

from grpo_lab.advantages import CLASSIC_ESTIMATORS
from grpo_lab.system.errors import UserError
from grpo_lab.system.registry import import_object, register

DEFAULT_PRUNER: dict[str, Any] = {
    "class_path": "optuna.pruners.MedianPruner",
    "init_args": {"n_startup_trials": 4, "n_warmup_steps": 20},
}

PROBE_CLASS = "grpo_lab.variance.GradientVarianceProbe"
SEED_MAX = 2**31 - 1
KINDS = ("comparison", "positive_control", "aa_control")
POPULATIONS = ("networks", "one_network")
# grpo_lab.model.warmstart.WarmStartConfig.seed's default: seed 0's network is the old one
WARM_START_SEED = 1234


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a report: ``group`` against ``baseline`` (params without the seed), by seed.

    ``kind``: ``comparison`` (a question the study asks), ``positive_control`` (a difference that must be
    detected) or ``aa_control`` (two arms that differ only in their seed streams: any difference found is
    a false positive)."""

    label: str
    group: dict[str, Any]
    baseline: dict[str, Any]
    kind: str = "comparison"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"comparison {self.label!r}: kind must be one of {KINDS}, got {self.kind!r}")


SETTINGS_KEYS = ("base_config", "overrides", "presets", "threshold", "baseline", "comparisons", "probe",
                 "population")
"""What a trial runs with and the report compares by, in a space's :meth:`Space.describe`."""


PARAMETERIZED = ("baseline_coef",)
"""Estimators whose registry entry is one member of a family set by another key: never auto-probed."""


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of ``grpo_lab.variance.GradientVarianceProbe`` for every trial of a space.

    By default all four estimators are probed on the same rollouts (paired, at the trial's parameters): the
    backward passes dominate the cost and four estimators need few more than one (``grpo_lab/probe``).
    The trial's own ``model.advantage`` is always added, a user's ``module:fn`` estimator too (except
    ``baseline_coef``, whose registry name means c = 1 while the arm's c is ``model.baseline_coef``: the
    baseline map measures the whole family from ``reward`` and ``rloo``). ``estimators="own"`` probes only
    the trial's own ``model.advantage``. K = 64 batches of 8 prompts give
    a paired SNR-ratio interval of about ±21% at one point of the default study, K = 128 about ±14%
    (docs/ablations.md, "The probe's precision"); the report pools the points and seeds. The warm-start
    point is the same policy for every trial of a seed and is computed once per seed (the probe's cache
    under ``<root>/probe_cache``), so ``warm_start_batches`` can be larger than ``num_batches``.
    """

    estimators: tuple[str, ...] | str = CLASSIC_ESTIMATORS
    num_batches: int = 64
    warm_start_batches: int | None = None
    """K at the warm start (None: ``num_batches``): one policy for every trial, computed once per seed."""
    reference_batches: int = 0
    prompts_per_batch: int = 8
    at_fractions: tuple[float, ...] = (0.0, 1.0)
    score_prompts: int = 0
    """Queries whose completions' scores are measured one by one at the warm start, for the baseline map's
    mechanism (``grpo_lab/probe/scores.py``; about 1 s for 4 queries x 16 on the default policy)."""
    sketch_dim: int = 0
    """d > 0: keep each gradient as a d-dim CountSketch made on the trial's device (unbiased dot products,
    relative error about √(2/d); ``grpo_lab/probe/sketch.py``), for policies too large for K float32 rows of
    every parameter on the CPU (a 113M model: 65536); 0: the exact probe."""

    def callback(self, advantage: str | None, seed: int, cache_dir: str | None = None) -> dict:
        """The callback entry (``class_path`` + ``init_args``) for a trial's overlay."""
        if self.estimators == "own":
            estimators = [advantage or "group_norm"]
        else:
            estimators = list(self.estimators)
            if advantage and advantage not in estimators and advantage not in PARAMETERIZED:
                estimators.append(advantage)  # the arm's own estimator (a `module:fn` too) always gets a row
        return {
            "class_path": PROBE_CLASS,
            "init_args": {
                "estimators": estimators,
                "num_batches": self.num_batches,
                "warm_start_batches": self.warm_start_batches,
                "reference_batches": self.reference_batches,
                "prompts_per_batch": self.prompts_per_batch,
                "at_fractions": list(self.at_fractions),
                "seed": seed,
                "cache_dir": cache_dir,
                **({"score_prompts": self.score_prompts} if self.score_prompts else {}),
                **({"sketch_dim": self.sketch_dim} if self.sketch_dim else {}),
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
    comparisons: tuple[Comparison, ...] | None = None
    """The report's paired comparisons (default: every group against ``baseline``)."""
    population: str = "networks"
    """What a verdict generalises over. ``networks``: each seed starts from its own warm start (warm-start
    seed ``WARM_START_SEED + seed``, cached per seed; every arm of a seed shares it), so seeds sample
    initial policies as well as RL randomness. ``one_network``: every seed starts from the same warm start
    (the config's), a tighter paired design whose claims cover RL seeds from that one network."""

    def __post_init__(self) -> None:
        if (self.grid is None) == (self.distributions is None):
            raise UserError(f"space {self.name!r}: give exactly one of grid= and distributions=")
        if self.population not in POPULATIONS:
            raise UserError(f"space {self.name!r}: population must be one of {POPULATIONS}, got "
                            f"{self.population!r}")
        if self.distributions is not None and not self.n_trials:
            raise UserError(f"space {self.name!r}: a space with distributions needs n_trials")
        for key, values in (self.grid or {}).items():
            if not values:
                raise UserError(f"space {self.name!r}: grid key {key!r} has no values")
            if key in self.presets:
                unknown = [v for v in values if v not in self.presets[key]]
                if unknown:
                    raise UserError(f"space {self.name!r}: {key}={unknown} have no preset; known: "
                                    f"{list(self.presets[key])}")

    @property
    def is_grid(self) -> bool:
        return self.grid is not None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as a params dict (keys sorted, values in grid order)."""
        if self.grid is None:
            return []
        keys = sorted(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys))
        return [dict(zip(keys, combo, strict=True)) for combo in combos]

    def sampler(self, seed: int = 0) -> optuna.samplers.BaseSampler:
        if self.grid is not None:
            return optuna.samplers.GridSampler(self.grid, seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, self.n_trials or 4))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's params: grid values through ``suggest_categorical`` (``seed`` through ``suggest_int``,
        or as stored by a study of an older grpo_lab), else the distributions."""
        if self.grid is not None:
            return {k: _suggest(trial, k, _seed_distribution(trial) if k == "seed" else
                                optuna.distributions.CategoricalDistribution(self.grid[k]))
                    for k in sorted(self.grid)}
        return {k: _suggest(trial, k, d) for k, d in sorted(self.distributions.items())}

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted config overrides of one trial: the space's ``overrides``, then each param expanded, the
        seed last (shifted by its presets' ``seed_offset``), and with the ``networks`` population the
        warm start's seed from the unshifted seed (so the arms of a seed, an A/A arm's included, share it).
        A bundle's ``probe: False`` is not an override (:meth:`probes`)."""
        out = dict(self.overrides)
        offset = 0
        for key, value in params.items():
            if key == "seed":
                continue
            if key in self.presets:
                bundle = dict(self.presets[key][value])
                offset += int(bundle.pop("seed_offset", 0))
                bundle.pop("probe", None)
                out.update(bundle)
            else:
                out[key] = value
        if "seed" in params:
            out["seed_everything"] = out["data.seed"] = int(params["seed"]) + offset
            if self.population == "networks":
                out.setdefault("model.warm_start.seed", WARM_START_SEED + int(params["seed"]))
        return out

    def probes(self, params: dict[str, Any]) -> bool:
        """Whether a trial with ``params`` runs the probe: the space has one and no preset of the trial says
        ``probe: False`` (an A/A arm, measured on training only)."""
        return self.probe is not None and all(
            self.presets[k][v].get("probe", True) for k, v in params.items() if k in self.presets)

    def group_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params that define a compared group (everything but the seed)."""
        return {k: v for k, v in params.items() if k != "seed"}

    def groups(self) -> list[dict[str, Any]]:
        """Every group of a grid space (its points without the seed), in grid order."""
        groups = {tuple(sorted(self.group_of(p).items())): self.group_of(p) for p in self.points()}
        return list(groups.values())

    def points_for(self, seeds: list[int]) -> list[dict[str, Any]]:
        """Every group at each of ``seeds`` (a grid space whose grid has a ``seed`` key), group by group: the
        trials that run side by side then have different seeds, so none waits for another computing the
        same seed's warm-start probe point (``grpo_lab/probe/cache.py`` locks it). Seed by seed, every
        seed's second trial waited ~20 s for its first: 11.6 s of probe_start per trial instead of 5.3."""
        return [{**g, "seed": int(s)} for g in self.groups() for s in seeds]

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary stored on the study (the report reads only the study)."""
        return {
            "name": self.name,
            "description": self.description,
            "grid": self.grid,
            "base_config": self.base_config,
            "overrides": self.overrides,
            "presets": self.presets,
            "threshold": self.threshold,
            "baseline": self.baseline,
            "comparisons": None if self.comparisons is None else [
                {"label": c.label, "group": c.group, "baseline": c.baseline, "kind": c.kind}
                for c in self.comparisons],
            "probe": None if self.probe is None else {
                "estimators": self.probe.estimators, "num_batches": self.probe.num_batches,
                "warm_start_batches": self.probe.warm_start_batches,
                "reference_batches": self.probe.reference_batches,
                "prompts_per_batch": self.probe.prompts_per_batch,
                "at_fractions": list(self.probe.at_fractions),
                **({"score_prompts": self.probe.score_prompts} if self.probe.score_prompts else {}),
                # only when set: a stored exact study's settings stay what they were (resumable)
                **({"sketch_dim": self.probe.sketch_dim} if self.probe.sketch_dim else {}),
            },
            "population": self.population,
        }

    def changed_settings(self, stored: dict[str, Any] | None) -> list[str]:
        """The settings in which a study's stored :meth:`describe` differs from this space's: what its trials
        ran with is not what new trials would run with. The grid is left out (a study may gain seeds), and
        so is a key an older grpo_lab did not store."""
        if not stored:
            return []
        now = json.loads(json.dumps(self.describe()))  # as the study stored it: tuples become lists
        return [k for k in SETTINGS_KEYS if k in stored and stored[k] != now[k]]


def _seed_distribution(trial: optuna.Trial) -> optuna.distributions.BaseDistribution:
    """``IntDistribution(0, SEED_MAX)``, or the categorical one a study made by an older grpo_lab stored."""
    for t in trial.study.get_trials(deepcopy=False):
        if "seed" in t.distributions:
            return t.distributions["seed"]
    return optuna.distributions.IntDistribution(0, SEED_MAX)


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
    """Add ``space`` to the registry under ``space.name``. A name is taken once: another space under it raises
    ``ValueError``; the same space again (or an equal one, as a reloaded module re-creates it) replaces it
    (``grpo_lab.system.registry.register``)."""
    return register(SPACES, space.name, space, "space")


def get_space(name: str) -> Space:
    """A registered space by name, or ``package.module:attribute`` (imported, registered if it is a Space)."""
    if name in SPACES:
        return SPACES[name]
    if ":" in name:
        obj = import_object(name, "space")
        if not isinstance(obj, Space):
            raise UserError(f"{name!r} is a {type(obj).__name__}, not an ablations.spaces.space.Space")
        return register_space(obj)
    raise UserError(f"unknown space {name!r}; known: {', '.join(sorted(SPACES))} "
                    "(or give 'module:attribute')")
