"""The controls of an ablation study: the reward of the positive control, and what a report says about both.

- Positive control: ``rewards: [exact_match, ablations.controls:constant]`` with ``reward_weights: [1, c]``
  shifts every reward by c. A baseline-free estimator (``reward``) then carries c·Σ∇log π of pure noise
  in every gradient; a centred one (``mean_baseline``, ``group_norm``, ``rloo``) is unchanged. Every such
  estimator must beat ``reward`` on gradient SNR: *detected* when every paired SNR difference (per seed,
  averaged over the probe points) has its 95% interval above 0.
- A/A control: two arms with identical settings and independent seed streams. Every interval that
  excludes no difference is a false positive; the report counts them (about 5% of the tests are expected
  at α = 0.05) and claims nothing.
"""

from __future__ import annotations

SHIFT_INVARIANT = ("mean_baseline", "group_norm", "rloo", "batch_norm")

# The `controls` spaces (registered in spaces.py). The shift: exact_match + 3·constant. rloo is exactly
# shift-invariant, so the rloo arms train as without the shift while the probe, which measures all four
# estimators in every trial, sees `reward` under it. The A/A arm's seeds are shifted by 1000: other queries,
# data order and samples, paired with the first arm by seed value.
SHIFTED_REWARD = {"model.rewards": ["exact_match", "ablations.controls:constant"],
                  "model.reward_weights": [1.0, 3.0]}
SHIFTED_DENSE_REWARD = {"model.rewards": ["ablations.controls:length", "ablations.controls:constant"],
                        "model.reward_weights": [1.0, 3.0]}
ARMS = {
    "reward+3": {"model.advantage": "reward"},
    "rloo+3": {"model.advantage": "rloo"},
    "rloo+3 (seeds+1000)": {"model.advantage": "rloo", "seed_offset": 1000},
}
COMPARISONS = (  # (label, group, baseline, kind) of ablations.spaces.Comparison
    ("positive control: rloo+3 vs reward+3", {"arm": "rloo+3"}, {"arm": "reward+3"}, "positive_control"),
    ("A/A control: rloo+3, independent seeds", {"arm": "rloo+3 (seeds+1000)"}, {"arm": "rloo+3"},
     "aa_control"),
)


def length(completions: list[str], **_) -> list[float]:
    """len(completion) / 4: a dense reward every group spreads on, so that the small ``controls_smoke``
    policy has a gradient signal the probe resolves in a few batches (``exact_match`` is almost always 0
    there)."""
    return [len(c) / 4 for c in completions]


def constant(completions: list[str], **_) -> list[float]:
    """1.0 for every completion: with a weight c, a constant shift r + c of the reward."""
    return [1.0] * len(completions)


def positive_line(diffs: dict[str, dict], ratios: dict[str, dict]) -> str:
    """One sentence from the centred estimators' paired SNR differences against ``reward`` under the shift
    (``{estimator: {mean, lo, hi, n}}``; detected when every interval is above 0) and their SNR ratios
    (geometric means over seeds, where the SNRs were positive: under a large shift `reward`'s signal
    estimate is often ≤ 0 at a few batches, and its ratio undefined)."""
    if not diffs:
        return ("positive control: no probe rows of centred estimators and `reward` under the shift: "
                "not measured")
    ok = all(d["lo"] > 0 for d in diffs.values())
    n = min(d["n"] for d in diffs.values())

    def ratio(e: str) -> str:
        r = ratios.get(e, {})
        return f", ×{r['mean']:.3g} over {r['n']} seed(s)" if r.get("n") else ""

    parts = [f"{e} {d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]{ratio(e)}" for e, d in diffs.items()]
    caveat = "" if ok else " (an interval reaches 0 or is n/a)"
    return (f"positive control {'DETECTED' if ok else 'NOT detected'}: gradient SNR minus `reward`'s under "
            f"the shift ({n} seeds): " + "; ".join(parts) + caveat)


def aa_line(false_positives: list[str], tests: int) -> str:
    """One sentence from the A/A comparison's metrics whose interval excluded no difference."""
    expected = 0.05 * tests
    found = ", ".join(false_positives) if false_positives else "none"
    return (f"A/A control: {len(false_positives)} false positive(s) in {tests} tests at α = 0.05 "
            f"(≈{expected:.1f} expected by chance): {found}. "
            "No difference is claimed between identical arms.")
