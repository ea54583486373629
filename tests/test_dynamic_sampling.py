"""DAPO dynamic sampling: the query stream, the refill loop, padding that never changes a log-probability, and
the gradient of a refilled batch (the kept groups', with the kept batch's normalizer)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from grpo_lab.advantages import compute_advantages, zero_spread
from grpo_lab.data.dynamic_sampling import QueryStream, cat_rollouts, dynamic_sample, take_groups
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.warmstart import WarmStartConfig
from grpo_lab.module import GRPOModule
from grpo_lab.rollout import Rollout, generate, sequence_logprobs

QUERIES = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(7)]


def test_query_stream_is_seeded_and_resumes_from_its_counter():
    a = QueryStream(QUERIES, seed=3)
    first = a.draw(5) + a.draw(6)  # crosses a pass boundary (7 queries)
    # a pass is a permutation
    assert sorted(q["prompt"] for q in first[:7]) == sorted(q["prompt"] for q in QUERIES)
    b = QueryStream(QUERIES, seed=3)
    b.draw(5)
    c = QueryStream(QUERIES, seed=3)
    c.load_state_dict(b.state_dict())  # a resumed run continues where the checkpoint stopped
    assert c.draw(6) == first[5:]
    assert QueryStream(QUERIES, seed=4).draw(7) != QueryStream(QUERIES, seed=3).draw(7)
    with pytest.raises(ValueError, match="non-empty"):
        QueryStream([], seed=0)


def _fake_rollout(n_groups: int, g: int, tp: int, t: int, tag: int) -> Rollout:
    b = n_groups * g
    ids = torch.full((b, t), tag)
    return Rollout(torch.full((b, tp), tag), torch.ones(b, tp, dtype=torch.long), ids,
                   torch.ones(b, t, dtype=torch.long), torch.full((b, t), -float(tag)),
                   [f"{tag}:{i}" for i in range(b)], torch.zeros(b, dtype=torch.bool), g)


def test_dynamic_sample_drops_flat_groups_and_refills_in_order():
    # first batch: 4 groups, 2 flat (rows 1 and 3). Refill 1 (2 queries): one flat, one kept. Refill 2: kept.
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    refills = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.5, 0.0]])]
    asked = []

    def draw(n):
        asked.append(n)
        return [{"prompt": f"fresh{len(asked)}.{i}"} for i in range(n)]

    def sample(qs):
        k = len(asked)
        return _fake_rollout(len(qs), 2, tp=1 + k, t=2 + k, tag=k), refills[k - 1]

    queries = [{"prompt": f"q{i}"} for i in range(4)]
    out = dynamic_sample(queries, _fake_rollout(4, 2, 2, 3, tag=0), first, sample, draw, max_rounds=3,
                         pad_id=99)
    assert asked == [2, 1] and out.rounds == 2  # only the missing groups are drawn
    assert not zero_spread(out.rewards).any() and out.rewards.shape == (4, 2)
    assert [q["prompt"] for q in out.queries] == ["q0", "q2", "fresh1.1", "fresh2.0"]
    torch.testing.assert_close(out.rewards, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]]))
    assert out.dropped == pytest.approx(1 - 4 / 7)  # 7 groups sampled, 4 trained on
    # rows x tokens per round
    assert out.seen_rewards is first and out.sampled_tokens == 8 * 3 + 4 * 3 + 2 * 4
    # every part padded to the longest prompt (left) and completion (right); the padding is masked
    r = out.rollout
    # rounds' widths: (2, 3) (2, 3) (3, 4)
    assert r.prompt_ids.shape == (8, 3) and r.completion_ids.shape == (8, 4)
    assert r.prompt_mask[:2].tolist() == [[0, 1, 1]] * 2
    assert r.completion_mask[:2].tolist() == [[1, 1, 1, 0]] * 2
    assert r.prompt_mask[6:].tolist() == [[1, 1, 1]] * 2
    assert r.completion_mask[6:].tolist() == [[1, 1, 1, 1]] * 2
    assert r.completions[:4] == ["0:0", "0:1", "0:4", "0:5"] and r.completions[6:] == ["2:0", "2:1"]
    assert r.completion_ids[0, 3].item() == 99 and r.logprobs[0, 3].item() == 0.0


def test_dynamic_sample_when_rounds_run_out_or_nothing_has_spread():
    flat = torch.ones(3, 2)
    spread = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])

    def sample(qs):
        return _fake_rollout(len(qs), 2, 1, 1, 1), torch.ones(len(qs), 2)

    def draw(n):
        return [{"prompt": "x"}] * n

    qs = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    short = dynamic_sample(qs, _fake_rollout(3, 2, 1, 1, 0), spread, sample, draw, max_rounds=2, pad_id=0)
    # trains on what it kept
    assert short.rounds == 2 and short.rewards.shape == (1, 2) and short.queries == qs[:1]
    none = dynamic_sample(qs, _fake_rollout(3, 2, 1, 1, 0), flat, sample, draw, max_rounds=1, pad_id=0)
    assert none.rewards is flat and none.queries == qs  # no signal anywhere: the first batch, unchanged
    # under DDP every rank keeps the smallest count of any rank (here 0 elsewhere: first batch)
    agreed = dynamic_sample(qs, _fake_rollout(3, 2, 1, 1, 0), spread, sample, draw, 0, 0, agree=lambda k: 0)
    assert agreed.rewards is spread


def test_padding_and_concatenation_never_change_a_log_probability(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(0)
    a = generate(model, tok, ["1+2=", "33+44="], 2, 3)
    b = generate(model, tok, ["5="], 2, 6)  # shorter prompt, longer completions
    both = cat_rollouts([take_groups(a, [1]), b], tok.pad_token_id)
    with torch.no_grad():
        got, _ = sequence_logprobs(model, both)
        want_a, _ = sequence_logprobs(model, take_groups(a, [1]))
        want_b, _ = sequence_logprobs(model, b)
    ta = want_a.shape[1]
    torch.testing.assert_close(got[:2, :ta] * a.completion_mask[2:], want_a * a.completion_mask[2:],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:] * b.completion_mask, want_b * b.completion_mask, atol=1e-5, rtol=1e-5)


def prompt_reward(completions, answer, **_):
    """Flat (1.0) for queries whose answer is even and < 8; otherwise a value of the completion's text."""
    return [1.0 if int(a) % 2 == 0 and int(a) < 8 else float(sum(map(ord, c)) % 7)
            for c, a in zip(completions, answer, strict=True)]


