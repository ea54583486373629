"""The controls of an ablation study: the reward of the positive control, and what a report says about both.

- Positive control: ``rewards: [exact_match, ablations.controls:constant]`` with ``reward_weights: [1, c]``
  shifts every reward by c. A baseline-free estimator (``reward``) then carries c·Σ∇log π of pure noise
  in every gradient; a centred one (``mean_baseline``, ``group_norm``, ``rloo``) is unchanged. Every such
  estimator must beat ``reward`` on gradient SNR, with an interval above ×1: *detected*.
- A/A control: two arms with identical settings and independent seed streams. Every interval that
  excludes no difference is a false positive; the report counts them (about 5% of the tests are expected
  at α = 0.05) and claims nothing.
"""

from __future__ import annotations

SHIFT_INVARIANT = ("mean_baseline", "group_norm", "rloo", "batch_norm")


def constant(completions: list[str], **_) -> list[float]:
    """1.0 for every completion: with a weight c, a constant shift r + c of the reward."""
    return [1.0] * len(completions)


def positive_line(detections: dict[str, dict]) -> str:
    """One sentence from ``{estimator: snr_ratio dict (mean, lo, hi, n)}`` of the centred estimators
    against ``reward`` under the shift."""
    if not detections:
        return "positive control: no probe rows of centred estimators and `reward` under the shift: not measured"
    parts = [f"{e} ×{d['mean']:.3g} [{d['lo']:.3g}, {d['hi']:.3g}]" for e, d in detections.items()]
    ok = all(d["lo"] > 1 for d in detections.values())
    n = min(d["n"] for d in detections.values())
    return (f"positive control {'DETECTED' if ok else 'NOT detected'}: gradient SNR against `reward` under the shift "
            f"({n} seeds): " + "; ".join(parts) + ("" if ok else " (an interval reaches ×1 or is n/a)"))


def aa_line(false_positives: list[str], tests: int) -> str:
    """One sentence from the A/A comparison's metrics whose interval excluded no difference."""
    expected = 0.05 * tests
    found = ", ".join(false_positives) if false_positives else "none"
    return (f"A/A control: {len(false_positives)} false positive(s) in {tests} tests at α = 0.05 "
            f"(≈{expected:.1f} expected by chance): {found}. No difference is claimed between identical arms.")
