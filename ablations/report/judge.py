"""Verdicts for a whole study: the declared family under Holm, the exploratory rest, and the controls' pass
rules. ``summary.build_summary`` pairs the metrics (``summary.compare``); this file only judges them.

- The family (declared before any data, ``family_metrics``): in a study of advantage estimators against
  `reward`, the seed post's three claims (``verdicts.PRIMARY``: SNR ratio, hard-query lift, AUC) for every
  estimator; in any other study the metrics ``--until-decisive`` waits for (``DECIDING``). Holm adjusts
  the family's difference and equivalence p-values together; every other metric is *exploratory*.
- The A/A control (two arms with identical settings on independent seed streams) is its own family: it
  *passes* when Holm finds no difference on any of its metrics. Under a calibrated harness it fails with
  probability at most α = 0.05; a harness whose intervals are too narrow, or whose arms differ by more
  than their seeds, fails it.
- The positive control claims that *every* effect is found, an intersection–union test (Berger 1982): it
  holds at level α when each test is at α, with no adjustment (Holm is for claims that *any* effect is
  there). The full one (``--space controls``): a reward shift of +3 that every centred estimator must see
  through, *passed* when each one's paired SNR difference to `reward` is above 0 (p < α). The cheap one in
  a study with an A/A arm: a known effect of twice the SESOI is added to the A/A arm's per-seed values of
  each spiked metric (a spike-in: the real seed-to-seed noise, a known truth), *passed* when each one
  ``holds``; it fails where the study is too noisy to see effects of that size.
"""

from __future__ import annotations

from typing import Any

from ablations.report.runs import log_ratio_by_seed, snr_difference_by_seed
from ablations.report.stats import Paired, differences
from ablations.report.verdicts import (
    PRIMARY,
    Verdict,
    family_verdicts,
    p_difference,
    planned_seeds,
    settled,
    verdict,
)
from ablations.spaces.controls import SHIFT_INVARIANT, aa_line, positive_line, spike_line

DECIDING = ("auc_diff", "snr_ratio")  # what --until-decisive waits for
SPIKED = ("auc_diff", "hard_lift_diff")  # the cheap positive control's metrics
SPIKE_FACTOR = 2.0  # the spiked effect, in SESOIs


def family_metrics(estimator_study: bool) -> tuple[str, ...]:
    return PRIMARY if estimator_study else DECIDING


def judge(entries: dict[str, tuple[dict, dict[str, tuple[Paired, bool]]]], sesoi: dict[str, float],
          family: tuple[str, ...], first: set | None = None) -> None:
    """Fill every entry's ``verdict`` (code), ``verdict_text``, ``verdicts`` (p-values, Holm's, role),
    ``settled`` (no deciding metric is *cannot tell*), ``seeds_planned`` (the seeds the sequential rule
    plans from the first-stage seeds ``first``, default: every seed) and ``precise`` (n reached them), in
    place."""
    primary = {(label, m): (p, m, higher) for label, (out, tests) in entries.items()
               if out["kind"] == "comparison" for m, (p, higher) in tests.items() if m in family}
    judged: dict[tuple[str, str], Verdict] = family_verdicts(primary, sesoi)
    for label, (out, tests) in entries.items():
        if out["kind"] == "aa_control":
            judged.update(family_verdicts({(label, m): (p, m, h) for m, (p, h) in tests.items()}, sesoi))
    for label, (out, tests) in entries.items():
        out["verdict"], out["verdict_text"], out["verdicts"] = {}, {}, {}
        for m, (p, higher) in tests.items():
            v = judged.get((label, m)) or verdict(p, sesoi[m], higher)
            role = ("primary" if (label, m) in primary else
                    "control" if out["kind"] == "aa_control" else "exploratory")
            out["verdict"][m] = v.code
            out["verdict_text"][m] = v.text if role != "exploratory" else f"exploratory: {v.text}"
            out["verdicts"][m] = {**v.as_dict(), "role": role}
        deciding = [m for m in DECIDING if m in tests]
        out["settled"] = all(settled(out["verdict"][m]) for m in deciding)
        stage = first if first is not None else {k for p, _ in tests.values() for k in p.seeds}
        out["seeds_planned"] = max((planned_seeds(tests[m][0], stage, sesoi[m]) for m in deciding), default=0)
        out["precise"] = out["n"] >= out["seeds_planned"]


