import math
import sys
import types

import pytest
import torch

from grpo_lab.rewards import exact_match, load_reward, numeric_match, required_columns, score


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


def test_score_weights_and_columns():
    r = score([exact_match, lambda completions, **_: [0.5] * len(completions)], ["1", "2"], {"answer": ["1", "1"]}, [2.0, 1.0])
    torch.testing.assert_close(r, torch.tensor([2.5, 0.5]))
    assert required_columns(exact_match) == {"answer"}


@pytest.mark.parametrize(
    ("values", "match"),
    [([1.0], "returned 1 values for 2 completions"), ([1.0, math.nan], "returned nan"), ([1.0, "x"], "returned 'x'"), ([math.inf, 0.0], "returned inf")],
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
