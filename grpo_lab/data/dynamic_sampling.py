"""DAPO's dynamic sampling: keep only the groups that carry a signal, refill the batch from a seeded stream.

A group whose G rewards are all equal has group-relative advantage 0: it costs a rollout and contributes
nothing but tokens to the loss normalizer. Dynamic sampling (DAPO, arXiv 2503.14476, §3.2; verl
``algorithm.filter_groups``) drops such groups and samples fresh queries until the batch holds P groups
with spread again, or ``max_rounds`` refill rounds are spent (then the step trains on the groups kept). The
loss normalizer is computed on the kept batch, so token_mean divides by the kept tokens.

Exact resume: fresh queries come from :class:`QueryStream`, a seeded permutation of the training set per
pass read in order, whose whole state is one counter (stored in the checkpoint). The rollouts draw from
torch's global RNG, which the checkpoint also stores.

Shapes: P queries, G completions each, B = P·G rows; a query's G completions are adjacent (row b belongs to
query b // G).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo_lab.advantages import zero_spread
from grpo_lab.data.tasks import Query
from grpo_lab.rollout import Rollout


class QueryStream:
    """Fresh training queries in a seeded order: pass k is ``randperm(n)`` seeded with (seed, k), read in
    order. ``drawn`` (queries handed out so far) is the whole state: same seed and state, same queries."""

    def __init__(self, queries: list[Query], seed: int) -> None:
        if not queries:
            raise ValueError("dynamic sampling needs a non-empty set of training queries to draw from")
        self.queries, self.seed, self.drawn = queries, seed, 0
        self._order: tuple[int, list[int]] | None = None

    def draw(self, n: int) -> list[Query]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.drawn, len(self.queries))
            if self._order is None or self._order[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 500_009 + epoch)
                self._order = (epoch, torch.randperm(len(self.queries), generator=gen).tolist())
            out.append(self.queries[self._order[1][i]])
            self.drawn += 1
        return out

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


@dataclass
class Sample:
    """The step's training batch and what the data loader gave: ``queries``/``rollout``/``rewards`` [P', G]
    are the kept groups; ``seen_queries``/``seen_rewards`` [P, G] the data loader's batch (the unbiased
    estimate of J for the reward metrics); ``rounds`` refill rounds used; ``dropped`` the share of all sampled
    groups that were dropped; ``sampled_tokens`` completion tokens generated in the step."""

    queries: list[Query]
    rollout: Rollout
    rewards: Tensor
    seen_queries: list[Query]
    seen_rewards: Tensor
    rounds: int = 0
    dropped: float = 0.0
    sampled_tokens: int = 0


def take_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The sub-rollout of whole groups ``groups`` (indices of queries), in that order."""
    g = rollout.group_size
    rows = [q * g + j for q in groups for j in range(g)]
    idx = torch.tensor(rows, dtype=torch.long, device=rollout.completion_ids.device)
    return Rollout(rollout.prompt_ids[idx], rollout.prompt_mask[idx], rollout.completion_ids[idx],
                   rollout.completion_mask[idx], rollout.logprobs[idx],
                   [rollout.completions[r] for r in rows], rollout.truncated[idx], g)


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several with the same G: prompts left-padded to the longest (mask 0), completions
    right-padded to the longest (mask 0, log-probability 0). Padding never changes a log-probability: the
    positions follow the mask."""
    if len(parts) == 1:
        return parts[0]
    tp = max(r.prompt_ids.shape[1] for r in parts)
    t = max(r.completion_ids.shape[1] for r in parts)

    def pad(x: Tensor, width: int, value: int | float, left: bool) -> Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        torch.cat([pad(r.prompt_ids, tp, pad_id, True) for r in parts]),
        torch.cat([pad(r.prompt_mask, tp, 0, True) for r in parts]),
        torch.cat([pad(r.completion_ids, t, pad_id, False) for r in parts]),
        torch.cat([pad(r.completion_mask, t, 0, False) for r in parts]),
        torch.cat([pad(r.logprobs, t, 0.0, False) for r in parts]),
        [c for r in parts for c in r.completions],
        torch.cat([r.truncated for r in parts]),
        parts[0].group_size,
    )


def dynamic_sample(
    queries: list[Query],
    rollout: Rollout,
    rewards: Tensor,
    sample: Callable[[list[Query]], tuple[Rollout, Tensor]],
    draw: Callable[[int], list[Query]],
    max_rounds: int,
    pad_id: int,
    agree: Callable[[int], int] = lambda kept: kept,
    seen_rewards: Tensor | None = None,
) -> Sample:
    """Drop the zero-spread groups of the first batch (``queries``, its ``rollout`` and ``rewards`` [P, G])
    and refill from ``draw(n)`` (n fresh queries), ``sample`` giving each refill's rollout and rewards, until
    P groups with spread are kept or ``max_rounds`` refills are spent.

    ``agree(kept)`` returns the number of groups every process keeps (under DDP, the minimum over the ranks,
    so all ranks run the same number of micro-batches); each process keeps that many, the first ones. If no
    group with spread is left anywhere, the step trains on the first batch unchanged (its group-relative
    advantages are all 0). ``seen_rewards``: the first batch's rewards for the metrics (default ``rewards``).
    """
    seen = rewards if seen_rewards is None else seen_rewards
    target = len(queries)
    parts = [(queries, rollout, rewards)]
    kept = int((~zero_spread(rewards)).sum())
    sampled, rounds, tokens = target, 0, rollout.num_tokens
    while kept < target and rounds < max_rounds:
        fresh = draw(target - kept)
        r, rw = sample(fresh)
        parts.append((fresh, r, rw))
        kept += int((~zero_spread(rw)).sum())
        sampled, rounds, tokens = sampled + len(fresh), rounds + 1, tokens + r.num_tokens
    keep_n = agree(min(kept, target))
    dropped = 1.0 - (keep_n or target) / sampled
    if keep_n == 0:
        return Sample(queries, rollout, rewards, queries, seen, rounds, dropped, tokens)
    out_q, out_r, out_w = [], [], []
    for qs, r, rw in parts:
        groups = (~zero_spread(rw)).nonzero().flatten().tolist()[: keep_n - len(out_q)]
        if groups:
            out_q += [qs[i] for i in groups]
            out_r.append(take_groups(r, groups))
            out_w.append(rw[groups])
    return Sample(out_q, cat_rollouts(out_r, pad_id), torch.cat(out_w), queries, seen, rounds, dropped,
                  tokens)
