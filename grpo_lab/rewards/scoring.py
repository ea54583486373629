"""Reward functions ``(completions: list[str], **columns) -> list[float]``, by name or by import path.

``columns`` are the query's other fields, one value per completion (a query's G completions repeat its
values G times), as in TRL, plus the rollout's own columns (``ROLLOUT_COLUMNS``: ``completion_length`` in
tokens including EOS, ``truncated``, and the settings ``max_new_tokens`` and ``overlong_buffer``). A reward
is chosen in the config by registry name (``exact_match``, ``numeric_match``, ``overlong_penalty``, and
``math_verify`` and ``format`` from ``math_rewards.py``) or by an import path the user names
(``my_package.my_module:my_reward``): code is imported only from such paths.

Several reward functions become one reward per completion by a ``reward_aggregation``
(``REWARD_AGGREGATIONS``): ``weighted_sum`` (Σ_k w_k·r_k, the default) or ``normalize_then_sum`` (GDPO,
arXiv 2601.05242; TRL ``multi_objective_aggregation``): each function's values are first normalized within
their group, (r_k − mean_G)/(std_G + eps), so a reward with a large range cannot drown the others.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from grpo_lab.rewards.math_answers import format_reward, math_verify
from grpo_lab.system.errors import UserError, UserRuntimeError
from grpo_lab.system.registry import lookup, registrar

RewardFn = Callable[..., list[float]]
AggregateRewardsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REWARDS: dict[str, RewardFn] = {}
REWARD_AGGREGATIONS: dict[str, AggregateRewardsFn] = {}
ROLLOUT_COLUMNS = ("completion_length", "truncated", "max_new_tokens", "overlong_buffer")
"""Columns the module adds to every reward call (one value per completion); a query column of that name is
replaced."""

# @register_reward("name") on a (completions, **columns) -> list[float]
register_reward = registrar(REWARDS, "reward")
# @register_reward_aggregation("name") on fn(values[K, P, G] (NaN = invalid), weights[K]) -> rewards[P, G]
register_reward_aggregation = registrar(REWARD_AGGREGATIONS, "reward aggregation")


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


@register_reward("overlong_penalty")
def overlong_penalty(completions: list[str], completion_length: list[int], max_new_tokens: list[int],
                     overlong_buffer: list[int], **_) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), L = ``max_new_tokens``,
    C = ``overlong_buffer``: 0 for |o| <= L − C, (L − C − |o|)/C in the last C tokens (down to −1 at
    |o| = L), −1 beyond. |o| counts the completion's tokens including EOS; a truncated completion has
    |o| = L and gets −1."""
    out = []
    for n, cap, buf in zip(completion_length, max_new_tokens, overlong_buffer, strict=True):
        free = cap - buf
        out.append(0.0 if n <= free else max(-1.0, (free - n) / buf))
    return out


# The math rewards live in math_rewards.py (math-verify is an optional extra) and know nothing of this
# registry: it registers them, so the import runs one way.
register_reward("math_verify")(math_verify)
register_reward("format")(format_reward)


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
        for col in sorted(required_columns(fn) - set(ROLLOUT_COLUMNS)):
            for i, row in enumerate(rows):
                if col not in row:
                    where = f"{source}:{row['_line']}" if "_line" in row else f"{source} (query {i})"
                    raise UserError(
                        f"reward function {reward_name(fn)!r} needs the column {col!r}, which {where} lacks; "
                        f"add it to every query or choose another reward"
                    )


def score_each(
    fns: Sequence[RewardFn], completions: list[str], columns: dict[str, list], allow_invalid: bool = False
) -> torch.Tensor:
    """Each reward function's values ``[K, B]`` float32; errors name the function and the cause.
    With ``allow_invalid`` a NaN/inf/non-number value becomes NaN instead of an error."""
    rows = []
    for fn in fns:
        name = reward_name(fn)
        try:
            values = fn(completions, **columns)
        except Exception as err:
            raise UserRuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise UserError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                            "completions")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                if allow_invalid:
                    values[i] = math.nan
                    continue
                raise UserError(
                    f"reward function {name!r} returned {v!r} for completion {completions[i]!r}; rewards "
                    "must be finite numbers (or set model.invalid_rewards: drop to leave such completions "
                    "out)"
                )
        rows.append(torch.tensor([float(v) for v in values], dtype=torch.float32))
    return torch.stack(rows) if rows else torch.zeros(0, len(completions))


