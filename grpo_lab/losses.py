"""The GRPO policy loss: clipped importance ratio, KL to a reference, aggregation. Pure torch.

From REINFORCE to GRPO (README, "The derivation"):

- REINFORCE's gradient ∇J = E[∇log π_θ(o|q) · A] can be written with the identity trick as the gradient
  of E[(π_θ / π_θ.detach()) · A]: the ratio is 1 in value but carries ∇log π_θ. Replace the detached copy
  by the policy that *sampled* the batch, π_old, and the same batch can serve several optimizer updates
  (``num_iterations`` > 1) as an importance-weighted estimate. With μ = 1, π_old is π_θ itself, ratio = 1,
  and the loss below has exactly the REINFORCE gradient −A·∇log π (tested with autograd).
- PPO's clip keeps π_θ near π_old: per token, −min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A). Where the
  clipped branch wins (ratio above 1+ε_high with A>0, or below 1−ε_low with A<0) the gradient is zero.
  ε_low ≠ ε_high is allowed (DAPO's "clip-higher").
- A KL penalty β·KL(π_θ‖π_ref) keeps the policy near a frozen reference, estimated per token from the
  sampled token's log-probabilities (Schulman's k1/k2/k3; k3 is GRPO's: unbiased and always ≥ 0).
- Aggregation of the per-token loss ``[B, T]`` into a scalar: ``sequence_mean`` is the original GRPO
  (mean over tokens of each completion, then over completions; long completions get less weight per
  token), ``token_mean`` (DAPO, TRL's default, and ours) weights every token equally, ``constant``
  (Dr. GRPO) divides by a fixed B·T so the loss scale does not depend on the lengths sampled.

Log-probabilities are per token of the *sampled* completion; the sequence log-probability is their sum,
so the per-token form is the token-level factorisation of the sequence objective (as in all GRPO code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grpo_lab.registry import lookup, registrar

KLFn = Callable[[Tensor, Tensor], Tensor]
AggregateFn = Callable[[Tensor, Tensor, "float | Tensor | None"], Tensor]

KL_ESTIMATORS: dict[str, KLFn] = {}
AGGREGATIONS: dict[str, AggregateFn] = {}


# ``@register_kl("name")``: fn(logprobs[B, T], ref_logprobs[B, T]) -> kl[B, T]
register_kl = registrar(KL_ESTIMATORS)
# ``@register_aggregation("name")``: fn(loss[B, T], mask[B, T], normalizer) -> scalar
register_aggregation = registrar(AGGREGATIONS)


@register_kl("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """log π − log π_ref: unbiased, can be negative per sample."""
    return logprobs - ref_logprobs


@register_kl("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """½ (log π − log π_ref)²: low variance, biased, ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """exp(ref − logp) − (ref − logp) − 1: unbiased and ≥ 0 (GRPO's choice)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(π‖π_ref) estimate ``[B, T]`` from the sampled tokens' log-probabilities."""
    return lookup(KL_ESTIMATORS, estimator, "KL estimator")(logprobs, ref_logprobs)


def get_aggregation(name: str) -> AggregateFn:
    """The aggregation registered as ``name`` or the function at the import path ``package.module:function``."""
    return lookup(AGGREGATIONS, name, "aggregation")


@register_aggregation("token_mean")
def token_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Σ(loss·mask) / Σmask over the whole batch (``normalizer`` overrides Σmask, e.g. a global count)."""
    denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (loss * mask).sum() / denom


@register_aggregation("sequence_mean")
def sequence_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """mean_b (Σ_t loss·mask / Σ_t mask): the original GRPO (an empty completion contributes 0).
    ``normalizer`` overrides the number of sequences B."""
    per_seq = (loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # [B]
    return per_seq.sum() / (per_seq.numel() if normalizer is None else normalizer)


@register_aggregation("constant")
def constant(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Σ(loss·mask) / (B·T): Dr. GRPO's length-independent normalizer (``normalizer`` overrides B·T)."""
    denom = mask.numel() if normalizer is None else normalizer
    return (loss * mask).sum() / denom


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO loss and its diagnostics.

    Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask`` are ``[B, T]`` (B = P·G completions,
    T completion tokens; mask 1 on real tokens including EOS); ``advantages`` is ``[B]``.
    Returns ``(loss, stats)`` with stats ``clip_fraction``, ``ratio_mean`` and (given a reference) ``kl``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one [B, T] shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got shape {tuple(advantages.shape)}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if beta < 0.0:
        raise ValueError(f"beta (KL coefficient) must be >= 0, got {beta}")
    aggregate = get_aggregation(aggregation)
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # [B, 1]

    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]; = 1 with a gradient when old is detached
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]

    n_tokens = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        active = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
        stats = {
            "clip_fraction": (active.to(mask.dtype) * mask).sum() / n_tokens,
            "ratio_mean": (ratio * mask).sum() / n_tokens,
        }
    if ref_logprobs is not None:
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs must be {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)  # [B, T]
        stats["kl"] = ((kl * mask).sum() / n_tokens).detach()
        if beta > 0.0:
            per_token = per_token + beta * kl
    else:
        lookup(KL_ESTIMATORS, kl_estimator, "KL estimator")  # a bad name fails even when unused
    return aggregate(per_token, mask, normalizer), stats
