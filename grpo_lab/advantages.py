"""Advantage estimators: rewards ``[P, G]`` -> advantages ``[P, G]``. Pure torch, no trainer state.

The derivation (docs/derivation.md, "From reward to advantage"):

1. The surrogate objective is J(θ) = E_{q~p(Q), o~π_θ(·|q)}[R(o)].
2. REINFORCE estimates ∇J = E[∇log π_θ(o|q) · R(o)]: the estimator ``"reward"`` weights each sampled
   completion by its raw reward. Unbiased, but every completion of a 9/10-easy query pushes its
   log-probability up as hard as a 1/10-hard query's rare correct answer does.
3. Any baseline b that does not depend on the completion o keeps the estimate unbiased,
   E[∇log π · (R − b)] = ∇J, and a good one lowers its variance. GRPO samples G completions per query
   and uses the group itself as the baseline: A_i = (r_i − mean(r)) / std(r). A correct answer to a hard
   query (1 of G) gets a large advantage, to an easy one (G−1 of G) a small one.

   These advantages are *not* in [0, 1]: they have zero mean over the group and, for 0/1 rewards with
   the unbiased std, lie within ±(G−1)/√G (one correct answer out of G). A group whose G rewards are all
   equal carries no signal relative to itself: its std is 0 and its advantage is exactly 0, never NaN.

Normalization is two independent choices, as in ROLL: A = (r − b) / s with a **center** b (``CENTERS``:
none, group, leave_one_out, batch, james_stein, gradient_weighted, length_weighted, online_coef; the field's
baselines are in ``baselines.py``) and a **scale** s (``SCALES``: none, group, batch, mean). The named
estimators are presets of the pair (``PRESETS``):

    reward = (none, none)   mean_baseline = (group, none)   group_norm = (group, group)
    rloo = (leave_one_out, none)   batch_norm = (group, batch)   batch_whiten = (batch, batch)
    james_stein = (james_stein, none)   gradient_weighted = (gradient_weighted, none)
    opo = (length_weighted, none)   maxrl = (group, mean)   online_coef = (online_coef, none)

``batch_norm`` is REINFORCE++'s baseline variant (group mean, batch std), ``batch_whiten`` its global one.

and ``compute_advantages(r, "group_norm")`` gives exactly the values it always gave (same operations).

Departures and choices:

- ``group`` (in ``mean_baseline``, ``group_norm``) includes r_i in its own baseline; that correlates the
  baseline with the sample and biases the gradient by (G−1)/G (``group_norm``'s std also rescales it per
  query). ``leave_one_out`` excludes it and is unbiased; so are ``james_stein`` and ``gradient_weighted``,
  whose baselines are built without r_i too.
- The ``group`` scale uses Bessel's correction (as TRL and verl) and adds ``eps`` to the std.
- ``batch`` statistics are over this process's batch (P·G rewards), as verl and TRL do per rank.
- A group whose G rewards are all equal gets advantage exactly 0 when its center is group-relative or its
  scale is per group (the rule ``needs_group``/``flat_is_zero`` of the estimator); a baseline that borrows
  from other groups (``batch``, ``james_stein``) keeps such a group's signal, as in those papers.

Add an estimator without touching the trainer::

    from grpo_lab.advantages import register_advantage

    @register_advantage("median_baseline")
    def median_baseline(rewards, eps):          # [P, G] -> [P, G]
        return rewards - rewards.median(dim=-1, keepdim=True).values

and select it with ``--model.advantage median_baseline`` once the module is imported, or, without any
import, by its path: ``--model.advantage my_pkg.my_estimators:median_baseline`` (a plain function named by
path counts as a group estimator; decorate it to say otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from grpo_lab.baselines import (
    gradient_weighted_baseline,
    james_stein_baseline,
    leave_one_out_mean,
    length_weighted_baseline,
    logit_gradient_energy,
    online_coefficient,
)
from grpo_lab.system.errors import UserError
from grpo_lab.system.registry import lookup, register

AdvantageFn = Callable[..., Tensor]  # fn(rewards[P, G], eps[, weights=[P, G]]) -> advantages[P, G]


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator: the function and how it treats groups.

    ``needs_group``: it compares completions within a group (G >= 2). ``flat_is_zero``: a group whose G
    rewards are equal gets exactly 0 (default: the same as ``needs_group``). ``weights``: ``fn`` takes
    ``weights=[P, G]``, per-completion weights of this kind (``WEIGHTS``: ``logit_energy``, a proxy of
    ‖∇log π(o)‖², see :func:`logit_gradient_energy`; ``length``, the completion's token count), which
    :func:`completion_weights` makes from the rollout's log-probabilities.
    ``center``/``scale``: the pair this estimator is a preset of (None for a free-form estimator).
    """

    fn: AdvantageFn
    needs_group: bool = True
    flat_is_zero: bool | None = None
    weights: str | None = None
    center: str | None = None
    scale: str | None = None

    @property
    def needs_weights(self) -> bool:
        return self.weights is not None

    @property
    def zeroes_flat_groups(self) -> bool:
        return self.needs_group if self.flat_is_zero is None else self.flat_is_zero


ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str, *, needs_group: bool = True) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards[P, G], eps) -> advantages[P, G]`` under ``name``.

    ``needs_group``: the estimator compares completions within a group, so it needs G >= 2, and a group
    with zero spread gets advantage exactly 0 (applied by :func:`compute_advantages`). A taken name raises
    ``ValueError`` (``grpo_lab.system.registry.register``: the same function again replaces it).
    """

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        register(ADVANTAGES, name, Estimator(fn, needs_group), "advantage estimator")
        return fn

    return decorator


def available_advantages() -> list[str]:
    return sorted(ADVANTAGES)


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``, or the function at the import path
    ``package.module:function``."""
    return lookup(ADVANTAGES, name, "advantage estimator", wrap=Estimator)


