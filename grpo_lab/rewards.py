"""Reward functions ``(completions: list[str], **columns) -> list[float]``, by name or by import path.

``columns`` are the query's other fields, one value per completion (a query's G completions repeat its
values G times), as in TRL. A reward is chosen in the config by registry name (``exact_match``) or by an
import path the user names (``my_package.my_module:my_reward``): code is imported only from such paths.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from grpo_lab.errors import UserError, UserRuntimeError
from grpo_lab.registry import lookup, registrar

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}


register_reward = registrar(REWARDS)  # @register_reward("name") on a (completions, **columns) -> list[float]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


@register_reward("exact_match")
def exact_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion (stripped) is exactly the ``answer`` column, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


@register_reward("numeric_match")
def numeric_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion's first line parses as the same number as ``answer`` (plain ``float``)."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        try:
            out.append(float(math.isclose(float(_first_line(c)), float(a), rel_tol=1e-9, abs_tol=1e-9)))
        except ValueError:
            out.append(0.0)
    return out


def load_reward(spec: str) -> RewardFn:
    """A registered reward by name, or ``package.module:function`` imported from the path the user named."""
    return lookup(REWARDS, spec, "reward")


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", repr(fn))


def required_columns(fn: RewardFn) -> set[str]:
    """The keyword columns a reward function needs (its parameters without defaults, after completions)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_reward_columns(fns: Sequence[RewardFn], rows: list[dict], source: str) -> None:
    """Fail before training when a query lacks a column a reward function needs (names the line for JSONL)."""
    for fn in fns:
        for col in sorted(required_columns(fn)):
            for i, row in enumerate(rows):
                if col not in row:
                    where = f"{source}:{row['_line']}" if "_line" in row else f"{source} (query {i})"
                    raise UserError(
                        f"reward function {reward_name(fn)!r} needs the column {col!r}, which {where} lacks; "
                        f"add it to every query or choose another reward"
                    )


def score(
    fns: Sequence[RewardFn],
    completions: list[str],
    columns: dict[str, list],
    weights: Sequence[float] | None = None,
    allow_invalid: bool = False,
) -> torch.Tensor:
    """Weighted sum of the reward functions, ``[B]`` float32; errors name the function and the cause.
    With ``allow_invalid`` a NaN/inf/non-number value becomes NaN in the result instead of an error."""
    weights = list(weights) if weights is not None else [1.0] * len(fns)
    total = torch.zeros(len(completions))
    for fn, w in zip(fns, weights, strict=True):
        name = reward_name(fn)
        try:
            values = fn(completions, **columns)
        except Exception as err:
            raise UserRuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise UserError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                if allow_invalid:
                    values[i] = math.nan
                    continue
                raise UserError(
                    f"reward function {name!r} returned {v!r} for completion {completions[i]!r}; rewards must be "
                    "finite numbers (or set model.invalid_rewards: drop to leave such completions out)"
                )
        total += w * torch.tensor([float(v) for v in values], dtype=torch.float32)
    return total
