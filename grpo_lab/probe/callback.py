"""``GradientVarianceProbe``: the probe at fractions of a fit, as a Lightning callback (rank 0 only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from grpo_lab.probe.cache import cache_key, cached, write_json
from grpo_lab.probe.core import (
    DEFAULT_ESTIMATORS,
    DEFAULT_SPLIT,
    NUM_BATCHES,
    PROMPTS_PER_BATCH,
    REFERENCE_ESTIMATOR,
    probe,
)
from grpo_lab.probe.gradients import REFERENCE_AGGREGATION
from grpo_lab.system.errors import UserError

LOGGED = ("snr", "cosine", "relative_variance", "snr_ratio", "hard_share")


class GradientVarianceProbe(L.Callback):
    """Probe the estimators' gradient statistics at fractions of a fit (rank 0 only).

    Fraction 0 runs in ``on_train_start``, fractions strictly between 0 and 1 at the first training batch
    whose ``global_step`` reaches ``fraction × max_steps`` (or the estimated number of steps when
    ``max_steps`` is unset), and fraction 1 in ``on_train_end``. Each probe appends rows
    ``{"step", "fraction", "estimator", "cached", **stats}`` (``grpo_lab.probe.probe``) to :attr:`results`,
    logs ``probe/<stat>_<est>`` for ``snr``, ``cosine``, ``relative_variance``, ``snr_ratio`` and
    ``hard_share`` (finite values) to the trainer's loggers, and rewrites ``probe.json`` in
    ``trainer.log_dir``. The probe forks the RNG, so the fit samples the same completions with or without
    it. With ``cache_dir`` a probe point whose policy, settings and queries were probed before (the warm
    start, by another trial of the same seed) is read back instead of computed (``cache.py``).
    """

    def __init__(
        self,
        estimators: Sequence[str] = DEFAULT_ESTIMATORS,
        num_batches: int = NUM_BATCHES,
        warm_start_batches: int | None = None,
        reference_batches: int = 0,
        prompts_per_batch: int = PROMPTS_PER_BATCH,
        at_fractions: Sequence[float] = (0.0, 0.5, 1.0),
        seed: int = 0,
        reference_estimator: str = REFERENCE_ESTIMATOR,
        split_column: str | None = DEFAULT_SPLIT[0],
        split_value: str = DEFAULT_SPLIT[1],
        cache_dir: str | None = None,
        n_resamples: int = 2000,
        score_prompts: int = 0,
        sketch_dim: int = 0,
    ) -> None:
        """
        Args:
            estimators: advantage estimators to compare (registry names); SNR ratios are to the first.
            num_batches: K, independent rollout batches per probe.
            warm_start_batches: K at fraction 0 (None: ``num_batches``). The fit's first policy is the
                same for every run from one warm start, so a study can afford more batches there.
            reference_batches: further batches used only for the reference gradient (0: the K batches).
            prompts_per_batch: queries per probe batch (each gets the module's G completions).
            at_fractions: when to probe, as fractions of the fit's steps in [0, 1].
            seed: seed of the probe's queries and samples (the same at every probe).
            reference_estimator: unbiased estimator of the reference ∇J (``rloo`` or ``reward``), with
                ``constant`` aggregation.
            split_column: query column to split each gradient by (None: no split), e.g. ``difficulty``.
            split_value: the column's value whose share is reported (``hard``).
            cache_dir: directory of computed probe points, shared by the trials of a study (None: none).
            n_resamples: bootstrap resamples, for ``snr_intervals(method="bca")`` only: the probe's
                intervals are the delta method's (``intervals.py``), which draws none.
            score_prompts: at the warm start, per-completion scores on this many queries for the
                baseline map's mechanism (``grpo_lab/probe/scores.py``; 0: none).
            sketch_dim: d > 0 keeps each gradient as a d-dim CountSketch computed on the model's device
                (``grpo_lab/probe/sketch.py``: unbiased dot products, relative error about √(2/d)), so
                K batches of a 100M+ model fit in memory; 0: the exact probe (float32 rows of every
                parameter on the CPU).
        """
        if any(not 0.0 <= f <= 1.0 for f in at_fractions):
            raise UserError(f"at_fractions must lie in [0, 1], got {list(at_fractions)}")
        if (num_batches < 2 or (warm_start_batches is not None and warm_start_batches < 2)
                or reference_batches < 0 or prompts_per_batch < 1):
            raise UserError("need num_batches >= 2, warm_start_batches >= 2 (or None), "
                            "reference_batches >= 0 and prompts_per_batch >= 1")
        if sketch_dim < 0:
            raise UserError(f"sketch_dim must be >= 0 (0: the exact probe), got {sketch_dim}")
        self.estimators = list(estimators)
        self.num_batches = num_batches
        self.warm_start_batches = num_batches if warm_start_batches is None else warm_start_batches
        self.reference_batches = reference_batches
        self.prompts_per_batch = prompts_per_batch
        self.at_fractions = sorted(set(float(f) for f in at_fractions))
        self.seed = seed
        self.reference_estimator = reference_estimator
        self.split = None if split_column is None else (split_column, split_value)
        self.cache_dir = cache_dir
        self.n_resamples = n_resamples
        self.score_prompts = score_prompts
        self._score_now = 0  # score_prompts while the warm start is probed (_maybe_probe)
        self.sketch_dim = sketch_dim
        self.results: list[dict] = []
        self._done: set[float] = set()

    # -- hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._maybe_probe(trainer, pl_module, [f for f in self.at_fractions if f == 0.0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        middle = [f for f in self.at_fractions if 0.0 < f < 1.0 and f not in self._done]
        if not middle:
            return
        total = self._total_steps(trainer)
        if total is None:
            return
        self._maybe_probe(trainer, pl_module, [f for f in middle if trainer.global_step >= f * total])

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe_probe(trainer, pl_module, [f for f in self.at_fractions if f == 1.0])

    def state_dict(self) -> dict:
        return {"results": self.results, "done": sorted(self._done)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = list(state_dict.get("results", []))
        self._done = set(state_dict.get("done", []))

    # -- work
    def settings(self, prompts_per_batch: int, num_batches: int | None = None) -> dict:
        """What the probe's numbers depend on besides the module and the queries (the cache key's part)."""
        return {"estimators": self.estimators, "num_batches": num_batches or self.num_batches,
                "reference_batches": self.reference_batches, "prompts_per_batch": prompts_per_batch,
                "seed": self.seed, "reference": f"{self.reference_estimator}/{REFERENCE_AGGREGATION}",
                "split": list(self.split) if self.split else None, "n_resamples": self.n_resamples,
                **({"sketch_dim": self.sketch_dim} if self.sketch_dim else {})}  # exact: keys as before

    def _total_steps(self, trainer) -> float | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return float(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("GradientVarianceProbe: the fit has no finite length; middle fractions are "
                           "skipped")
            return None
        return float(total)

    def _maybe_probe(self, trainer, pl_module, fractions: list[float]) -> None:
        fractions = [f for f in fractions if f not in self._done]
        if not fractions:
            return
        self._done.update(fractions)
        if not trainer.is_global_zero:
            return
        dm = getattr(trainer, "datamodule", None)
        queries = getattr(dm, "train_set", None)
        if not queries:
            rank_zero_warn("GradientVarianceProbe: the trainer has no datamodule with a train_set; not "
                           "probing")
            return
        k = self.warm_start_batches if fractions == [0.0] else self.num_batches
        self._score_now = self.score_prompts if fractions == [0.0] else 0
        stats, hit = self.measure(pl_module, queries, k)
        step = int(trainer.global_step)
        for f in fractions:
            for name, s in stats.items():
                self.results.append({"step": step, "fraction": f, "estimator": name, "cached": hit, **s})
        metrics = {f"probe/{key}_{name}": float(s[key]) for name, s in stats.items() for key in LOGGED
                   if s.get(key) is not None and math.isfinite(s[key])}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.log_dir:
            write_json(Path(trainer.log_dir) / "probe.json", self._report())

    def measure(self, pl_module, queries: list[dict],
                num_batches: int | None = None) -> tuple[dict[str, dict], bool]:
        """``(stats, from_cache)`` at the module's current parameters, from ``num_batches`` batches (None:
        ``self.num_batches``)."""
        ppb = min(self.prompts_per_batch, len(queries))
        k = num_batches or self.num_batches
        settings = self.settings(ppb, k)
        score_prompts = self._score_now
        if score_prompts:  # a point with the mechanism is another cache entry
            settings["score_prompts"] = score_prompts

        def compute() -> dict:
            return probe(pl_module, queries, self.estimators, k, self.reference_batches, ppb,
                         self.seed, reference_estimator=self.reference_estimator, split=self.split,
                         score_prompts=score_prompts,
                         n_resamples=self.n_resamples, sketch_dim=self.sketch_dim)

        key = cache_key(pl_module, queries, settings) if self.cache_dir else ""
        return cached(self.cache_dir, key, compute)

    def _report(self) -> dict:
        return {"config": {**self.settings(self.prompts_per_batch), "at_fractions": self.at_fractions,
                           "warm_start_batches": self.warm_start_batches},
                "results": self.results}