def compute_advantages(rewards: Tensor, estimator: str | Estimator, eps: float = 1e-6, *,
                       weights: Tensor | None = None) -> Tensor:
    """Advantages ``[P, G]`` for rewards ``[P, G]`` (P queries, G completions each).

    ``estimator``: a name (or import path), or an :class:`Estimator` (e.g. from :func:`resolve_estimator`).
    ``weights`` ``[P, G]``: per-completion weights, needed by estimators with ``weights``
    (:func:`completion_weights`).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G] (queries x completions), got shape {tuple(rewards.shape)}")
    est = get_estimator(estimator) if isinstance(estimator, str) else estimator
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    if est.needs_group and rewards.shape[1] < 2:
        raise UserError(
            f"advantage estimator {estimator!r} compares completions within a group and needs "
            f"num_generations >= 2, got G={rewards.shape[1]}; raise num_generations or use 'reward'"
        )
    if est.needs_weights:
        if weights is None or weights.shape != rewards.shape:
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"advantage estimator {estimator!r} needs weights of shape "
                             f"{tuple(rewards.shape)}, got {got}")
        adv = est.fn(rewards, eps, weights=weights.to(rewards.dtype))
    else:
        adv = est.fn(rewards, eps)  # [P, G]
    if not est.zeroes_flat_groups:
        return adv
    return adv.masked_fill(zero_spread(rewards).unsqueeze(-1), 0.0)


def zero_spread(rewards: Tensor) -> Tensor:
    """``[P]`` bool: groups whose G rewards are all equal (std 0, no learning signal)."""
    return rewards.amax(dim=-1) == rewards.amin(dim=-1)


# ---- centers: the baseline b ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Center:
    """A baseline: ``fn(rewards[P, G], weights[P, G] | None) -> b`` (broadcastable to [P, G]) or None
    (no baseline). ``group_relative``: b comes from the query's own group only (a flat group gets 0);
    ``needs_group``: it uses the other completions of the group (G >= 2)."""

    fn: Callable[[Tensor, Tensor | None], Tensor | None]
    group_relative: bool
    needs_group: bool
    weights: str | None = None  # the kind of per-completion weights fn needs (``WEIGHTS``)


def _no_center(rewards: Tensor, weights: Tensor | None) -> None:
    return None


def _group_mean(rewards: Tensor, weights: Tensor | None) -> Tensor:
    """b = mean_G(r) ``[P, 1]`` (self-inclusive)."""
    return rewards.mean(dim=-1, keepdim=True)


def _leave_one_out(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return leave_one_out_mean(rewards)


def _batch_mean(rewards: Tensor, weights: Tensor | None) -> Tensor:
    """b = mean of all P·G rewards (a scalar): REINFORCE++'s global baseline."""
    return rewards.mean()


