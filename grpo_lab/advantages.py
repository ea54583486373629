"""Advantage estimators: rewards ``[P, G]`` -> advantages ``[P, G]``. Pure torch, no trainer state.

The derivation (README, "From reward to advantage"):

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

Departures and choices, each a registered estimator so the ablation can compare them:

- ``mean_baseline`` and ``group_norm`` include r_i in its own baseline; that correlates the baseline with
  the sample and biases the gradient by a factor (G−1)/G (``group_norm``'s division by std also rescales
  it per query). ``rloo`` (leave-one-out) excludes it and is unbiased.
- ``group_norm`` uses Bessel's correction (as TRL and verl do) and adds ``eps`` to the std.
- ``batch_norm`` centres per group but scales by the std of the whole batch (REINFORCE++-style), so easy
  and hard groups keep their relative scale.

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

from grpo_lab.errors import UserError
from grpo_lab.registry import lookup

AdvantageFn = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator: the function and whether it compares completions within a group."""

    fn: AdvantageFn
    needs_group: bool = True


ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str, *, needs_group: bool = True) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards[P, G], eps) -> advantages[P, G]`` under ``name``.

    ``needs_group``: the estimator compares completions within a group, so it needs G >= 2, and a group
    with zero spread gets advantage exactly 0 (applied by :func:`compute_advantages`).
    """

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = Estimator(fn, needs_group)
        return fn

    return decorator


def available_advantages() -> list[str]:
    return sorted(ADVANTAGES)


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``, or the function at the import path ``package.module:function``."""
    return lookup(ADVANTAGES, name, "advantage estimator", wrap=Estimator)


def compute_advantages(rewards: Tensor, estimator: str, eps: float = 1e-6) -> Tensor:
    """Advantages ``[P, G]`` for rewards ``[P, G]`` (P queries, G completions each)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G] (queries x completions), got shape {tuple(rewards.shape)}")
    est = get_estimator(estimator)
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    if not est.needs_group:
        return est.fn(rewards, eps)
    if rewards.shape[1] < 2:
        raise UserError(
            f"advantage estimator {estimator!r} compares completions within a group and needs "
            f"num_generations >= 2, got G={rewards.shape[1]}; raise num_generations or use 'reward'"
        )
    adv = est.fn(rewards, eps)  # [P, G]
    return adv.masked_fill(zero_spread(rewards).unsqueeze(-1), 0.0)


def zero_spread(rewards: Tensor) -> Tensor:
    """``[P]`` bool: groups whose G rewards are all equal (std 0, no learning signal)."""
    return rewards.amax(dim=-1) == rewards.amin(dim=-1)


@register_advantage("reward", needs_group=False)
def reward(rewards: Tensor, eps: float) -> Tensor:
    """A = r: plain REINFORCE on the raw reward (the seed's starting point)."""
    return rewards


@register_advantage("mean_baseline")
def mean_baseline(rewards: Tensor, eps: float) -> Tensor:
    """A = r − mean_G(r): the group mean as baseline (self-inclusive, biased by (G−1)/G)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@register_advantage("group_norm")
def group_norm(rewards: Tensor, eps: float) -> Tensor:
    """A = (r − mean_G(r)) / (std_G(r) + eps), Bessel-corrected std: GRPO's advantage."""
    mean = rewards.mean(dim=-1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=-1, keepdim=True)  # [P, 1]
    return (rewards - mean) / (std + eps)


@register_advantage("rloo")
def rloo(rewards: Tensor, eps: float) -> Tensor:
    """A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_G(r)): leave-one-out, unbiased."""
    g = rewards.shape[-1]
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)  # [P, G]
    return rewards - others


@register_advantage("batch_norm")
def batch_norm(rewards: Tensor, eps: float) -> Tensor:
    """A = (r − mean_G(r)) / (std over all P·G rewards + eps)."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)
