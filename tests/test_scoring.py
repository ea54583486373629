import math
import sys
import types

import pytest
import torch

from grpo_lab.rewards.scoring import (
    exact_match,
    load_reward,
    numeric_match,
    required_columns,
    score,
    score_groups,
)


def test_exact_and_numeric_match():
    assert exact_match([" 12", "12<", "13"], answer=["12", "12", "12"]) == [1.0, 0.0, 0.0]
    assert numeric_match(["12.0", "abc", "7\nmore"], answer=["12", "1", "7"]) == [1.0, 0.0, 1.0]


def test_load_by_name_and_import_path(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.length = lambda completions, **_: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    assert load_reward("exact_match") is exact_match
    assert load_reward("my_rewards:length")(["ab"]) == [2.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'; known: .*exact_match"):
        load_reward("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward("my_rewards:missing")


def test_score_groups_by_hand():
    """Two queries x G = 2: exact_match and a length reward that is NaN for one completion."""
    def length(completions, completion_length, **_):
        return [math.nan if c == "x" else float(n) for c,
                n in zip(completions, completion_length, strict=True)]

    batch = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    completions = ["2", "3", "x", "4"]
    r, j, invalid = score_groups([exact_match, length], batch, completions, 2, weights=[1.0, 0.5],
                                 allow_invalid=True, completion_length=[1, 3, 2, 1])
    # weighted sum: [1 + 0.5, 0 + 1.5], [NaN -> the group's other value, 1 + 0.5]
    assert r.tolist() == [[1.5, 1.5], [1.5, 1.5]] and j.tolist() == r.tolist()
    assert invalid.tolist() == [[False, False], [True, False]]
    r, j, _ = score_groups([exact_match, length], batch, completions[:2] + ["3", "4"], 2,
                           aggregation="normalize_then_sum", completion_length=[1, 3, 2, 2])
    # group 0: exact (1, 0) -> (+0.707, -0.707), length (1, 3) -> (-0.707, +0.707): sums 0;
    # group 1: exact only
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.0], [-0.7071, 0.7071]]), atol=1e-3, rtol=0)
    assert j.tolist() == [[2.0, 3.0], [2.0, 3.0]]  # J's rewards stay the weighted sum


def test_score_weights_and_columns():
    r = score([exact_match, lambda completions, **_: [0.5] * len(completions)], ["1", "2"],
              {"answer": ["1", "1"]}, [2.0, 1.0])
    torch.testing.assert_close(r, torch.tensor([2.5, 0.5]))
    assert required_columns(exact_match) == {"answer"}


@pytest.mark.parametrize(
    ("values", "match"),
    [([1.0], "returned 1 values for 2 completions"), ([1.0, math.nan], "returned nan"),
     ([1.0, "x"], "returned 'x'"), ([math.inf, 0.0], "returned inf")],
)
def test_score_rejects_bad_outputs(values, match):
    def bad(completions, **_):
        return values

    with pytest.raises(ValueError, match=match):
        score([bad], ["a", "b"], {})


def test_score_names_a_raising_function():
    def boom(completions, **_):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="reward function 'boom' raised KeyError"):
        score([boom], ["a"], {})


def test_overlong_penalty_by_hand():
    from grpo_lab.rewards.scoring import overlong_penalty

    # L = 8, C = 4: free up to 4 tokens, then (4 - n) / 4 down to -1 at n = 8
    lengths = [3, 4, 5, 6, 8]
    got = overlong_penalty(["x"] * 5, completion_length=lengths, max_new_tokens=[8] * 5,
                           overlong_buffer=[4] * 5)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(["x"], completion_length=[9], max_new_tokens=[8], overlong_buffer=[4]) == [-1.0]


def test_normalize_then_sum_by_hand():
    from grpo_lab.rewards.scoring import aggregate_rewards

    # one group of G = 3, two functions, weights [1, .5]
    # f1 = [1, 0, 0]: mean 1/3, Bessel std sqrt(1/3)
    #     -> z1 = [2/3, -1/3, -1/3] / sqrt(1/3) = [1.1547, -.5774, -.5774]
    #   f2 = [10, 20, 30]: mean 20, std 10 -> z2 = [-1, 0, 1]
    #   sum = z1 + .5 z2 = [.6547, -.5774, -.0774]   (weighted_sum would give [6, 10, 15]: f2 drowns f1)
    values = torch.tensor([[[1.0, 0.0, 0.0]], [[10.0, 20.0, 30.0]]], dtype=torch.float64)
    s1, s2 = math.sqrt(1 / 3) + 1e-6, 10 + 1e-6
    want = torch.tensor([[(2 / 3) / s1 - 0.5 * 10 / s2, (-1 / 3) / s1, (-1 / 3) / s1 + 0.5 * 10 / s2]],
                        dtype=torch.float64)
    torch.testing.assert_close(aggregate_rewards(values, [1.0, 0.5], "normalize_then_sum"), want)
    torch.testing.assert_close(aggregate_rewards(values, [1.0, 0.5]),
                               torch.tensor([[6.0, 10.0, 15.0]], dtype=torch.float64))
    # a function flat in a group contributes exactly 0 there; a NaN stays NaN only where it was
    flat = torch.tensor([[[0.1, 0.1, 0.1]], [[1.0, float("nan"), 0.0]]])
    out = aggregate_rewards(flat, None, "normalize_then_sum")
    # f2's valid values [1, 0]: mean .5, Bessel std sqrt(.5) -> z = +-.5 / sqrt(.5)
    assert out[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)
    assert math.isnan(out[0, 1].item())
    assert out[0, 2].item() == pytest.approx(-0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)
    with pytest.raises(ValueError, match="2 weights for 1 reward functions"):
        aggregate_rewards(values[:1], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown reward aggregation 'max'"):
        aggregate_rewards(values, None, "max")


def test_rollout_columns_and_invalid_fill():
    from grpo_lab.rewards.scoring import (
        ROLLOUT_COLUMNS,
        check_reward_columns,
        fill_invalid,
        overlong_penalty,
        reward_columns,
    )

    batch = [{"prompt": "1+1=", "answer": "2", "_line": 3, "completion_length": "stale"},
             {"prompt": "2+2=", "answer": "4"}]
    cols = reward_columns(batch, 2, completion_length=[1, 2, 3, 4], max_new_tokens=8)
    assert cols == {"answer": ["2", "2", "4", "4"], "completion_length": [1, 2, 3, 4],
                    "max_new_tokens": [8] * 4}
    # rollout columns are not query columns
    check_reward_columns([overlong_penalty], [{"prompt": "x"}], "q.jsonl")
    assert {"completion_length", "max_new_tokens", "overlong_buffer"} <= set(ROLLOUT_COLUMNS)
    r, invalid = fill_invalid(torch.tensor([[1.0, float("nan"), 0.0], [float("inf"), 2.0, 2.0]]))
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.5, 0.0], [2.0, 2.0, 2.0]]))
    assert invalid.tolist() == [[False, True, False], [True, False, False]]