@register_reward_aggregation("weighted_sum")
def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k·r_k ``[P, G]`` from values ``[K, P, G]``, summed in the order of the functions."""
    total = torch.zeros_like(values[0]) if len(values) else torch.zeros(0)
    for v, w in zip(values, weights.tolist(), strict=True):
        total += w * v
    return total


@register_reward_aggregation("normalize_then_sum")
def normalize_then_sum(values: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Σ_k w_k·(r_k − mean_G r_k)/(std_G r_k + eps) ``[P, G]``: each function normalized within the group
    first (Bessel's std; NaN values are left out of the statistics and stay NaN). A function whose values
    are equal in a group contributes exactly 0 there."""
    valid = ~torch.isnan(values)  # [K, P, G]
    n = valid.sum(-1, keepdim=True)  # [K, P, 1]
    filled = torch.where(valid, values, 0.0)
    mean = filled.sum(-1, keepdim=True) / n.clamp(min=1)
    var = (torch.where(valid, values - mean, 0.0) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    z = (values - mean) / (var.sqrt() + eps)  # [K, P, G]
    highest = torch.where(valid, values, -math.inf).amax(-1, keepdim=True)
    flat = highest == torch.where(valid, values, math.inf).amin(-1, keepdim=True)  # [K, P, 1]
    z = torch.where(flat & valid, 0.0, z)
    return weighted_sum(z, weights)


def aggregate_rewards(values: torch.Tensor, weights: Sequence[float] | None,
                      aggregation: str = "weighted_sum") -> torch.Tensor:
    """One reward per completion ``[P, G]`` from each function's values ``[K, P, G]`` (K functions)."""
    w = torch.tensor(list(weights) if weights is not None else [1.0] * values.shape[0], dtype=torch.float32)
    if w.numel() != values.shape[0]:
        raise UserError(f"reward_weights has {w.numel()} weights for {values.shape[0]} reward functions")
    return lookup(REWARD_AGGREGATIONS, aggregation, "reward aggregation")(values, w)


def reward_columns(batch: list[dict], g: int, **rollout: list | int) -> dict[str, list]:
    """The keyword columns of a reward call for the G completions of each query of ``batch``: the query's
    columns (not ``prompt`` nor private ``_`` keys) repeated G times, then the rollout's (a list per
    completion, or one value for all)."""
    own = [k for k in batch[0] if k != "prompt" and not k.startswith("_") and k not in rollout]
    columns = {k: [q[k] for q in batch for _ in range(g)] for k in own}
    columns.update({k: v if isinstance(v, list) else [v] * (g * len(batch)) for k, v in rollout.items()})
    return columns


def score_groups(fns: Sequence[RewardFn], batch: list[dict], completions: list[str], g: int, *,
                 weights: Sequence[float] | None = None, aggregation: str = "weighted_sum",
                 allow_invalid: bool = False, device: torch.device | str | None = None,
                 **rollout_columns: list | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, j_rewards, invalid)`` ``[P, G]`` for the G completions of each query of ``batch`` (rows
    b·G .. b·G+G−1 belong to query b): the functions combined by ``aggregation`` (what the advantage sees)
    and by their weighted sum (the reward R(o) of J(θ) = E[R(o)]: their mean, ``train/reward``, is J's
    estimate), an invalid value replaced by its group's mean
    (:func:`fill_invalid`), and where that happened. ``rollout_columns``: the rollout's own
    (``ROLLOUT_COLUMNS``)."""
    columns = reward_columns(batch, g, **rollout_columns)
    values = score_each(fns, completions, columns, allow_invalid).view(len(fns), len(batch), g)  # [K, P, G]
    values = values if device is None else values.to(device)
    rewards, invalid = fill_invalid(aggregate_rewards(values, weights, aggregation))
    if aggregation == "weighted_sum":
        return rewards, rewards, invalid
    j_rewards = fill_invalid(aggregate_rewards(values, weights))[0]
    return rewards, j_rewards, invalid


def fill_invalid(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``[P, G]`` with each non-finite value replaced by the mean of its group's finite values, and
    the ``[P, G]`` mask of those values (they then leave the loss: advantage ≈ 0 and no tokens)."""
    invalid = ~torch.isfinite(rewards)
    if not invalid.any():
        return rewards, invalid
    total = torch.where(invalid, 0.0, rewards).sum(-1, keepdim=True)  # [P, 1]
    valid_mean = total / (~invalid).sum(-1, keepdim=True).clamp(min=1)
    return torch.where(invalid, valid_mean, rewards), invalid


def score(
    fns: Sequence[RewardFn],
    completions: list[str],
    columns: dict[str, list],
    weights: Sequence[float] | None = None,
    allow_invalid: bool = False,
) -> torch.Tensor:
    """Weighted sum of the reward functions, ``[B]`` float32; errors name the function and the cause.
    With ``allow_invalid`` a NaN/inf/non-number value becomes NaN in the result instead of an error."""
    values = score_each(fns, completions, columns, allow_invalid)  # [K, B]
    return aggregate_rewards(values.unsqueeze(1), weights).squeeze(0)

