"""The default study's controls and clipping check in its report: the A/A arm's pass rule, the spike-in
positive control, each arm's clipped share, and claim (iii) beside a clipping-off study."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from ablations.report.markdown import write_report
from ablations.report.stats import clip_stats
from ablations.spaces.space import SPACES

ARMS = {"reward": 0.30, "group_norm": 0.33, "rloo": 0.34, "rloo (A/A)": 0.34}  # AUC per arm


def _study(storage: str, space_name: str = "default", aa_shift: float = 0.0, seeds=range(8),
           effects=None) -> optuna.Study:
    space = SPACES[space_name]
    study = optuna.create_study(study_name=space_name, storage=storage, direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(3)
    arms = [a for a in (effects or ARMS) if a in space.grid["model.advantage"]]
    for arm in arms:
        for seed in seeds:
            auc = (effects or ARMS)[arm] + (aa_shift if arm == "rloo (A/A)" else 0.0) + rng.normal(0, 0.004)
            steps = np.arange(100)
            curve = [[int(s), float(auc)] for s in steps]
            attrs = {"auc": float(auc), "curves": {"train/reward": curve, "train/reward_hard": curve},
                     "final": {"sampled": float(auc)}, "last_step": 99, "steps_to_threshold": None,
                     "overrides": space.trial_overrides({"model.advantage": arm, "seed": seed}),
                     "grad_clip": clip_stats(rng.gamma(4, 0.33 if arm == "group_norm" else 0.15, 150), 1.0),
                     "probe": []}
            dists = {"model.advantage": CategoricalDistribution(space.grid["model.advantage"]),
                     "seed": IntDistribution(0, 2**31 - 1)}
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=float(auc), user_attrs=attrs,
                                         params={"model.advantage": arm, "seed": seed}, distributions=dists))
    return study


def test_clip_stats_by_hand():
    expected = {"median": 1.2, "clipped_share": 0.5, "max_grad_norm": 1.0}
    assert clip_stats([0.5, 1.5, 2.0, 0.9], 1.0) == expected
    assert clip_stats([0.5, 3.0], None)["clipped_share"] == 0.0  # no clipping
    assert math.isnan(clip_stats([], 1.0)["median"])


def test_the_aa_arm_passes_and_the_spike_in_is_found(tmp_path):
    text = write_report(_study(f"sqlite:///{tmp_path / 'd.db'}"), tmp_path / "ablate" / "default").read_text()
    s = json.loads((tmp_path / "ablate" / "default" / "summary.json").read_text())
    aa, pos = s["controls"]["aa"], s["controls"]["positive"]
    assert aa["passed"] and aa["false_positives"] == [] and aa["n"] == 8
    assert pos["kind"] == "spike-in" and pos["passed"]
    assert set(pos["effects"]) == {"auc_diff", "hard_lift_diff"}
    assert "A/A control passed" in text and "positive control (spike-in, the cheap one) passed" in text
    assert "the full controls were not run beside this study" in text
    assert "Population: initial policies and RL seeds" in text and s["population"].startswith("initial")
    # the A/A arm is a control: not in the family, not in the claims
    assert s["comparisons"]["A/A control: rloo (A/A) vs rloo"]["verdicts"]["auc_diff"]["role"] == "control"
    assert all("A/A" not in line for c in s["claims"].values() for line in c["lines"])
    # clipping: group_norm's norms sit above 1.0 far more often than reward's
    clip = s["clipping"]["groups"]
    assert clip["group_norm"]["clipped_share"]["mean"] > 0.5 > clip["reward"]["clipped_share"]["mean"]
    assert "## Clipping" in text and "not run beside this study" in text and s["clipping"]["depends"] is None


def test_a_broken_aa_arm_fails_the_control(tmp_path):
    s_dir = tmp_path / "ablate" / "default"
    text = write_report(_study(f"sqlite:///{tmp_path / 'd.db'}", aa_shift=0.02), s_dir).read_text()
    aa = json.loads((s_dir / "summary.json").read_text())["controls"]["aa"]
    assert not aa["passed"] and "auc_diff" in aa["false_positives"] and "A/A control FAILED" in text


def test_a_noisy_study_fails_the_spike_in(tmp_path):
    space_dir = tmp_path / "ablate" / "default"
    study = _study(f"sqlite:///{tmp_path / 'd.db'}", seeds=range(3))
    noisy = optuna.create_study(study_name="noisy", storage=f"sqlite:///{tmp_path / 'n.db'}")
    noisy.set_user_attr("space", SPACES["default"].describe())
    rng = np.random.default_rng(0)
    for t in study.get_trials():
        # far noisier per seed than the spiked effect of 2 x 0.02
        attrs = {**t.user_attrs, "auc": t.user_attrs["auc"] + float(rng.normal(0, 0.2))}
        noisy.add_trial(create_trial(state=TrialState.COMPLETE, value=attrs["auc"], user_attrs=attrs,
                                     params=t.params, distributions=t.distributions))
    write_report(noisy, space_dir)
    pos = json.loads((space_dir / "summary.json").read_text())["controls"]["positive"]
    assert not pos["passed"] and "FAILED" in pos["line"]


@pytest.mark.parametrize("unclipped_gain, depends", [(0.04, False), (-0.04, True)])
def test_claim_iii_beside_a_clipping_off_study(tmp_path, unclipped_gain, depends):
    root = tmp_path / "ablate"
    effects = {"reward": 0.30, "group_norm": 0.30 + unclipped_gain, "rloo": 0.34}
    write_report(_study(f"sqlite:///{tmp_path / 'n.db'}", "default_noclip", effects=effects),
                 root / "default_noclip")
    text = write_report(_study(f"sqlite:///{tmp_path / 'd.db'}"), root / "default").read_text()
    check = json.loads((root / "default" / "summary.json").read_text())["clipping"]
    assert check["auc_verdicts"]["group_norm"]["clipped"] == "holds"
    assert check["depends"] is depends
    assert ("The AUC verdict DEPENDS on clipping" in text) is depends
