"""SeveralUpdates: μ = num_iterations optimizer steps on one rollout batch, each accumulated over
micro-batches of whole groups. Run on a real GRPOModule (a 1-layer policy) without a Trainer: the host's
``optimizers`` and ``manual_backward`` are a plain optimizer and ``loss.backward``."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.warmstart import WarmStartConfig
from grpo_lab.module import GRPOModule
from grpo_lab.rollout import Rollout
from tests.conftest import full_sequence_logprobs

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)


def hand_rollout(p: int, g: int, lengths: list[int], t: int = 4) -> Rollout:
    """P prompts of 3 tokens, each repeated for its G completions; completion lengths as given (T = 4)."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 99, (p, 3), generator=gen).repeat_interleave(g, dim=0)  # [B, 3]
    completion = torch.randint(3, 99, (p * g, t), generator=gen)  # [B, T]
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, T]
    return Rollout(prompts, torch.ones_like(prompts), completion * mask, mask, torch.zeros(p * g, t),
                   ["x"] * (p * g), torch.tensor([n == t for n in lengths]), g)


def host(lr: float = 0.0, **settings) -> tuple[GRPOModule, dict]:
    """A GRPOModule whose ``loss`` records each call (rows, old log-probs, and the policy's own log-probs at
    that moment) and whose optimizer counts its steps."""
    module = GRPOModule(policy=SMALL, warm_start=WarmStartConfig(steps=0), rewards=["exact_match"],
                        max_new_tokens=4, **settings)
    opt = torch.optim.SGD(module.model.parameters(), lr=lr)
    record = {"rows": [], "old": [], "current": [], "steps": 0}
    step = opt.step

    def counted_step(*args, **kw):
        record["steps"] += 1
        return step(*args, **kw)

    opt.step = counted_step
    loss = module.loss

    def recorded_loss(rollout, advantages, old_logprobs, *args):
        record["rows"].append(len(rollout.completions))
        record["old"].append(old_logprobs)
        with torch.no_grad():
            record["current"].append(full_sequence_logprobs(module.model, rollout))
        return loss(rollout, advantages, old_logprobs, *args)

    module.optimizers = lambda: opt
    module.manual_backward = lambda value: value.backward()
    module.loss = recorded_loss
    return module, record


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25])  # [B = 8]


@pytest.mark.parametrize("settings", [{}, {"top_entropy_quantile": 0.5}])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient(settings):
    """4 groups of 2 in 3 micro-batches: chunks of ceil(ceil(8/3)/2)·2 = 4 rows, with 10 and 13 completion
    tokens, so a chunk that divided by its own token count (or chose its own high-entropy tokens) would give
    another gradient."""
    rollout = hand_rollout(4, 2, [4, 2, 3, 1, 4, 4, 2, 3])
    whole, _ = host(num_generations=2, **settings)
    loss, _ = GRPOModule.loss(whole, rollout, ADVANTAGES, None)  # the whole batch at once, π_old = π_θ
    loss.backward()
    micro, record = host(num_generations=2, micro_batches=3, **settings)
    total, stats = micro.several_updates(rollout, ADVANTAGES)
    assert record["rows"] == [4, 4] and record["steps"] == 1
    assert record["old"] == [None, None]  # μ = 1: the ratio is taken against π_θ itself
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(micro.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in micro.model.parameters())


@pytest.mark.parametrize(("p", "g", "micro_batches", "chunks"),
                         [(4, 2, 3, [4, 4]), (4, 2, 4, [2, 2, 2, 2]), (3, 4, 2, [8, 4]), (2, 2, 8, [2, 2])])
def test_micro_batches_are_whole_groups(p, g, micro_batches, chunks):
    """Chunks of ceil(ceil(B / micro_batches) / G)·G rows: B = 8, G = 2 in 3 -> 4 + 4; in 4 -> 2 each;
    B = 12, G = 4 in 2 -> 8 + 4; B = 4, G = 2 in 8 -> one group each (never less than a group)."""
    module, record = host(num_generations=g, micro_batches=micro_batches)
    module.several_updates(hand_rollout(p, g, [4, 3] * (p * g // 2)), torch.linspace(-1, 1, p * g))
    assert record["rows"] == chunks


def test_pi_old_is_frozen_before_the_first_update():
    """μ = 3 with 2 micro-batches: π_old is the sampling policy's log-probabilities, computed once before the
    first update and used by all 3 updates (6 loss calls, 3 optimizer steps), while the policy moves."""
    rollout = hand_rollout(4, 2, [4, 2, 3, 1, 4, 4, 2, 3])
    module, record = host(lr=0.5, num_generations=2, num_iterations=3, micro_batches=2)
    before = copy.deepcopy(module.model)
    with torch.no_grad():
        sampling = full_sequence_logprobs(before, rollout)  # [B, T] of the policy that sampled the batch
    module.several_updates(rollout, ADVANTAGES)
    assert record["rows"] == [4, 4] * 3 and record["steps"] == 3
    old = torch.cat(record["old"][:2])  # the two chunks of the first update
    torch.testing.assert_close(old, sampling, rtol=1e-5, atol=1e-5)
    for update in range(3):
        torch.testing.assert_close(torch.cat(record["old"][2 * update:2 * update + 2]), old, rtol=0, atol=0)
    current = [torch.cat(record["current"][2 * u:2 * u + 2]) for u in range(3)]
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(current[0][mask], sampling[mask], rtol=1e-5, atol=1e-5)  # ratio 1 at first
    assert (current[1][mask] - sampling[mask]).abs().max() > 1e-3  # the policy moved; π_old did not
    assert (current[2][mask] - current[1][mask]).abs().max() > 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), module.model.parameters(),
                                                      strict=True))
