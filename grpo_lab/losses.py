"""The GRPO policy loss and its variants: importance ratio, objective, KL, entropy, aggregation. Pure torch.

From REINFORCE to GRPO (docs/derivation.md):

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
  (Dr. GRPO) divides by a fixed B·T so the loss scale does not depend on the lengths sampled. Each one's
  denominator (the normalizer) is :func:`aggregation_normalizer`, the one rule the module and the probe use.

The field's variants, each a field of :class:`LossSettings` (the default is textbook token-level GRPO):

- ``importance_level="sequence"`` (GSPO, arXiv 2507.18071): one ratio per completion, the geometric mean
  of its token ratios, s_i = exp(Σ_t m·(log π − log π_old) / Σ_t m), clipped and broadcast to its tokens.
  ∇s_i = s_i · mean_t ∇log π_t, so at μ = 1 (s_i = 1) the gradient equals the token-level one.
- ``objective="cispo"`` (MiniMax-M1, arXiv 2506.13585): per token −sg(clip(ratio, 1−ε_low, 1+ε_high))·A·log π.
  The clip bounds the importance *weight*, never the gradient: every token keeps −w·A·∇log π; at μ = 1
  (w = 1) that is REINFORCE's gradient.
- ``dual_clip=c`` (dual-clip PPO, arXiv 1912.09729; verl ``clip_ratio_c``): for A < 0 the per-token loss is
  min(clipped loss, −c·A), so a token whose ratio exploded (ratio > c) stops pushing (gradient 0).
- ``entropy_coef`` adds −coef·H_t per token (an entropy bonus, aggregated like the policy term), and
  ``top_entropy_quantile=ρ`` < 1 keeps in the policy term only the tokens whose entropy is in the top ρ of
  the batch (arXiv 2506.01939, "80/20": ρ = 0.2); the normalizer still counts every token, as in TRL.

Log-probabilities are per token of the *sampled* completion; the sequence log-probability is their sum,
so the per-token form is the token-level factorisation of the sequence objective (as in all GRPO code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo_lab.system.errors import UserError
from grpo_lab.system.registry import lookup, registrar

KLFn = Callable[[Tensor, Tensor], Tensor]
AggregateFn = Callable[[Tensor, Tensor, "float | Tensor | None"], Tensor]
RatioFn = Callable[[Tensor, Tensor, Tensor], Tensor]
ObjectiveFn = Callable[..., "tuple[Tensor, Tensor]"]

KL_ESTIMATORS: dict[str, KLFn] = {}
AGGREGATIONS: dict[str, AggregateFn] = {}
IMPORTANCE_LEVELS: dict[str, RatioFn] = {}
OBJECTIVES: dict[str, ObjectiveFn] = {}


# ``@register_kl("name")``: fn(logprobs[B, T], ref_logprobs[B, T]) -> kl[B, T]
register_kl = registrar(KL_ESTIMATORS, "KL estimator")
# ``@register_aggregation("name")``: fn(loss[B, T], mask[B, T], normalizer) -> scalar
register_aggregation = registrar(AGGREGATIONS, "aggregation")
# ``@register_importance_level("name")``: fn(logprobs[B, T], old_logprobs[B, T], mask[B, T]) -> ratio[B, T|1]
register_importance_level = registrar(IMPORTANCE_LEVELS, "importance level")
# ``@register_objective("name")``: fn(ratio, logprobs, adv[B, 1], *, clip_low, clip_high, dual_clip)
#   -> (per-token loss [B, T], clipped [B, T] bool)
register_objective = registrar(OBJECTIVES, "objective")


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


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k1 per completion ``[B]``: Σ_t mask·(log π − log π_ref) = log π(o)/π_ref(o), an unbiased estimate of
    the sequence KL (verl's ``use_kl_in_reward`` with ``kl_penalty=kl``). As a reward it carries no gradient,
    so k1's unbiasedness is what matters (k3's positivity matters for a loss)."""
    return ((logprobs - ref_logprobs) * mask.to(logprobs.dtype)).sum(dim=-1)


def get_aggregation(name: str) -> AggregateFn:
    """The aggregation registered as ``name`` or the function at the import path
    ``package.module:function``."""
    return lookup(AGGREGATIONS, name, "aggregation")


