"""Per-completion scores on a few queries: the measured moments behind the baseline map (``mechanism.py``).

One rollout of a few queries (each with the module's G completions), one forward pass, and one gradient per
completion: u_b = the ascent direction of completion b alone with advantage 1 and normalizer 1, i.e.
∇log π(o_b|q) = Σ_t ∇log π(o_t) under ``token_mean`` or ``constant`` (each token weighted as the module's
aggregation weighs it: 1/len_b under ``sequence_mean``). The per-completion gradients are taken in one
batched backward pass (``is_grads_batched``), or one pass per completion where the model's operations do
not batch. Only their Gram matrix ``[B, B]`` is kept. The probe calls this at the warm start only, with
2-4 queries (``score_prompts``): a few seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from grpo_lab.losses import aggregation_normalizer, policy_loss
from grpo_lab.probe.gradients import reinforce_settings
from grpo_lab.probe.mechanism import predict, score_norm_ratio
from grpo_lab.rollout import sequence_logprobs


@dataclass
class ScoreSample:
    """Rewards ``[P, G]`` of the queries kept (no invalid reward), the Gram matrix ``[P·G, P·G]`` of their
    completions' unnormalized scores, the rollout's normalizer (its ``aggregation_normalizer``) and how
    long it took."""

    rewards: np.ndarray
    gram: np.ndarray
    normalizer: float
    seconds: float

    def mechanism(self, prompts: int, v0: float) -> dict[str, float]:
        """The map's ``mechanism`` entry for a probe of ``prompts`` queries per batch whose measured V(0)
        is ``v0``: the score-norm moments, B₁, B₂, c* and V(0) predicted (``mechanism.predict``), the
        predicted V(1)/V(0) and V(oracle)/V(0) anchored on the measured V(0), and the seconds spent."""
        p, g = self.rewards.shape
        out = {**score_norm_ratio(self.rewards, np.diagonal(self.gram)), "prompts": p, "g": g,
               "seconds": self.seconds}
        if p == 0 or g < 3:
            return out
        blocks = [self.gram[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(p)]
        mu = np.zeros((p, p * g))  # μ̂_q = mean_i r_i u_i, as weights on the completions
        for i in range(p):
            mu[i, i * g:(i + 1) * g] = self.rewards[i] / g
        cross = mu @ self.gram @ mu.T  # [P, P]: μ̂_q · μ̂_q'
        # a probe batch holds ``prompts`` queries: its normalizer scales with the number of queries
        pred = predict(list(zip(self.rewards, blocks, strict=True)), cross, prompts,
                       self.normalizer * prompts / p)
        ok = v0 > 0 and math.isfinite(v0)
        out.update(pred, v1_ratio_pred=1 + (pred["b2"] - 2 * pred["b1"]) / v0 if ok else math.nan,
                   oracle_ratio_pred=1 + pred["oracle_delta"] / v0 if ok else math.nan,
                   v0_pred_ratio=pred["v0_pred"] / v0 if ok else math.nan)
        return out


def _flat(grads, params: list[Tensor], batch: int) -> Tensor:
    return torch.cat([(torch.zeros(batch, p.numel()) if gr is None else gr.detach().float().reshape(batch, -1)
                       .cpu()) for gr, p in zip(grads, params, strict=True)], dim=1)  # [B, D]


def _per_row_gradients(logprobs: Tensor, rows: Tensor, params: list[Tensor]) -> Tensor:
    """``[B, D]``: J_θᵀ rows[b] for each cotangent ``rows`` ``[B, *logprobs.shape]``."""
    b = rows.shape[0]
    try:
        grads = torch.autograd.grad(logprobs, params, grad_outputs=rows, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        return _flat(grads, params, b)
    except RuntimeError:  # an operation without a batching rule: one backward pass per row
        out = [_flat(torch.autograd.grad(logprobs, params, grad_outputs=rows[i], retain_graph=i < b - 1,
                                         allow_unused=True), params, 1) for i in range(b)]
        return torch.cat(out)


def completion_scores(module, batch: list[dict]) -> ScoreSample:
    """Per-completion scores of one rollout of ``batch`` at the module's parameters (no optimizer state,
    ``.grad`` untouched); call it inside the probe's ``frozen`` context (training mode, seeded RNG)."""
    t0 = time.perf_counter()
    h = module.hparams
    rollout = module.rollout(batch)
    rewards, _, invalid = module.score(rollout, batch)  # [P, G]
    mask = rollout.completion_mask  # [B, T]
    b = mask.shape[0]
    params = [p for p in module.model.parameters() if p.requires_grad]
    g = rewards.shape[1]
    parts = []
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, b, g):  # one group at a time: G backward rows over a G-sequence graph, not B
            part = rollout.select(slice(start, start + g))
            logprobs = sequence_logprobs(module.model, part, h.temperature)[0]  # [G, T]
            leaf = logprobs.detach().requires_grad_(True)
            ones = torch.ones(g, device=leaf.device)  # advantage 1 for every completion
            loss, _ = policy_loss(leaf, leaf.detach(), ones, part.completion_mask,
                                  reinforce_settings(h, h.aggregation), normalizer=1.0)
            weights = -torch.autograd.grad(loss, leaf)[0]  # [G, T]: each token's weight in its score
            rows = torch.eye(g, device=leaf.device, dtype=leaf.dtype)[:, :, None] * weights[None]  # [G, G, T]
            parts.append(_per_row_gradients(logprobs, rows, params).double())  # [G, D]
    u = torch.cat(parts)  # [B, D]
    gram = (u @ u.T).numpy()
    keep = (~invalid.any(-1)).cpu().numpy()  # queries with an invalid reward are left out
    idx = np.concatenate([np.arange(i * g, (i + 1) * g) for i in np.flatnonzero(keep)]) if keep.any() \
        else np.zeros(0, dtype=int)
    normalizer = float(aggregation_normalizer(h.aggregation, mask, h.max_new_tokens))
    return ScoreSample(rewards.detach().double().cpu().numpy()[keep], gram[np.ix_(idx, idx)], normalizer,
                       time.perf_counter() - t0)
