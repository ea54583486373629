"""The probe: K independent rollout batches at fixed parameters, every estimator on the same rollouts.

1. draw K independent batches (fresh queries, fresh samples) from the current policy;
2. on each batch compute every estimator's gradient on the *same* rollout (a paired comparison: the
   differences between estimators are not drowned in the batch-to-batch noise they share), its part from
   hard queries, and the reference estimator's (``rloo`` with ``constant`` aggregation: unbiased for ∇J);
3. summarize with the Gram-matrix statistics of ``stats.py``: SNR with a 95% interval over the K
   batches (``intervals.py``: the delta method with the U-statistics' unbiased variance), the paired SNR
   ratio to the first estimator with its interval, the cosine of each estimator's expected gradient with
   the reference's, and the hard queries' share of the gradient.

The reference is estimated from the same K batches (U-statistics over pairs of different batches, so the
shared rollout does not inflate the cosine): one more backward pass per batch, where the probe used to
spend 64 further rollout batches on it. ``reference_batches`` R > 0 still adds R reference-only batches.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence

import torch

from grpo_lab.advantages import CLASSIC_ESTIMATORS
from grpo_lab.probe.baseline_map import PAIR as BASELINE_PAIR
from grpo_lab.probe.baseline_map import cross_gram, point_map
from grpo_lab.probe.gradients import batch_gradients
from grpo_lab.probe.gram_stats import GramAccumulator, snr_intervals
from grpo_lab.probe.scores import completion_scores
from grpo_lab.probe.sketch import CountSketch
from grpo_lab.system.errors import UserError
from grpo_lab.system.rng import seeded

DEFAULT_ESTIMATORS: tuple[str, ...] = CLASSIC_ESTIMATORS
REFERENCE_ESTIMATOR = "rloo"
ORACLE = "oracle_p"  # the oracle baseline b = p̂_q (``gradients.success_rate``): a reference arm of the map
DEFAULT_SPLIT = ("difficulty", "hard")
# ablations.spaces.space.ProbeSettings says the same (docs/ablations.md, "The probe's precision")
NUM_BATCHES = 64
PROMPTS_PER_BATCH = 8


@contextlib.contextmanager
def frozen(module, seed: int) -> Iterator[None]:
    """Fixed parameters, training mode, seeded sampling; RNG and module modes restored afterwards."""
    model = module.model
    params = list(model.parameters())
    versions = [p._version for p in params]  # any in-place update (an optimizer step) bumps these
    modes = [(m, m.training) for m in model.modules()]
    device = next(iter(params)).device if params else torch.device("cpu")
    with seeded(seed, device):
        model.train()  # the mode training gradients are taken in
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
    if [p._version for p in model.parameters()] != versions:
        raise RuntimeError("the gradient probe must not change the policy's parameters, but they were "
                           "modified")


def _batches(queries: list[dict], n: int, size: int, gen: torch.Generator) -> Iterator[list[dict]]:
    for _ in range(n):
        yield [queries[i] for i in torch.randperm(len(queries), generator=gen)[:size].tolist()]


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty())


def probe(
    module,
    queries: list[dict],
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    num_batches: int = NUM_BATCHES,
    reference_batches: int = 0,
    prompts_per_batch: int = PROMPTS_PER_BATCH,
    seed: int = 0,
    progress: bool = False,
    reference_estimator: str | None = REFERENCE_ESTIMATOR,
    split: tuple[str, object] | None = DEFAULT_SPLIT,
    n_resamples: int = 2000,
    score_prompts: int = 0,
    sketch_dim: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Gradient statistics of each estimator at the module's current parameters.

    Draws ``num_batches`` (K) independent batches of ``prompts_per_batch`` queries (without replacement
    within a batch, from a ``torch.Generator`` seeded with ``seed``) and G fresh completions each. Returns
    ``{estimator: {...}}`` with ``snr`` and its 95% interval ``snr_lo``/``snr_hi`` over the batches
    (the delta method, ``intervals.py``; ``n_resamples`` serves ``stats.snr_intervals(method="bca")`` only),
    ``snr_ratio`` to the first estimator (``ratio_to``) with ``snr_ratio_lo``/``snr_ratio_hi`` (paired:
    the same batches for both), ``variance``, ``signal``, ``mean_norm``, ``relative_variance``,
    ``num_batches``, ``cosine`` and ``reference_snr`` (None without ``reference_estimator``), and
    ``hard_share``/``hard_signal_share`` (None without ``split``, or for queries without the column).
    With ``reward`` and ``rloo`` among the estimators, ``rloo``'s row also carries ``baseline_map``: the
    quadratics V(c), S(c) of the family r_i − c·b̄₋ᵢ with c* and V(1)/V(0) (``baseline_map.point_map``),
    and with ``oracle_p`` too (b = p̂_q from extra samples, ``gradients.success_rate``) its measured
    ``oracle_ratio`` V(oracle)/V(reward).

    ``reference_batches`` R adds R batches on which only the reference is computed (0: the K batches
    serve as the reference too). No optimizer step is taken (checked), ``.grad`` is untouched, the model
    runs in training mode and its modes are restored, and sampling uses a forked torch RNG seeded with
    ``seed``: the global RNG is the same afterwards, so a training run probed along the way samples what it
    would have without it. ``progress`` shows a transient Rich bar on a terminal.

    ``score_prompts`` > 0 (with ``reward`` and ``rloo`` among the estimators) also measures per-completion
    scores on one rollout of that many queries (``scores.py``) and adds the mechanism's moments and
    predictions to the baseline map (``mechanism.py``): a few seconds at 2-4 queries.

    ``sketch_dim`` d > 0 keeps every gradient as its d-dim CountSketch (``sketch.py``, seeded with ``seed``:
    one projection for all rows), computed on the module's device, instead of a float32 row of all D
    parameters on the CPU: the statistics are then those of the projected gradients, every dot product
    unbiased with a relative error of about √(2/d). 0 (the default) is the exact probe.
    """
    estimators = list(dict.fromkeys(estimators))
    if not estimators:
        raise UserError("estimators must name at least one advantage estimator")
    if num_batches < 2:
        raise UserError(f"num_batches must be >= 2 to estimate a variance, got {num_batches}")
    if reference_batches < 0:
        raise UserError(f"reference_batches must be >= 0, got {reference_batches}")
    if not 1 <= prompts_per_batch <= len(queries):
        raise UserError(f"prompts_per_batch must be in [1, {len(queries)}] (the queries given), got "
                        f"{prompts_per_batch}")
    if sketch_dim < 0:
        raise UserError(f"sketch_dim must be >= 0 (0: the exact probe), got {sketch_dim}")
    sketch = CountSketch(sketch_dim, seed) if sketch_dim else None
    if split is not None and not any(split[0] in q for q in queries):
        split = None  # no such column: nothing to split by
    acc = GramAccumulator(estimators, num_batches)
    gen = torch.Generator().manual_seed(seed)
    total = num_batches + (reference_batches if reference_estimator else 0)
    with frozen(module, seed), _progress(progress) as bar:
        task = bar.add_task("gradient probe", total=total) if bar is not None else None
        for batch in _batches(queries, num_batches, prompts_per_batch, gen):
            g = batch_gradients(module, batch, estimators, reference_estimator, split, sketch=sketch)
            acc.add(g.full, g.hard, g.reference)
            if bar is not None:
                bar.advance(task)
        if reference_estimator:
            for batch in _batches(queries, reference_batches, prompts_per_batch, gen):
                acc.add_reference(batch_gradients(module, batch, [reference_estimator],
                                                  reference_estimator, sketch=sketch).reference)
                if bar is not None:
                    bar.advance(task)
        use = score_prompts > 0 and all(name in estimators for name in BASELINE_PAIR)
        subset = next(_batches(queries, 1, min(score_prompts, len(queries)), gen)) if use else None
        scores = completion_scores(module, subset) if use else None
    stats = acc.statistics()
    intervals = snr_intervals(acc.grams(), estimators[0], n_resamples=n_resamples, seed=seed)
    out = {name: {**s, **intervals[name]} for name, s in stats.items()}
    if all(name in estimators for name in BASELINE_PAIR):  # the baseline family c ↦ r − c·b̄₋ᵢ
        i, j = (estimators.index(name) for name in BASELINE_PAIR)
        cross = cross_gram(acc.store[i, : acc.k], acc.store[j, : acc.k])  # [K, K]
        grams = acc.grams()
        out[BASELINE_PAIR[1]]["baseline_map"] = point_map(grams[BASELINE_PAIR[0]], cross,
                                                          grams[BASELINE_PAIR[1]])
        if ORACLE in out and out[BASELINE_PAIR[0]]["variance"]:  # the oracle b = p̂_q, measured
            out[BASELINE_PAIR[1]]["baseline_map"]["oracle_ratio"] = (out[ORACLE]["variance"]
                                                                     / out[BASELINE_PAIR[0]]["variance"])
        if scores is not None:  # the mechanism, from per-completion scores (mechanism.py)
            bmap = out[BASELINE_PAIR[1]]["baseline_map"]
            bmap["mechanism"] = scores.mechanism(prompts_per_batch, bmap["v"][0])
    return out


def relative_half_width(row: dict) -> float:
    """Half the width of a row's SNR-ratio interval relative to the ratio (NaN when n/a)."""
    lo, hi, ratio = row.get("snr_ratio_lo"), row.get("snr_ratio_hi"), row.get("snr_ratio")
    if lo is None or hi is None or not ratio or not all(map(math.isfinite, (lo, hi, ratio))):
        return math.nan
    return (hi - lo) / 2 / ratio
