"""Every estimator's gradient on ONE shared rollout, split by query difficulty, with few backward passes.

Gradients are the μ = 1 form of the policy loss (π_old = π_θ detached, ratio 1: the REINFORCE gradient
−Σ A·∇log π / normalizer), the ascent direction −∇loss, w.r.t. the policy's trainable parameters before
any clipping; the KL term is left out (the same for every estimator, no part of ∇J).

At ratio 1 the loss's gradient w.r.t. the log-probabilities, c = ∂loss/∂logprobs ``[B, T]``, is linear in
the advantages for a fixed normalizer, and the parameter gradient is the backward pass of c through the
network, J_θᵀ c. So the probe computes the cheap c of every vector it needs (each estimator's advantages
and the reference estimator's with ``constant`` aggregation), finds a basis of their span (an SVD), runs
one backward pass per basis vector and combines: the default four estimators and the ``rloo`` reference
span 3 directions (``rloo`` is G/(G−1) × ``mean_baseline``, the reference a rescaled ``rloo``). With a
split by difficulty the hard and easy queries' sequences are forwarded separately, so each part's
backward passes run over its own sequences only: the split costs about 18% more (measured), not twice.

By default every gradient is a float32 row of all D parameters on the CPU (the exact probe). With a
``sketch`` (``sketch.py``, a CountSketch) each basis vector's gradient is projected to d dimensions on its
own device as soon as its backward pass is done, and only the d-dim rows leave the device: a probe of a
100M+ model keeps K·E·d numbers instead of K·E·D, at the price of a relative error of about √(2/d) in
each dot product (unbiased).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo_lab.advantages import get_estimator, rollout_advantages
from grpo_lab.losses import LossSettings, aggregation_normalizer, policy_loss
from grpo_lab.probe.sketch import CountSketch
from grpo_lab.rollout import sequence_logprobs
from grpo_lab.system.errors import UserError

REFERENCE_AGGREGATION = "constant"


@dataclass
class BatchGradients:
    """One batch's ascent directions ``[D]`` (float32, CPU; ``[d]`` sketches with a sketch): per estimator
    the whole gradient and (with a split) its part from the split's queries; the reference estimator's
    with ``constant`` aggregation."""

    full: dict[str, Tensor]
    hard: dict[str, Tensor] | None = None
    reference: Tensor | None = None


def policy_parameters(module) -> list[Tensor]:
    return [p for p in module.model.parameters() if p.requires_grad]


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    parts = [(torch.zeros(p.numel(), dtype=torch.float32) if g is None
              else g.detach().float().flatten().cpu())
             for g, p in zip(grads, params, strict=True)]
    return torch.cat(parts)


def _split_order(batch: list[dict], split: tuple[str, object] | None) -> tuple[list[dict], int]:
    """The batch with the split's queries first (stable) and how many there are (0 without a split)."""
    if split is None:
        return batch, 0
    column, value = split
    inside = [q for q in batch if str(q.get(column)) == str(value)]
    return inside + [q for q in batch if str(q.get(column)) != str(value)], len(inside)


def _basis(cotangents: Tensor, rtol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``(basis [r, N], coefficients [n, r])`` with cotangents ``[n, N]`` ≈ coefficients @ basis, rows of
    the basis orthonormal; directions are compared after scaling each row to unit norm, so a small vector
    is kept unless it is (within ``rtol``) a combination of the others."""
    c = cotangents.double()
    norms = c.norm(dim=1, keepdim=True)
    if not bool((norms > 0).any()):
        return c.new_zeros(0, c.shape[1]), c.new_zeros(c.shape[0], 0)
    unit = torch.where(norms > 0, c / norms.clamp(min=1e-300), torch.zeros_like(c))
    _, s, vh = torch.linalg.svd(unit, full_matrices=False)
    basis = vh[: int((s > rtol * s[0]).sum())]
    return basis, c @ basis.T


def _backward(logprobs: Tensor, cotangents: Tensor, params: list[Tensor],
              sketch: CountSketch | None = None) -> Tensor:
    """``[n, D]`` (float32, CPU): J_θᵀ c for each row c of ``cotangents`` ``[n, *logprobs.shape]``, through
    one backward pass per vector of a basis of their span (the basis found in float64, the rows combined in
    float32: a float64 copy of every row cost more than the backward passes). With ``sketch``: ``[n, d]``,
    S·J_θᵀ c, each basis vector's gradient projected on its device (S is linear, so the combination of the
    projections is the projection of the combination)."""
    d = sum(p.numel() for p in params) if sketch is None else sketch.dim
    basis, coefs = _basis(cotangents.flatten(1))
    grads = []
    for i in range(basis.shape[0]):
        out = torch.autograd.grad(logprobs, params,
                                  grad_outputs=basis[i].view_as(logprobs).to(logprobs.dtype),
                                  retain_graph=i < basis.shape[0] - 1, allow_unused=True)
        grads.append(_flat(out, params) if sketch is None else sketch.project(out, params))
    stacked = torch.stack(grads) if grads else torch.zeros(0, d)  # [r, D] (or [r, d]) on the CPU
    return coefs.to(device=stacked.device, dtype=stacked.dtype) @ stacked


ORACLE_DRAWS = 4
"""Extra rollouts per batch for the oracle baseline ``oracle_p``: p̂_q from ORACLE_DRAWS·G more samples."""


def success_rate(module, batch: list[dict], draws: int = ORACLE_DRAWS) -> Tensor:
    """Each query's success rate ``[P, 1]``: the mean reward of ``draws``·G fresh completions per query,
    drawn apart from the group whose gradient is measured, so b = p̂_q never depends on o_i (unbiased).
    With a 0/1 reward it is the oracle baseline b = p_q of the baseline map, estimated."""
    with torch.no_grad():
        means = [module.score(module.rollout(batch), batch)[0].mean(dim=-1, keepdim=True)
                 for _ in range(draws)]
    return torch.stack(means).mean(0)  # [P, 1]


def reinforce_settings(hparams, aggregation: str) -> LossSettings:
    """The loss settings of the probe's gradients: the module's clip range and KL estimator with
    ``aggregation``, the rest textbook (no KL, entropy or dual clip): at ratio 1 the μ = 1 policy term alone,
    the REINFORCE gradient (module docstring). ``scores.py``'s per-completion scores use the same."""
    return LossSettings(clip_low=hparams.clip_low, clip_high=hparams.clip_high,
                        kl_estimator=hparams.kl_estimator, aggregation=aggregation)