def _james_stein(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return james_stein_baseline(rewards)


def _gradient_weighted(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return gradient_weighted_baseline(rewards, weights)


def _length_weighted(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return length_weighted_baseline(rewards, weights)


def _given(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return weights


def _online_coef(rewards: Tensor, weights: Tensor | None) -> Tensor:
    return online_coefficient(rewards, weights) * leave_one_out_mean(rewards)


def completion_weights(estimator: Estimator, logprobs: Tensor, mask: Tensor) -> Tensor | None:
    """The per-completion weights ``[B]`` an estimator needs (None when it needs none), from a rollout's
    sampled-token log-probabilities ``logprobs`` and ``mask`` ``[B, T]``: ``logit_energy`` (a proxy of
    ‖∇log π(o)‖², :func:`logit_gradient_energy`) or ``length`` (the completion's token count)."""
    if estimator.weights is None:
        return None
    if estimator.weights == "length":
        return mask.to(logprobs.dtype).sum(dim=-1)
    if estimator.weights == "logit_energy":
        return logit_gradient_energy(logprobs, mask)
    if estimator.weights == "success_rate":
        raise UserError("the oracle baseline (oracle_p) needs each query's success rate from extra samples: "
                        "it is a reference arm of the gradient probe, not a trainable estimator")
    raise ValueError(f"unknown weights {estimator.weights!r}: one of {WEIGHTS}")


WEIGHTS = ("logit_energy", "length", "success_rate")


def rollout_advantages(rewards: Tensor, estimator: str | Estimator, logprobs: Tensor, mask: Tensor,
                       success_rate: Tensor | None = None) -> Tensor:
    """Advantages ``[B]`` of one rollout, rewards ``[P, G]``: a weighted baseline gets its weights from the
    rollout's own sampled-token ``logprobs`` and ``mask`` ``[B, T]`` (:func:`completion_weights`), the
    oracle ``oracle_p`` each query's ``success_rate`` ``[P, 1]`` from samples apart from the group (the
    gradient probe draws them). Training and the probe both call this, so they weigh alike."""
    est = get_estimator(estimator) if isinstance(estimator, str) else estimator
    if est.weights == "success_rate" and success_rate is not None:
        weights = success_rate.expand_as(rewards)
    else:
        w = completion_weights(est, logprobs, mask)  # [B] or None (raises for the oracle without rates)
        weights = None if w is None else w.view_as(rewards)
    return compute_advantages(rewards, estimator, weights=weights).flatten()


CENTERS: dict[str, Center] = {
    "none": Center(_no_center, group_relative=False, needs_group=False),
    "group": Center(_group_mean, group_relative=True, needs_group=True),
    "leave_one_out": Center(_leave_one_out, group_relative=True, needs_group=True),
    "batch": Center(_batch_mean, group_relative=False, needs_group=False),
    "james_stein": Center(_james_stein, group_relative=False, needs_group=True),
    "gradient_weighted": Center(_gradient_weighted, group_relative=True, needs_group=True,
                                weights="logit_energy"),
    "length_weighted": Center(_length_weighted, group_relative=True, needs_group=True, weights="length"),
    "online_coef": Center(_online_coef, group_relative=False, needs_group=True, weights="logit_energy"),
    # b = p̂_q, each query's success rate from samples other than the group's (the probe draws them):
    # the oracle reference arm of the baseline map, unbiased, not trainable
    "oracle": Center(_given, group_relative=False, needs_group=False, weights="success_rate"),
}


# ---- scales: the divisor s -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """A divisor: ``fn(centred[P, G], rewards[P, G], eps) -> advantages``. ``per_group``: s is per group."""

    fn: Callable[[Tensor, Tensor, float], Tensor]
    per_group: bool


def _no_scale(centred: Tensor, rewards: Tensor, eps: float) -> Tensor:
    return centred


def _group_std(centred: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """÷ (std_G(r) + eps), Bessel-corrected: GRPO's scale."""
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)  # [P, 1] broadcast


def _group_mean_scale(centred: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """÷ (mean_G(r) + eps): MaxRL's scale (Tajwar et al. 2026, "Maximum likelihood RL"; the issue names
    it TRL's ``scale_rewards="mean"``). With 0/1 rewards Σ_i r_i ∇log π(o_i) / (G·p̂) estimates
    ∇p / p = ∇log p, the gradient of the log-likelihood of success, so a hard query (small p) gets a
    large step. A group of failures is flat (0, never NaN)."""
    return centred / (rewards.mean(dim=-1, keepdim=True) + eps)  # [P, 1] broadcast


def _batch_std(centred: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """÷ (std over all P·G rewards + eps): REINFORCE++'s scale, keeps easy and hard groups' relative size."""
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


SCALES: dict[str, Scale] = {
    "none": Scale(_no_scale, per_group=False),
    "group": Scale(_group_std, per_group=True),
    "batch": Scale(_batch_std, per_group=False),
    "mean": Scale(_group_mean_scale, per_group=True),
}


def normalized(center: str, scale: str) -> Estimator:
    """The estimator A = (r − b) / s for a center and a scale by name (a ``ValueError`` lists known ones)."""
    c, s = lookup(CENTERS, center, "advantage center"), lookup(SCALES, scale, "advantage scale")

    def fn(rewards: Tensor, eps: float, weights: Tensor | None = None) -> Tensor:
        b = c.fn(rewards, weights)
        return s.fn(rewards if b is None else rewards - b, rewards, eps)

    fn.__name__ = f"{center}_{scale}"
    return Estimator(fn, needs_group=c.needs_group or s.per_group,
                     flat_is_zero=c.group_relative or s.per_group, weights=c.weights,
                     center=center, scale=scale)


PRESETS: dict[str, tuple[str, str]] = {
    "reward": ("none", "none"),  # plain REINFORCE on the raw reward
    "mean_baseline": ("group", "none"),  # Dr. GRPO
    "group_norm": ("group", "group"),  # GRPO
    "rloo": ("leave_one_out", "none"),
    "batch_norm": ("group", "batch"),
    "batch_whiten": ("batch", "batch"),  # REINFORCE++
    "james_stein": ("james_stein", "none"),
    "gradient_weighted": ("gradient_weighted", "none"),  # optimal-token baseline, per sequence
    "opo": ("length_weighted", "none"),  # OPO
    "maxrl": ("group", "mean"),  # MaxRL
    "online_coef": ("online_coef", "none"),  # r − ĉ·b̄₋ᵢ, ĉ the batch's variance-optimal c
    "oracle_p": ("oracle", "none"),  # r − p̂_q: the probe's oracle reference arm
}
ADVANTAGES.update({name: normalized(*pair) for name, pair in PRESETS.items()})

def baseline_coef_estimator(coef: float) -> Estimator:
    """A_i = r_i − c·b̄₋ᵢ with b̄₋ᵢ the leave-one-out mean: the baseline family of the probe's baseline map
    (``grpo_lab/probe/baseline_map.py``). c = 0 is ``reward``, c = 1 is ``rloo``; unbiased for every c (b̄₋ᵢ
    never depends on o_i). A flat group keeps (1 − c)·r (not zeroed), so the advantages, and the gradient,
    are linear in c as the map assumes; at c = 1 that is 0, as ``rloo`` gives."""

    def fn(rewards: Tensor, eps: float) -> Tensor:  # [P, G] -> [P, G]
        return rewards - coef * _leave_one_out(rewards, None)

    fn.__name__ = f"baseline_coef_{coef:g}"
    return Estimator(fn, needs_group=True, flat_is_zero=False)


ADVANTAGES["baseline_coef"] = baseline_coef_estimator(1.0)  # its c: RLConfig.baseline_coef
CLASSIC_ESTIMATORS: tuple[str, ...] = ("reward", "mean_baseline", "group_norm", "rloo")
"""REINFORCE, its group-mean baseline, GRPO's normalization and RLOO: the four the default study and the
gradient probe compare (the first is the baseline of their ratios)."""


def resolve_estimator(advantage: str, center: str | None = None, scale: str | None = None,
                      baseline_coef: float = 1.0) -> Estimator:
    """``advantage`` with its center and/or scale replaced: ``("group_norm", scale="none")`` is
    ``mean_baseline``. Only presets of a pair can be modified (a free-form estimator has no halves).
    ``baseline_coef`` is the c of the ``baseline_coef`` estimator (ignored by the others)."""
    if advantage == "baseline_coef" and center is None and scale is None:
        return baseline_coef_estimator(baseline_coef)
    est = get_estimator(advantage)
    if center is None and scale is None:
        return est
    if est.center is None:
        raise UserError(
            f"advantage {advantage!r} is not a center/scale preset, so advantage_center/advantage_scale "
            f"cannot modify it; use one of {', '.join(sorted(PRESETS))}"
        )
    return normalized(center or est.center, scale or est.scale)