def aa_control(out: dict) -> dict[str, Any]:
    """The A/A comparison's pass rule: no metric with a difference (holds or opposite) under Holm."""
    found = [m for m, code in out["verdict"].items() if code in ("holds", "opposite")]
    return {"comparison": out["group"], "baseline": out["baseline"], "n": out["n"], "tests": out["tests"],
            "false_positives": found, "passed": not found}


def spike_in(tests: dict[str, tuple[Paired, bool]], sesoi: dict[str, float],
             metrics: tuple[str, ...] = SPIKED) -> dict[str, Any]:
    """The cheap positive control: the A/A comparison's per-seed differences with ``SPIKE_FACTOR`` × the
    SESOI added in the better direction; passed when every spiked metric holds (each at α: an
    intersection–union test)."""
    spiked = {}
    for m in metrics:
        if m not in tests or tests[m][0].n < 2:
            continue
        p, higher = tests[m]
        delta = SPIKE_FACTOR * sesoi[m] * (1 if higher else -1)
        spiked[m] = (differences(dict(enumerate(v + delta for v in p.values)), log=p.log), m, higher)
    found = {m: verdict(p, sesoi[m], higher) for m, (p, _, higher) in spiked.items()}
    lines = {m: v.text for m, v in found.items()}
    passed = bool(found) and all(v.code == "holds" for v in found.values())
    effects = {m: SPIKE_FACTOR * sesoi[m] for m in found}
    return {"kind": "spike-in", "factor": SPIKE_FACTOR, "effects": effects, "verdicts": lines,
            "passed": passed}


def shift_detected(diffs: dict[str, Paired]) -> tuple[bool, dict[str, float]]:
    """The full positive control's rule: every centred estimator's paired SNR difference to `reward` under
    the shift is above 0, each at α (an intersection–union test). Returns (passed, p per estimator)."""
    p = {e: p_difference(d) for e, d in diffs.items()}
    ok = bool(diffs) and all(p[e] < 0.05 and d.mean > 0 for e, d in diffs.items())
    return ok, p


def controls(by_group: dict, entries: dict, sesoi: dict[str, float]) -> dict[str, Any]:
    """The study's controls with their pass rules (``judge``): the A/A comparison, the full positive
    control (a reward shift, ``--space controls``) or, beside an A/A arm, the cheap spike-in one."""
    out: dict[str, Any] = {}
    for c, tests in entries.values():
        if c["kind"] == "positive_control":
            pool = by_group[c["group"]] + by_group[c["baseline"]]
            found = set.intersection(*(r.probe_estimators() for r in pool)) if pool else set()
            ests = [e for e in SHIFT_INVARIANT if e in found and "reward" in found]
            diffs = {e: differences(snr_difference_by_seed(pool, e, "reward")) for e in ests}
            ratio = {e: differences(log_ratio_by_seed(pool, e, "reward"), log=True).as_dict() for e in ests}
            passed, p = shift_detected(diffs)
            diff = {e: {**d.as_dict(), "p": p[e]} for e, d in diffs.items()}
            out["positive"] = {"kind": "shift", "comparison": c["group"], "snr_diff_vs_reward": diff,
                               "snr_ratio_vs_reward": ratio, "passed": passed,
                               "auc_diff": c["auc_diff"], "line": positive_line(diff, ratio, passed)}
        elif c["kind"] == "aa_control":
            out["aa"] = aa_control(c)
            out["aa"]["line"] = aa_line(out["aa"])
            if "positive" not in out:
                out["positive"] = spike_in(tests, sesoi)
                out["positive"]["line"] = spike_line(out["positive"], c["group"])
    return out
