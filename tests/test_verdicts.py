"""The verdict rule (ablations/report/verdicts.py): the tests against scipy.stats and by hand, Holm by
hand, the
degenerate cases, the family, the stopping rule, strict JSON, and the calibration at small size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from ablations import calibration
from ablations.report.judge import aa_control, judge, spike_in
from ablations.report.stats import differences, stein, stein_seeds
from ablations.report.summary import strict, write_summary
from ablations.report.verdicts import (
    equivalence_margin,
    family_verdicts,
    holm,
    margin,
    p_difference,
    p_equivalence,
    planned_seeds,
    seeds_needed,
    tost_power,
    verdict,
)
from ablations.runner.sequential import should_stop


def _p(values, log=False):
    return differences(dict(enumerate(values)), log=log)


def test_p_values_are_scipys_one_sample_t_tests():
    x = [0.013, -0.004, 0.021, 0.008, 0.017, -0.002, 0.011, 0.006]
    p = _p(x)
    assert p_difference(p) == pytest.approx(sps.ttest_1samp(x, 0.0).pvalue, rel=1e-9)
    lower = sps.ttest_1samp(x, -0.02, alternative="greater").pvalue
    upper = sps.ttest_1samp(x, 0.02, alternative="less").pvalue
    assert p_equivalence(p, 0.02) == pytest.approx(max(lower, upper), rel=1e-9)
    # TOST at α rejects exactly when the 90% interval lies inside ±margin
    lo90, hi90 = p.interval(0.90)
    for m in (0.01, 0.015, 0.02, 0.03):
        assert (p_equivalence(p, m) < 0.05) == (-m < lo90 and hi90 < m)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 4·0.005, 3·0.01, 2·0.03, max(0.06, 0.04) -> input order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # monotone: never below an earlier step's
    assert holm([0.9, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, math.nan, 0.02])  # NaN stays NaN and does not count in m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_the_four_verdicts_and_their_sizes():
    big = verdict(_p([0.10, 0.11, 0.09, 0.10, 0.12, 0.08]), 0.02)
    assert big.code == "holds" and big.size == "larger than the SESOI" and big.p < 1e-4
    assert verdict(_p([0.10, 0.11, 0.09, 0.10, 0.12, 0.08]), 0.02, higher_is_better=False).code == "opposite"
    # the issue's case: −0.0074 [−0.0137, −0.0010] with a SESOI of 0.02 is negligible, not "opposite" alone
    small = verdict(_p([-0.004, -0.012, -0.002, -0.010, -0.006, -0.013, -0.003, -0.009]), 0.02)
    assert small.code == "opposite" and small.size == "negligible" and "negligible" in small.text
    unclear = verdict(_p([0.01, 0.03, 0.02, 0.04, 0.0, 0.05]), 0.02)
    assert unclear.code == "holds" and unclear.size == "of unclear size"
    eq = verdict(_p([0.002, -0.003, 0.001, -0.001, 0.003, -0.002]), 0.02)
    assert eq.code == "equivalent" and "90% interval" in eq.text and eq.p_equiv < 0.05
    # the issue's other case: [−0.00006, +0.0272] reaches past the SESOI: cannot tell, never "no difference"
    wide_p = _p([0.013 + 0.01525 * (-1) ** i for i in range(8)])  # ≈ +0.013 [−0.0006, +0.0266]
    assert wide_p.lo < 0 < 0.02 < wide_p.hi
    wide = verdict(wide_p, 0.02)
    assert wide.code == "cannot tell" and wide.seeds_needed is not None and wide.seeds_needed >= 8
    assert f"about {wide.seeds_needed} seeds" in wide.text
    assert verdict(_p([0.1]), 0.02).code == "cannot tell"


def test_ratio_metrics_use_the_log_margin():
    p = _p([math.log(1.02) + 0.01 * (-1) ** i for i in range(8)], log=True)
    assert margin(p, 0.10) == pytest.approx(math.log(1.1))
    v = verdict(p, 0.10)
    assert v.code in ("equivalent", "holds") and "×1.02" in v.text and "±10%" in v.text


def test_degenerate_cases():
    same = verdict(_p([0.0] * 8), 0.02)  # two arms that train bit-identically
    assert same.code == "equivalent" and same.p == 1.0 and same.p_equiv == 0.0 and "±0 " not in same.text
    shifted = verdict(_p([0.05] * 8), 0.02)  # every seed the same nonzero difference
    assert shifted.code == "holds" and shifted.size == "larger than the SESOI"
    assert seeds_needed(0.0, 0.02, 8) == 8 and seeds_needed(math.nan, 0.02, 8) is None


def test_holm_changes_a_verdict_inside_the_family():
    x = [0.03, 0.01, 0.05, -0.01, 0.04, 0.02, 0.0, 0.03]  # p ≈ 0.02 alone
    p = _p(x)
    assert 0.01 < p_difference(p) < 0.05 and verdict(p, 0.5).code == "holds"
    fam = family_verdicts({k: (p, "m", True) for k in "abc"}, {"m": 0.5})  # 6 hypotheses
    assert all(v.code != "holds" for v in fam.values())
    assert all(v.p_adjusted == pytest.approx(min(1, 3 * p_difference(p))) for v in fam.values())


def test_judge_labels_the_family_and_the_controls():
    base = {"n": 8, "group": "g", "baseline": "b", "tests": 2}
    null = _p([0.001, -0.002, 0.0015, -0.001, 0.002, -0.0005, 0.0, 0.001])
    entries = {"g": ({**base, "kind": "comparison"}, {"auc_diff": (null, True), "lift_diff": (null, True)}),
               "aa": ({**base, "kind": "aa_control"}, {"auc_diff": (null, True), "lift_diff": (null, True)})}
    judge(entries, {"auc_diff": 0.02, "lift_diff": 0.03}, ("auc_diff",))
    g, aa = entries["g"][0], entries["aa"][0]
    assert g["verdicts"]["auc_diff"]["role"] == "primary"
    assert g["verdicts"]["lift_diff"]["role"] == "exploratory"
    assert g["verdict_text"]["lift_diff"].startswith("exploratory: ")
    assert aa["verdicts"]["auc_diff"]["role"] == "control" and aa_control(aa)["passed"]
    assert g["settled"] and g["precise"] and g["seeds_planned"] <= 8
    broken = {**aa, "verdict": {"auc_diff": "holds", "lift_diff": "equivalent"}}
    assert not aa_control(broken)["passed"] and aa_control(broken)["false_positives"] == ["auc_diff"]
    spike = spike_in(entries["aa"][1], {"auc_diff": 0.02, "lift_diff": 0.03})
    assert spike["passed"] and spike["effects"] == {"auc_diff": pytest.approx(0.04)}  # only spiked metrics
    noisy = _p([0.05, -0.06, 0.04, -0.05, 0.06, -0.04, 0.05, -0.06])  # too noisy to see 2 × 0.02
    assert not spike_in({"auc_diff": (noisy, True)}, {"auc_diff": 0.02})["passed"]


def test_tost_power_and_the_planned_margin():
    m = equivalence_margin(1.0, 8)
    assert tost_power(0.0, m, 1.0, 8) == pytest.approx(0.80, abs=1e-6)
    assert tost_power(m, m, 1.0, 8) == pytest.approx(0.05, abs=0.002)  # size at the margin ≈ α
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (20_000, 8))
    c = sps.t.ppf(0.95, 7) / math.sqrt(8)
    simulated = np.mean(np.abs(x.mean(1)) + c * x.std(1, ddof=1) < m)
    assert simulated == pytest.approx(0.80, abs=0.015)


def test_steins_two_stage_plan_and_test():
    first = _p([0.01, -0.01, 0.02, -0.02])  # SD ≈ 0.01826 over n0 = 4
    sd0 = float(np.std([0.01, -0.01, 0.02, -0.02], ddof=1))
    # n = ceil((t_{0.975, 3} · s0 / (SESOI / 2))²), by hand
    expected = math.ceil((sps.t.ppf(0.975, 3) * sd0 / 0.01) ** 2)
    assert planned_seeds(first, {0, 1, 2, 3}, 0.02) == stein_seeds(sd0, 4, 0.01, 4096) == expected
    assert stein_seeds(sd0, 4, 0.01, 20) == 20 and stein_seeds(0.0, 4, 0.01, 64) == 4  # capped; no spread
    shifted = _p([0.51, 0.49, 0.52, 0.48])  # the plan looks at the spread only, never the mean
    assert planned_seeds(shifted, {0, 1, 2, 3}, 0.02) == expected
    # Stein's test: mean over every seed, the first stage's SD and n0 - 1 df
    grown = _p([0.01, -0.01, 0.02, -0.02, 0.03, 0.0, 0.01, 0.02])
    s = stein(grown, {0, 1, 2, 3})
    assert s.df == 3 and s.sd == pytest.approx(sd0) and s.mean == pytest.approx(grown.mean)
    half = sps.t.ppf(0.975, 3) * sd0 / math.sqrt(8)
    assert (s.lo, s.hi) == pytest.approx((grown.mean - half, grown.mean + half))
    assert p_difference(s) == pytest.approx(2 * sps.t.sf(abs(grown.mean) * math.sqrt(8) / sd0, 3))
    assert stein(grown, set(range(8))) is grown  # a fixed-n study is its own t-test
    assert "Stein two-stage" in verdict(s, 0.02).text
    assert should_stop([], 8, 2, 64) == "every comparison has its planned seeds"
    assert should_stop(["x"], 8, 2, 64) is None and "max-seeds" in should_stop(["x"], 64, 2, 64)
    assert "failed" in should_stop(["x"], 8, 2, 64, gave_up=1)


def test_summary_json_is_strict(tmp_path):
    data = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": np.float64(2.5), "e": np.int64(3)}
    assert strict(data) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2.5, "e": 3}
    path = write_summary(data, tmp_path / "summary.json")

    def reject(name):
        raise ValueError(f"not strict JSON: {name}")

    assert json.loads(path.read_text(), parse_constant=reject)["a"] is None


def test_calibration_at_small_size(tmp_path):
    out = calibration.calibrate(reps=150, seed=1, only=["fixed_n", "equivalence", "sequential"])
    for name, r in out["procedures"].items():
        assert r["type1"] <= 0.05 + 3 * max(r["type1_mc_se"], 0.018), name  # 150 reps: SE ~ 0.018
        assert 0.6 <= r["power"] <= (1.0 if name == "sequential" else 0.97), name  # Stein's n grows
    assert out["procedures"]["sequential"]["mean_seeds"]["null"] > 8
    assert calibration.main(["--reps", "3", "--out", str(tmp_path / "c.json")]) == 2