def aggregation_normalizer(aggregation: str, mask: Tensor, max_new_tokens: int | None = None, *,
                           total: Callable[[Tensor], Tensor] | None = None, world: int = 1) -> Tensor:
    """The denominator of ``aggregation`` (a float scalar) for a batch with completion mask ``mask`` [B, T].

    ``token_mean``: the real tokens Σmask; ``sequence_mean`` (and an aggregation named by import path): the
    sequences B; ``constant``: B·``max_new_tokens`` (Dr. GRPO's B·L, L the generation budget; default the
    padded width T). Under DDP each process holds part of the batch and the gradients are averaged over the
    N processes: ``total`` sums the count over them (``distributed.sum_over_processes``) and ``world`` = N
    divides it back, so 1 process, N processes and micro-batches of one batch all divide by the same number.
    """
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    if aggregation == "token_mean":
        count = mask.sum().to(dtype)
    else:
        count = torch.tensor(float(mask.shape[0]), dtype=dtype, device=mask.device)
    count = (count if total is None else total(count)).clamp(min=1.0) / world
    if aggregation == "constant":
        return count * (mask.shape[-1] if max_new_tokens is None else max_new_tokens)
    return count


@register_aggregation("token_mean")
def token_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Σ(loss·mask) / Σmask over the whole batch (``normalizer`` overrides Σmask, e.g. a global count)."""
    denom = aggregation_normalizer("token_mean", mask) if normalizer is None else normalizer
    return (loss * mask).sum() / denom


@register_aggregation("sequence_mean")
def sequence_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """mean_b (Σ_t loss·mask / Σ_t mask): the original GRPO (an empty completion contributes 0).
    ``normalizer`` overrides the number of sequences B."""
    per_seq = (loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # [B]
    return per_seq.sum() / (aggregation_normalizer("sequence_mean", mask) if normalizer is None
                            else normalizer)


@register_aggregation("constant")
def constant(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Σ(loss·mask) / (B·T): Dr. GRPO's length-independent normalizer (``normalizer`` overrides B·T)."""
    denom = aggregation_normalizer("constant", mask) if normalizer is None else normalizer
    return (loss * mask).sum() / denom


@register_importance_level("token")
def token_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """π_θ(o_t)/π_old(o_t) per token ``[B, T]``; = 1 with a gradient when old is the detached logprobs."""
    return torch.exp(logprobs - old_logprobs)