def batch_gradients(module, batch: list[dict], estimators: Sequence[str], reference: str | None = None,
                    split: tuple[str, object] | None = None,
                    aggregation: str | None = None, sketch: CountSketch | None = None) -> BatchGradients:
    """Each estimator's gradient on one rollout of ``batch`` (``module.rollout``, ``module.score`` [P, G]).

    ``aggregation`` overrides the module's (``constant`` divides by B·``max_new_tokens`` as the module
    does; ``token_mean``'s token count is the local one, so a probe on one process never waits for the
    others). ``split=(column, value)`` also returns each estimator's part from the queries whose column
    equals value (the rest is ``full − hard``), both with the whole batch's normalizer: those queries go
    first in the rollout and the two parts are forwarded separately, so each backward pass runs over one
    part's sequences and the split costs about nothing. ``reference`` adds that estimator's gradient with
    ``constant`` aggregation. ``sketch`` returns every row as its d-dim projection (module docstring).
    Group estimators on G = 1 raise ``compute_advantages``'s ValueError.
    """
    names = list(dict.fromkeys(estimators))
    if not names:
        raise UserError("estimators must name at least one advantage estimator")
    h = module.hparams
    agg = aggregation or h.aggregation
    batch, n_in = _split_order(batch, split)
    rollout = module.rollout(batch)
    rewards, _, invalid = module.score(rollout, batch)  # [P, G]
    rollout = rollout.without(invalid.flatten())  # an invalid reward leaves the loss
    mask = rollout.completion_mask  # [B, T]
    b, g = mask.shape[0], rewards.shape[1]
    oracle = success_rate(module, batch) if any(get_estimator(n).weights == "success_rate" for n in names) \
        else None
    vectors = [(rollout_advantages(rewards, name, rollout.logprobs, mask, oracle), agg)
               for name in names]  # [B] each
    if reference is not None:
        vectors.append((rollout_advantages(rewards, reference, rollout.logprobs, mask),
                        REFERENCE_AGGREGATION))
    cut = n_in * g  # rows [0, cut) are the split's queries
    parts = [slice(0, cut), slice(cut, b)] if split is not None else [slice(0, b)]
    parts = [p for p in parts if p.stop > p.start]
    params = policy_parameters(module)
    with torch.inference_mode(False), torch.enable_grad():
        logprobs = [sequence_logprobs(module.model, rollout.select(p), h.temperature)[0]
                    for p in parts]  # [b_p, T] each
        leaf = torch.cat(logprobs).detach().requires_grad_(True)  # [B, T]
        cots = []
        for adv, a in vectors:  # ∂loss/∂logprobs of each vector, over the whole batch: elementwise work only
            normalizer = aggregation_normalizer(a, mask, h.max_new_tokens)  # this process's own count
            loss, _ = policy_loss(leaf, leaf.detach(), adv, mask, reinforce_settings(h, a),
                                  normalizer=normalizer)
            cots.append(torch.autograd.grad(loss, leaf)[0])
        cots = torch.stack(cots)  # [n, B, T]
        grads = {p.start: _backward(lp, cots[:, p], params, sketch)
                 for p, lp in zip(parts, logprobs, strict=True)}
    total = -torch.stack(list(grads.values())).sum(0)  # ascent directions [n, D] (or [n, d])
    hard = None
    if split is not None:
        inside = -grads[0] if cut > 0 else torch.zeros_like(total)  # [n, D]
        hard = {name: inside[i] for i, name in enumerate(names)}
    full = {name: total[i] for i, name in enumerate(names)}
    return BatchGradients(full, hard, total[len(names)] if reference is not None else None)


def estimator_gradients(module, batch: list[dict], estimators: Sequence[str],
                        aggregation: str | None = None) -> dict[str, Tensor]:
    """The ascent direction −∇loss ``[D]`` (float32, CPU) of each estimator on ONE rollout of ``batch``:
    :func:`batch_gradients` without split or reference. D counts the trainable parameters of
    ``module.model`` in ``parameters()`` order (tied weights once)."""
    return batch_gradients(module, batch, estimators, aggregation=aggregation).full
