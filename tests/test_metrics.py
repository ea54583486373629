"""step_metrics on a hand-made Sample: every train/* and perf/* value computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.data.dynamic_sampling import Sample
from grpo_lab.rollout import Rollout
from grpo_lab.train.metrics import step_metrics


def trained_rollout() -> Rollout:
    """The batch the loss saw: 2 groups of 2, completion lengths 3, 1, 4 (truncated), 2 of T = 4."""
    lengths = torch.tensor([3, 1, 4, 2])
    mask = (torch.arange(4)[None, :] < lengths[:, None]).long()  # [4, 4], 10 tokens
    ids = torch.ones(4, 2, dtype=torch.long)
    return Rollout(ids, ids, mask * 5, mask, torch.zeros(4, 4), ["a"] * 4,
                   torch.tensor([False, False, True, False]), 2)


def seen() -> tuple[list[dict], torch.Tensor]:
    """The data loader's batch: P = 4 queries (easy, hard, easy, no difficulty) x G = 2 rewards."""
    queries = [{"prompt": "q0", "difficulty": "easy"}, {"prompt": "q1", "difficulty": "hard"},
               {"prompt": "q2", "difficulty": "easy"}, {"prompt": "q3"}]
    return queries, torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.5], [0.0, 0.0]])


def metrics(sampled_tokens: int = 0, advantages=None) -> dict:
    queries, rewards = seen()
    rollout = trained_rollout()
    # the kept groups are 1 and 2 of the seen ones (dynamic sampling replaced the others)
    sample = Sample(queries[1:3], rollout, rewards[1:3], queries, rewards, sampled_tokens=sampled_tokens)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]) if advantages is None else advantages
    stats = {"clip_fraction": torch.tensor(0.125), "kl": None}
    return step_metrics(sample, advantages, torch.tensor(0.25, requires_grad=True), stats, seconds=2.0,
                        counters={"skipped_steps": 2, "invalid_rewards": 1})


def test_step_metrics_by_hand():
    m = metrics()
    expected = {
        "train/reward": 3.5 / 8,  # the seen batch's 8 rewards, not the 4 trained on
        "train/frac_zero_std": 2 / 4,  # q1 (1, 1) and q3 (0, 0)
        "train/reward_easy": (0.5 + 0.25) / 2,  # q0's mean 0.5, q2's 0.25
        "train/reward_hard": 1.0,
        "train/advantage_mean": 0.0,
        "train/advantage_std": math.sqrt((1 + 1 + 0.25 + 0.25) / 3),  # unbiased, n - 1 = 3
        "train/advantage_min": -1.0,
        "train/advantage_max": 1.0,
        "train/loss": 0.25,
        "train/completion_length": (3 + 1 + 4 + 2) / 4,
        "train/truncated_fraction": 1 / 4,
        "perf/tokens_per_s": 10 / 2.0,  # the rollout's 10 completion tokens in 2 s
        "train/skipped_steps": 2.0,
        "train/invalid_rewards": 1.0,
        "train/clip_fraction": 0.125,
    }
    assert set(m) == set(expected)  # no train/kl (None), no reward_<difficulty> for q3
    for name, value in expected.items():
        assert float(m[name]) == pytest.approx(value, rel=1e-6), name
    assert not m["train/loss"].requires_grad


def test_tokens_per_second_counts_every_sampled_token_and_one_advantage_has_std_0():
    """With dynamic sampling the step generated more tokens than it trained on: 30 in 2 s."""
    m = metrics(sampled_tokens=30, advantages=torch.tensor([0.7]))
    assert float(m["perf/tokens_per_s"]) == pytest.approx(15.0)
    assert float(m["train/advantage_std"]) == 0.0  # not NaN
    assert float(m["train/advantage_mean"]) == pytest.approx(0.7)