@register_importance_level("sequence")
def sequence_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's s_i = exp(Σ_t m·(log π − log π_old) / Σ_t m) ``[B, 1]`` (broadcast over the tokens)."""
    log_s = ((logprobs - old_logprobs) * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # [B]
    return torch.exp(log_s).unsqueeze(-1)


@register_objective("clip")
def clipped_objective(ratio: Tensor, logprobs: Tensor, adv: Tensor, *, clip_low: float, clip_high: float,
                      dual_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO/GRPO: −min(ratio·A, clip(ratio)·A); with ``dual_clip`` c, min(that, −c·A) where A < 0."""
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T] (or [B, 1] for a sequence ratio)
    with torch.no_grad():
        active = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
    if dual_clip is not None:
        floor = -dual_clip * adv  # the loss of a negative-advantage token never exceeds −c·A
        per_token = torch.where(adv < 0, torch.minimum(per_token, floor), per_token)
        with torch.no_grad():
            active = active | ((adv < 0) & (ratio > dual_clip))
    return per_token, active


@register_objective("cispo")
def cispo_objective(ratio: Tensor, logprobs: Tensor, adv: Tensor, *, clip_low: float, clip_high: float,
                    dual_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """CISPO: −sg(clip(ratio, 1−ε_low, 1+ε_high))·A·log π; its gradient is −w·A·∇log π for every token."""
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    with torch.no_grad():
        active = (ratio > 1.0 + clip_high) | (ratio < 1.0 - clip_low)
    return -weight * adv * logprobs, active


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """``[B, T]`` bool: real tokens whose entropy is at least the (1 − ``quantile``) quantile of the real
    tokens' entropies (torch.quantile, linear interpolation): the top ``quantile`` share by entropy."""
    real = mask.bool()
    values = entropy.detach()[real].float()
    if values.numel() == 0:
        return torch.zeros_like(real)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy.detach() >= threshold.to(entropy.dtype)) & real


@dataclass(frozen=True)
class LossSettings:
    """What :func:`policy_loss` is configured with, apart from the batch it is given: the ``RLConfig`` fields
    of the same names (``RLConfig.loss_settings()``). The defaults are textbook token-level GRPO. Checked
    when built, so a bad value fails once, where the settings are made, not at every step; frozen, so what
    was checked is what the loss reads. The registry names (``objective``, ``importance_level``,
    ``kl_estimator``, ``aggregation``) are looked up by the loss, which raises on an unknown one."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    objective: str = "clip"
    importance_level: str = "token"
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0

    def __post_init__(self) -> None:
        """``UserError`` (a ``ValueError``) naming the first bad value."""
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise UserError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={self.clip_low}, "
                            f"clip_high={self.clip_high}")
        if self.beta < 0.0:
            raise UserError(f"beta must be >= 0 (KL coefficient), got {self.beta}")
        if self.dual_clip is not None and (self.dual_clip <= 1.0 or self.objective != "clip"):
            raise UserError(f"dual_clip must be > 1 and needs objective='clip', got {self.dual_clip} with "
                            f"{self.objective!r}")
        if self.entropy_coef < 0.0:
            raise UserError(f"entropy_coef must be >= 0 (an entropy bonus), got {self.entropy_coef}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise UserError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings = LossSettings(),
    *,
    ref_logprobs: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss (or a variant chosen by ``settings``, see the module docstring) and its diagnostics.

    Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``, ``entropy`` are ``[B, T]`` (B = P·G
    completions, T completion tokens; mask 1 on real tokens including EOS); ``advantages`` is ``[B]``.
    ``normalizer``: the aggregation's denominator (default: this batch's, :func:`aggregation_normalizer`).
    ``entropy`` (per-token entropy of π_θ, with its graph) is needed for ``entropy_coef`` > 0 and for
    ``top_entropy_quantile`` < 1 unless ``entropy_mask`` (the kept tokens, e.g. chosen once for a whole batch
    split in micro-batches) is given. Returns ``(loss, stats)`` with stats ``clip_fraction``, ``ratio_mean``,
    (given a reference) ``kl`` and (with ``top_entropy_quantile`` < 1) ``entropy_kept_fraction``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one [B, T] shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got shape {tuple(advantages.shape)}")
    s = settings
    aggregate = get_aggregation(s.aggregation)
    ratio_fn = lookup(IMPORTANCE_LEVELS, s.importance_level, "importance level")
    objective_fn = lookup(OBJECTIVES, s.objective, "objective")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # [B, 1]

    ratio = ratio_fn(logprobs, old_logprobs, mask)  # [B, T] (token) or [B, 1] (sequence)
    per_token, active = objective_fn(ratio, logprobs, adv, clip_low=s.clip_low, clip_high=s.clip_high,
                                     dual_clip=s.dual_clip)
    per_token = per_token.expand_as(logprobs)  # [B, T]

    n_tokens = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        stats = {
            "clip_fraction": (active.expand_as(mask).to(mask.dtype) * mask).sum() / n_tokens,
            "ratio_mean": (ratio.expand_as(mask) * mask).sum() / n_tokens,
        }
    if s.top_entropy_quantile < 1.0:
        if entropy_mask is None:
            if entropy is None:
                raise ValueError("top_entropy_quantile < 1 needs the per-token entropy (or an entropy_mask)")
            entropy_mask = high_entropy_mask(entropy, mask, s.top_entropy_quantile)
        per_token = per_token * entropy_mask.to(per_token.dtype)  # only high-entropy tokens push the policy
        stats["entropy_kept_fraction"] = (entropy_mask.to(mask.dtype) * mask).sum() / n_tokens
    if s.entropy_coef > 0.0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy")
        per_token = per_token - s.entropy_coef * entropy  # maximise entropy: a bonus, aggregated as the rest
    if ref_logprobs is not None:
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs must be {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
        kl = kl_penalty(logprobs, ref_logprobs, s.kl_estimator)  # [B, T]
        stats["kl"] = ((kl * mask).sum() / n_tokens).detach()
        if s.beta > 0.0:
            per_token = per_token + s.beta * kl
    else:
        lookup(KL_ESTIMATORS, s.kl_estimator, "KL estimator")  # a bad name fails even when unused
    return aggregate(per_token, mask, normalizer), stats

