"""Query sets: the built-in easy/hard arithmetic mixture and JSONL files, validated before training starts.

A query is a dict (:class:`Query`): ``prompt`` (the text the policy continues) plus any other columns, which
reward functions receive as keyword arguments (e.g. ``answer``, ``difficulty``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from grpo_lab.system.errors import UserError, UserFileNotFoundError
from grpo_lab.system.registry import registrar


class _Prompt(TypedDict):
    prompt: str
    """The text the policy continues (a JSONL line in GSM8K's layout gives it as ``question``)."""


class Query(_Prompt, total=False):
    """One query: a ``prompt`` and, optionally, the columns the built-in tasks and rewards use. A JSONL file
    may add any other column (a reward function receives it by name); at run time a query is a plain dict."""

    answer: str
    """The reference answer (``exact_match``, ``numeric_match``, ``math_verify`` and the warm start read
    it)."""
    difficulty: str
    """A label the metrics split by (``train/reward_<difficulty>``, ``val/acc_*_<difficulty>``)."""
    _line: int
    """The JSONL line the query came from (error messages name it)."""


TaskFn = Callable[[int, int], list[Query]]
TASKS: dict[str, TaskFn] = {}


register_task = registrar(TASKS, "task")  # @register_task("name") on fn(n, seed) -> list[query]


def arithmetic_query(a: int, b: int, difficulty: str) -> Query:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "difficulty": difficulty}


@register_task("arithmetic")
def arithmetic(n: int, seed: int, hard_fraction: float = 0.5) -> list[Query]:
    """``n`` additions: easy ones (one digit + one digit) and, with probability ``hard_fraction``,
    hard ones (two digits + two digits). The seed's easy-vs-hard motivation, made measurable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < hard_fraction:
            out.append(arithmetic_query(rng.randint(10, 99), rng.randint(10, 99), "hard"))
        else:
            out.append(arithmetic_query(rng.randint(0, 9), rng.randint(0, 9), "easy"))
    return out


@register_task("arithmetic_mostly_easy")
def arithmetic_mostly_easy(n: int, seed: int) -> list[Query]:
    """Three easy additions to one hard (``hard_fraction`` 0.25): the default ablation study's mixture. From a
    weak warm start the easy sums leave room to learn within a few hundred steps, and the hard ones keep the
    hard-query question (is group-relative credit worth more where successes are rare?) in the study."""
    return arithmetic(n, seed, hard_fraction=0.25)


@register_task("arithmetic_easy")
def arithmetic_easy(n: int, seed: int) -> list[Query]:
    """Only one-digit + one-digit additions."""
    return arithmetic(n, seed, hard_fraction=0.0)


def load_jsonl(path: str | Path) -> list[Query]:
    """One JSON object per line with a string ``prompt`` (or, GSM8K's layout, ``question``, which then is the
    prompt) and any other columns; blank lines are skipped.
    Errors name the file and the line. Plain ``json`` parsing only: no dataset text is ever evaluated."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"dataset file {path} does not exist")
    rows: list[Query] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be one JSON "
                                "object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if "prompt" not in row and isinstance(row.get("question"), str):  # GSM8K's layout
                row["prompt"] = row["question"]
            if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise UserError(f"{path}:{lineno}: missing a non-empty string field 'prompt' (or 'question')")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no queries; add one JSON object per line with a 'prompt' field")
    return rows


def load_queries(dataset: str, n: int, seed: int) -> list[Query]:
    """A built-in task by name (``n`` queries drawn with ``seed``) or every query of a ``.jsonl`` file."""
    if dataset in TASKS:
        return TASKS[dataset](n, seed)
    if dataset.endswith(".jsonl"):
        return load_jsonl(dataset)
    raise UserError(f"unknown dataset {dataset!r}: use a built-in task ({', '.join(sorted(TASKS))}) or a "
                    ".jsonl path")
