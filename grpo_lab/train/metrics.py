"""Step metrics as a pure function of what the step saw: the names are stable (docs/metrics.md)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from grpo_lab.advantages import zero_spread
from grpo_lab.data.dynamic_sampling import Sample


def step_metrics(sample: Sample, advantages: Tensor, loss: Tensor, stats: dict, seconds: float,
                 counters: dict[str, float]) -> dict[str, Tensor]:
    """``train/*`` and ``perf/*`` scalars of one training step.

    The reward metrics (``train/reward``, ``train/reward_<difficulty>``, ``train/frac_zero_std``) describe the
    data loader's batch, the Monte-Carlo estimate of J(θ) even when dynamic sampling replaced some of its
    groups; the others describe the batch the loss was computed on. ``counters`` are running counts
    (``skipped_steps``, ``invalid_rewards``, ...) logged as ``train/<name>``.
    """
    rewards, rollout = sample.seen_rewards, sample.rollout
    metrics = {
        "train/reward": rewards.mean(),
        "train/frac_zero_std": zero_spread(rewards).float().mean(),
        "train/advantage_mean": advantages.mean(),
        "train/advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
        "train/advantage_min": advantages.min(),
        "train/advantage_max": advantages.max(),
        "train/loss": loss.detach(),
        "train/completion_length": rollout.completion_mask.sum(-1).float().mean(),
        "train/truncated_fraction": rollout.truncated.float().mean(),
        "perf/tokens_per_s": torch.tensor((sample.sampled_tokens or rollout.num_tokens) / max(seconds, 1e-9)),
    }
    metrics.update({f"train/{k}": torch.tensor(float(v)) for k, v in counters.items()})
    metrics.update({f"train/{k}": v for k, v in stats.items() if v is not None})
    by_difficulty = defaultdict(list)
    for q, r in zip(sample.seen_queries, rewards.mean(-1), strict=True):
        if "difficulty" in q:
            by_difficulty[str(q["difficulty"])].append(r)
    for d, rs in by_difficulty.items():
        metrics[f"train/reward_{d}"] = torch.stack(rs).mean()
    return metrics
