import json

import pytest

from grpo_lab.data.tasks import arithmetic, arithmetic_mostly_easy, load_jsonl, load_queries


def test_arithmetic_mixture_is_seeded_and_correct():
    a, b = arithmetic(200, seed=3), arithmetic(200, seed=3)
    assert a == b and a != arithmetic(200, seed=4)
    kinds = {q["difficulty"] for q in a}
    assert kinds == {"easy", "hard"}
    for q in a:
        x, y = q["prompt"].rstrip("=").split("+")
        assert int(x) + int(y) == int(q["answer"])
        assert (len(x) == 1) == (q["difficulty"] == "easy")


def test_the_mostly_easy_mixture_is_one_hard_sum_in_four():
    qs = load_queries("arithmetic_mostly_easy", 4000, 5)
    assert qs == arithmetic_mostly_easy(4000, 5) == arithmetic(4000, 5, hard_fraction=0.25)
    hard = sum(q["difficulty"] == "hard" for q in qs) / len(qs)
    assert abs(hard - 0.25) < 0.03  # binomial sd at n = 4000: 0.007
    assert all(int(q["answer"]) == sum(map(int, q["prompt"].rstrip("=").split("+"))) for q in qs)


def test_jsonl_loads_extra_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "2+2=", "answer": "4", "level": 1}\n\n{"prompt": "hi", "answer": "x"}\n')
    rows = load_queries(str(p), 0, 0)
    assert [r["prompt"] for r in rows] == ["2+2=", "hi"] and rows[0]["level"] == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', r"d\.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}\n{"answer": "b"}\n', r"d\.jsonl:2: missing .*'prompt'"),
        ("\n\n", "holds no queries"),
        ("[1, 2]\n", r"d\.jsonl:1: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, text, match):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_jsonl(p)


def test_unknown_dataset_lists_tasks():
    with pytest.raises(ValueError, match="arithmetic"):
        load_queries("nope", 1, 0)


def test_jsonl_is_never_evaluated(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "__import__('os').system('false')"}) + "\n")
    assert load_jsonl(p)[0]["prompt"].startswith("__import__")
