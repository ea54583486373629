"""math_verify and format rewards on hand-written cases, and the GSM8K-style sample that ships with them."""

import ast
import json
import operator
import re
import threading

import pytest

from grpo_lab.rewards.math_answers import final_answer_text, format_reward, gold_text, math_verify
from grpo_lab.rewards.scoring import load_reward, score
from tests.conftest import ROOT

SAMPLE = ROOT / "examples" / "math_sample.jsonl"

CASES = [  # (completion, gold answer column, reward)
    ("0.5", "1/2", 1.0),
    (r"\frac{1}{2}", "0.5", 1.0),
    (r"so the answer is $\boxed{\frac{1}{2}}$", "0.5", 1.0),
    ("1/2", r"\frac{1}{2}", 1.0),
    ("1,000", "1000", 1.0),
    ("She has 1000 left.\n#### 1000", "So 1,000.\n#### 1,000", 1.0),
    ("<think>3 + 4 = 7</think><answer>7</answer>", "It is 3 + 4 = 7\n#### 7", 1.0),
    ("<think>the answer is 7</think><answer>8</answer>", "#### 7", 0.0),  # the tagged answer counts
    ("3 + 4 = 7 then 12 - 5 = 7\n#### 7", "#### 7", 1.0),
    ("#### 7.0", "7", 1.0),
    ("1/3", "1/2", 0.0),
    ("0.33", "1/3", 0.0),
    ("#### 71", "#### 7", 0.0),
    ("banana", "7", 0.0),
    ("", "7", 0.0),
    ("<answer></answer>", "7", 0.0),
    (r"\boxed{", "7", 0.0),
    (r"\frac{\frac{\frac{", "1/2", 0.0),
    ("}}}{{{$$$\\\\", "3", 0.0),
    ("7", "", 0.0),  # no gold: nothing can match
    ("7", "not a number", 0.0),
    ("\x00\x07 ünïcode ✓", "3", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), CASES)
def test_math_verify_hand_written_cases(completion, gold, expected):
    assert math_verify([completion], answer=[gold]) == [expected]


def test_math_verify_never_raises_and_works_outside_the_main_thread():
    """signal.alarm (math-verify's timeout) fails outside the main thread: the reward must still answer."""
    completions, golds, expected = zip(*CASES, strict=True)
    out, errors = [], []

    def work():
        try:
            out.append(math_verify(list(completions), answer=list(golds)))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and out == [list(expected)]


def test_format_reward():
    good = ["<think>a</think><answer>1</answer>",
            "  <think>\nlong\nthought\n</think>\n<answer> 2 </answer>\n"]
    bad = ["<answer>1</answer>", "<think>a</think>", "<think>a</think><answer>1</answer> trailing",
           "x<think>a</think><answer>1</answer>", "<think>a</think><answer>1", "",
           "<answer>1</answer><think>a</think>"]
    assert format_reward(good + bad) == [1.0] * len(good) + [0.0] * len(bad)


def test_answer_spans():
    assert gold_text("work\n#### 1,234\n") == "1,234" and gold_text(" 12 ") == "12"
    assert final_answer_text("<answer>a</answer> x <answer> b </answer>") == "b"
    assert final_answer_text("x #### 5\nmore") == "5"
    assert final_answer_text("just text") == "just text"


def test_registered_by_name_and_scored_with_weights():
    assert load_reward("math_verify") is math_verify and load_reward("format") is format_reward
    fns = [load_reward("math_verify"), load_reward("format")]
    r = score(fns, ["<think>x</think><answer>2</answer>", "2", "3"], {"answer": ["#### 2"] * 3}, [1.0, 0.5])
    assert r.tolist() == [1.5, 1.0, 0.0]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(expr: str) -> float:
    """Evaluate + - * / over numbers (parsed, never executed)."""
    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        raise ValueError(f"not arithmetic: {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def test_the_math_sample_is_gsm8k_layout_with_correct_arithmetic():
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    assert 50 <= len(rows) <= 100 and len({r["question"] for r in rows}) == len(rows)
    equation = re.compile(r"(\d[\d.]*(?:\s*[-+*/]\s*\d[\d.]*)+)\s*=\s*(\d[\d.]*)")
    for r in rows:
        assert set(r) == {"question", "answer"} and r["question"].endswith("?"), r
        steps, final = r["answer"].rsplit("\n#### ", 1)
        eqs = equation.findall(steps)
        assert eqs, r
        for lhs, rhs in eqs:
            assert _arith(lhs) == pytest.approx(float(rhs)), (lhs, rhs)
        assert re.fullmatch(r"\d+", final) and final in re.findall(r"\d+", steps), r
        assert math_verify([r["answer"]], answer=[r["answer"]]) == [1.0]  # its own worked answer scores 1
        assert math_verify([f"#### {int(final) + 1}"], answer=[r["answer"]]) == [0.0]


def test_a_runaway_expression_is_cut_by_the_timeout(monkeypatch):
    """9^9^9^9 would keep sympy busy for ever: math-verify's alarm (shortened here) ends it with reward 0."""
    import grpo_lab.rewards.math_answers as mr

    monkeypatch.setattr(mr, "TIMEOUT_SECONDS", 1)
    assert math_verify(["#### 9^9^9^9"], answer=["7"]) == [0.0]
