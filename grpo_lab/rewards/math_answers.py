"""Math rewards: the final answer checked symbolically with ``math-verify``, and a format reward.

- ``math_verify``: 1.0 when the completion's final answer equals the gold ``answer`` column as mathematics
  (``1/2`` = ``0.5`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``), else 0.0. The gold may be GSM8K's worked
  solution: the text after its last ``#### `` is the answer. In the completion the final answer is, in this
  order, the last ``<answer>…</answer>``, the text after the last ``####``, or the whole completion, where
  math-verify looks for ``\\boxed{…}`` and answer phrases before falling back to the last expression.
- ``format``: 1.0 when the completion is exactly ``<think>…</think><answer>…</answer>`` (whitespace around
  the blocks allowed), else 0.0.

Neither reward ever raises on a completion: text that cannot be parsed scores 0. math-verify bounds its
parsing and comparison with ``signal.alarm``, which works only in the main thread; elsewhere (a reward called
from a worker thread) the bound is switched off rather than failing. The package is the optional extra
``pip install -e .[math]``; it is imported on the first call, so importing this module never needs it.

``grpo_lab.rewards.scoring`` registers both under these names; this module imports nothing of grpo_lab, so the
import runs one way.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 5
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def final_answer_text(text: str) -> str:
    """The part of a completion that holds its final answer (see the module docstring)."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return text


def gold_text(answer: object) -> str:
    """The gold answer: the text after GSM8K's last ``####`` when present, else the whole ``answer``."""
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return text.strip()


def _math_verify():
    try:
        import math_verify
        import math_verify.errors  # noqa: F401  (TimeoutException, caught below)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the math_verify reward needs the math-verify package: pip install -e "
                                  "'.[math]'") from err
    return math_verify


def _timeout() -> int | None:
    """math-verify's signal-based bound in the main thread; none elsewhere (signal.alarm would fail there)."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str) -> tuple:
    """math-verify's parse of ``text`` (LaTeX, then plain expressions) as a tuple; () when nothing parses."""
    mv = _math_verify()
    if not text.strip():
        return ()
    try:
        return tuple(mv.parse(text, extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
                              parsing_timeout=_timeout()))
    except (Exception, mv.errors.TimeoutException):  # noqa: BLE001  (any parse failure scores 0)
        log.debug("math_verify: cannot parse %r", text, exc_info=True)
        return ()


@functools.lru_cache(maxsize=4096)
def _parsed_gold(text: str) -> tuple:
    return parse_answer(text)  # a query's G completions share its gold: parsed once


def answers_match(completion: str, answer: object) -> bool:
    """True when the completion's final answer equals ``answer`` as mathematics (math-verify's ``verify``)."""
    mv = _math_verify()
    gold, pred = _parsed_gold(gold_text(answer)), parse_answer(final_answer_text(completion))
    if not gold or not pred:
        return False
    try:
        return bool(mv.verify(list(gold), list(pred), timeout_seconds=_timeout()))
    except (Exception, mv.errors.TimeoutException):  # noqa: BLE001
        log.debug("math_verify: cannot compare %r with %r", completion, answer, exc_info=True)
        return False


def math_verify(completions: list[str], answer: list, **_) -> list[float]:
    """1.0 when the completion's final answer equals the ``answer`` column symbolically (math-verify)."""
    _math_verify()  # a missing package is a set-up error, not a 0 reward
    return [float(answers_match(c, a)) for c, a in zip(completions, answer, strict=True)]


def format_reward(completions: list[str], **_) -> list[float]:
    """1.0 for ``<think>…</think><answer>…</answer>`` and nothing else around it, else 0.0."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]
