"""The controls of an ablation study: the reward of the positive control, and what a report says about both.

- Positive control: ``rewards: [exact_match, ablations.spaces.controls:constant]`` with ``reward_weights:
  [1, c]``
  shifts every reward by c. A baseline-free estimator (``reward``) then carries c·Σ∇log π of pure noise
  in every gradient; a centred one (``mean_baseline``, ``group_norm``, ``rloo``) is unchanged. Every such
  estimator must beat ``reward`` on gradient SNR: *passed* when every paired SNR difference (per seed,
  averaged over the probe points) is above 0, each at α (all must be found: no adjustment, ``judge``).
- A/A control: two arms with identical settings and independent seed streams: *passed* when Holm finds no
  difference on any metric (``judge.py``; the default study carries one, ``rloo (A/A)``, with the cheap
  spike-in positive control on it).
"""

from __future__ import annotations

SHIFT_INVARIANT = ("mean_baseline", "group_norm", "rloo", "batch_norm")

# The `controls` spaces (registered in spaces.py). The shift: exact_match + 3·constant. rloo is exactly
# shift-invariant, so the rloo arms train as without the shift while the probe, which measures all four
# estimators in every trial, sees `reward` under it. The A/A arm's seeds are shifted by 1000: other queries,
# data order and samples, paired with the first arm by seed value.
SHIFTED_REWARD = {"model.rewards": ["exact_match", "ablations.spaces.controls:constant"],
                  "model.reward_weights": [1.0, 3.0]}
SHIFTED_DENSE_REWARD = {"model.rewards": ["ablations.spaces.controls:length",
                                          "ablations.spaces.controls:constant"],
                        "model.reward_weights": [1.0, 3.0]}
# The default study's A/A arm: rloo again on seeds shifted by 1000, sharing each seed's warm start, trained
# without the probe (its comparison is on training metrics).
AA_ARM = {"model.advantage": "rloo", "seed_offset": 1000, "probe": False}
ARMS = {
    "reward+3": {"model.advantage": "reward"},
    "rloo+3": {"model.advantage": "rloo"},
    "rloo+3 (seeds+1000)": {"model.advantage": "rloo", "seed_offset": 1000},
}
COMPARISONS = (  # (label, group, baseline, kind) of ablations.spaces.space.Comparison
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


def positive_line(diffs: dict[str, dict], ratios: dict[str, dict], passed: bool) -> str:
    """One sentence from the centred estimators' paired SNR differences against ``reward`` under the shift
    (``{estimator: {mean, lo, hi, n, p}}``; passed when each is above 0 at α, ``judge``) and their
    SNR ratios (geometric means over seeds, where the SNRs were positive: under a large shift `reward`'s
    signal estimate is often ≤ 0 at a few batches, and its ratio undefined)."""
    if not diffs:
        return ("positive control (reward shift +3) FAILED: no probe rows of centred estimators and `reward` "
                "under the shift")
    n = min(d["n"] for d in diffs.values())

    def ratio(e: str) -> str:
        r = ratios.get(e, {})
        return f", ×{r['mean']:.3g} over {r['n']} seed(s)" if r.get("n") else ""

    parts = [f"{e} {d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] (p = {d['p']:.2g}){ratio(e)}"
             for e, d in diffs.items()]
    return (f"positive control (reward shift +3) {'passed' if passed else 'FAILED'}: gradient SNR minus "
            f"`reward`'s under the shift ({n} seeds): " + "; ".join(parts))


def aa_line(aa: dict) -> str:
    """One sentence from the A/A comparison's pass rule (``judge.aa_control``)."""
    found = ", ".join(aa["false_positives"]) or "none"
    return (f"A/A control {'passed' if aa['passed'] else 'FAILED'}: `{aa['comparison']}` against "
            f"`{aa['baseline']}` (identical settings, independent seeds, n = {aa['n']}), {aa['tests']} tests "
            f"under Holm at α = 0.05 (a calibrated harness fails this at most 5% of the time); differences "
            f"found: {found}.")


def spike_line(spike: dict, arm: str) -> str:
    """One sentence from the spike-in positive control (``judge.spike_in``)."""
    if not spike["verdicts"]:
        return f"positive control (spike-in) FAILED: no A/A metric with 2 seeds to spike ({arm})"
    effects = ", ".join(f"{m} +{e:g}" for m, e in spike["effects"].items())
    found = "; ".join(f"{m}: {t}" for m, t in spike["verdicts"].items())
    return (f"positive control (spike-in, the cheap one) {'passed' if spike['passed'] else 'FAILED'}: "
            f"effects of {spike['factor']:g}× the SESOI ({effects}) added to the A/A arm `{arm}` over its "
            f"real seed-to-seed noise must each be found: {found}. The full positive control (a "
            "reward shift) is `grpo-lab-ablate --space controls`.")