def test_a_refilled_batch_has_no_flat_group_and_the_gradient_of_its_kept_groups(in_tmp):
    L.seed_everything(0)
    module = GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2),
                        warm_start=WarmStartConfig(steps=0),
                        rewards=["tests.test_dynamic_sampling:prompt_reward"], num_generations=3,
                        max_new_tokens=4, temperature=1.5, dynamic_sampling=True,
                        max_resample_rounds=4)
    pool = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    module.stream = QueryStream(pool, seed=1)
    batch = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": "3"},
             {"prompt": "2+2=", "answer": "4"}, {"prompt": "4+5=", "answer": "9"}]
    torch.manual_seed(5)
    sample = module.sample(batch)
    assert zero_spread(sample.seen_rewards).sum() == 2  # the data loader's batch had two flat groups
    assert not zero_spread(sample.rewards).any() and len(sample.queries) == 4 and sample.rounds >= 1
    assert [q["prompt"] for q in sample.queries[:2]] == ["1+2=", "4+5="]

    def grad(rollout, adv, normalizer=None):
        module.model.zero_grad()
        loss, _ = module.loss(rollout, adv, None, normalizer)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in module.model.parameters()])

    adv = compute_advantages(sample.rewards, "group_norm")  # [4, 3]
    full = grad(sample.rollout, adv.flatten())
    # the same gradient from each kept group alone, unpadded, over the kept batch's token count
    n_kept = sample.rollout.completion_mask.sum().float()
    per_group = sum(grad(take_groups(sample.rollout, [k]), adv[k], n_kept) for k in range(4))
    torch.testing.assert_close(full, per_group, atol=1e-6, rtol=1e-5)
    assert full.abs().sum() > 0
