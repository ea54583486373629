"""Baselines the field built to lower the policy gradient's variance: b ``[P, G]`` (or ``[P, 1]``, a
scalar) from rewards ``[P, G]`` and, for some, per-completion weights. Pure torch; ``advantages.py`` turns
each into a center of its registry (docs/derivation.md, "From reward to advantage").

Every baseline here but OPO's leaves o_i out of its own b_i, so the estimate of ∇J stays unbiased: the
leave-one-out mean (RLOO), James–Stein shrinkage across queries, the gradient-weighted (optimal-token)
mean, and the family r − c·b̄₋ᵢ with the batch's own variance-optimal c. The derivation of each is in its
docstring; why a baseline can *raise* variance (b outside (0, 2b*)) is docs/baseline_map.md.
"""

from __future__ import annotations

import torch
from torch import Tensor


def leave_one_out_mean(rewards: Tensor) -> Tensor:
    """b_i = mean_{j≠i} r_j = (Σ_j r_j − r_i) / (G−1) ``[P, G]``: RLOO's baseline, independent of o_i."""
    g = rewards.shape[-1]
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)  # [P, G]


def james_stein_baseline(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """James–Stein shrinkage baseline ``[P, G]`` (Zeng et al., arXiv 2511.03710; their verl code ``jspo``).

    The per-query mean from G samples is a noisy estimate of the query's success rate; Stein's paradox
    says pooling it with the other queries' means lowers its total squared error. For completion i of query
    p, with every statistic taken *without* query p (so b never depends on o_i: the gradient stays
    unbiased, a "two-level leave-one-out"):

        μ_q = mean_G(r_q),  v_q = var_G(r_q) / G (Bessel)              per query q ≠ p
        m̄ = mean_{q≠p} μ_q,  v² = mean_{q≠p} v_q,  s² = mean_{q≠p} (μ_q − m̄)²
        λ = v² / (v² + s² + eps)                                       shrinkage in [0, 1)
        b_{p,i} = (1 − λ) · mean_{j≠i} r_{p,j} + λ · m̄

    λ → 0 when queries differ much more than the noise of their means (b → RLOO), λ → 1 when they look
    alike (b → the other queries' mean). With P = 1 there is nothing to shrink toward: λ = 0 (RLOO).
    """
    p, g = rewards.shape
    loo = leave_one_out_mean(rewards)  # [P, G]
    if p < 2:
        return loo
    mu = rewards.mean(dim=-1)  # [P]
    v = rewards.var(dim=-1) / g  # [P]
    others = ~torch.eye(p, dtype=torch.bool, device=rewards.device)  # [P, P]: row p marks the queries q ≠ p
    m_bar = (mu.sum() - mu) / (p - 1)  # [P]
    v2 = (v.sum() - v) / (p - 1)  # [P]
    s2 = ((mu.unsqueeze(0) - m_bar.unsqueeze(1)) ** 2 * others).sum(-1) / (p - 1)  # [P]
    lam = (v2 / (v2 + s2 + eps)).unsqueeze(-1)  # [P, 1]
    return (1 - lam) * loo + lam * m_bar.unsqueeze(-1)


def gradient_weighted_baseline(rewards: Tensor, weights: Tensor) -> Tensor:
    """Leave-one-out weighted mean ``[P, G]``: b_i = Σ_{j≠i} w_j r_j / Σ_{j≠i} w_j.

    In the spirit of the Optimal Token Baseline (Li et al., arXiv 2602.07078; verl
    ``optimal_token_baseline``): the variance-minimising constant baseline of REINFORCE is b* = E[‖∇log π(o)‖²
    R] / E[‖∇log π(o)‖²], the reward averaged with weight ‖∇log π‖², not the plain mean. ``weights`` are a
    per-completion proxy of ‖∇log π(o)‖² (:func:`logit_gradient_energy`); we use one baseline per completion,
    not OTB's one per token position, because our advantages are per sequence. Leaving o_i out keeps b_i
    independent of o_i (unbiased). Equal weights give exactly RLOO's baseline; a group whose other weights are
    all 0 falls back to the unweighted leave-one-out mean.
    """
    wr = weights * rewards
    num = wr.sum(dim=-1, keepdim=True) - wr  # [P, G]
    den = weights.sum(dim=-1, keepdim=True) - weights  # [P, G]
    return torch.where(den > 0, num / den.clamp(min=1e-12), leave_one_out_mean(rewards))


def logit_gradient_energy(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-completion weight ``[B]``: W = Σ_t mask·(1 − π(o_t))², from the sampled tokens' log-probabilities
    ``logprobs`` ``[B, T]`` (the rollout's, so no extra forward pass).

    Why this weight: the gradient of log π(o_t) with respect to the logits is e_{o_t} − π, whose squared
    norm is 1 − 2π(o_t) + Σ_v π_v² (OTB's "logit-gradient proxy"). Without the full distribution we use
    (1 − π(o_t))²: since Σ_{v≠o_t} π_v² lies in [0, (1 − π(o_t))²], the exact value is between 1× and 2× of
    it. Summing over tokens ignores the correlation between tokens (OTB's cumulative W_T does the same).
    Confident completions (π ≈ 1 per token) get weight ≈ 0, uncertain and long ones a large weight.
    """
    mask = mask.to(logprobs.dtype)
    return ((1.0 - logprobs.exp()) ** 2 * mask).sum(dim=-1)


def length_weighted_baseline(rewards: Tensor, weights: Tensor) -> Tensor:
    """OPO's baseline ``[P, 1]`` (Hao et al., arXiv 2505.23585; verl ``compute_opo_outcome_advantage``):
    b = Σ_j l_j r_j / Σ_j l_j over the group, l_j the completion's length. Their optimal baseline, under
    the assumption that ‖∇log π(o)‖² grows in proportion to the length. Self-inclusive, as in verl, so it
    has ``mean_baseline``'s (G−1)/G-type bias; equal lengths give exactly ``mean_baseline``."""
    return (weights * rewards).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def online_coefficient(rewards: Tensor, weights: Tensor) -> Tensor:
    """ĉ = Σ w_i r_i b̄₋ᵢ / Σ w_i b̄₋ᵢ² over the whole batch (a scalar): the batch's own estimate of the
    variance-optimal c of the family A_i = r_i − c·b̄₋ᵢ (``baseline_coef``).

    Derivation: V(c) = E‖g(c)‖² − ‖∇J‖², and ∇J does not depend on c (every c is unbiased). With
    g(c) = Σ_i s_i (r_i − c·b̄₋ᵢ) and the cross terms between completions left out, E‖g(c)‖² ≈
    Σ_i w_i (r_i − c·b̄₋ᵢ)² with w_i = ‖s_i‖², minimised at ĉ; its expectation is E[p·C]/E[Q(p² + σ²/(G−1))],
    the closed form of ``grpo_lab/probe/mechanism.py`` without the ‖μ‖² term. The weights are the proxy of
    :func:`logit_gradient_energy`, from the rollout's log-probabilities: no extra backward pass. ĉ depends on
    every completion of the batch, so each o_i moves it by O(1/B): a bias of that order, as in any batch
    statistic (``batch_whiten``). A batch without weight on b̄₋ᵢ gives ĉ = 0 (``reward``)."""
    loo = leave_one_out_mean(rewards)  # [P, G]
    den = (weights * loo**2).sum()
    return (weights * rewards * loo).sum() / den if den > 0 else rewards.new_zeros(())
