"""The report's statistics (against scipy, R and G*Power values and by hand), summary.json, the verdicts,
the controls' lines, and the markdown from synthetic studies."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats as sps

from ablations.report import summary as summ
from ablations.report.markdown import write_report
from ablations.report.stats import (
    differences,
    lift,
    mde,
    paired,
    paired_power,
    t_half_width,
    t_interval,
    t_test_power,
)
from ablations.report.verdicts import verdict
from ablations.spaces.space import SPACES

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- statistics --------------------------------------------------------------------------------------
def test_t_quantiles_match_the_tables():
    for df, expected in [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (1000, 1.962)]:
        assert t_half_width(1.0, df + 1) * math.sqrt(df + 1) == pytest.approx(expected, abs=1e-3)


def test_t_interval_by_hand():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])  # s = 1, n = 3: half-width 4.303 / sqrt(3)
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert mean - lo == pytest.approx(hi - mean)
    mean, lo, hi = t_interval([0.5, None, math.nan])  # one finite seed: the mean, CI n/a
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in t_interval([]))
    x = [0.3, 0.1, 0.45, 0.2, 0.33]
    assert t_interval(x)[1:] == pytest.approx(sps.t.interval(0.95, 4, loc=np.mean(x), scale=sps.sem(x)))


def test_power_matches_r_and_gpower():
    # R: power.t.test(n = 20, delta = 1) -> power = 0.8689528 (two-sample, sd 1: df 38, ncp = sqrt(20/2)).
    assert t_test_power(math.sqrt(10), 38) == pytest.approx(0.8689528, abs=1e-6)
    # G*Power, matched pairs, d_z = 0.5, alpha 0.05 two-sided: n = 34 gives power 0.8077775 (n = 33 < 0.8).
    assert paired_power(0.5, 1.0, 34) == pytest.approx(0.8077775, abs=1e-6)
    assert paired_power(0.5, 1.0, 33) < 0.8 < paired_power(0.5, 1.0, 34)


def test_minimum_detectable_effect():
    m = mde(1.0, 34)
    assert 0.48 < m < 0.5  # just below G*Power's d = 0.5 at n = 34 (power 0.808 > 0.8)
    assert paired_power(m, 1.0, 34) == pytest.approx(0.8, abs=1e-9)
    assert mde(3.0, 34) == pytest.approx(3 * m)  # linear in the spread
    z_limit = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert mde(1.0, 10_000) * 100 == pytest.approx(z_limit, rel=2e-3)
    assert mde(1.0, 3) > mde(1.0, 6) > mde(1.0, 12)
    assert math.isnan(mde(1.0, 1)) and math.isnan(mde(math.nan, 5)) and mde(0.0, 5) == 0.0


def test_paired_comparisons_and_verdicts():
    base = {s: 0.3 + 0.01 * s for s in range(6)}
    better = paired({s: v + 0.10 + 0.01 * (-1) ** s for s, v in base.items()}, base)
    assert better.n == 6 and better.mean == pytest.approx(0.10) and better.lo > 0
    assert verdict(better, 0.02).code == "holds" and verdict(better, 0.02).size == "larger than the SESOI"
    assert verdict(better, 0.02, higher_is_better=False).code == "opposite"
    noisy = paired({s: v + (0.2 if s % 2 else -0.19) for s, v in base.items()}, base)
    v = verdict(noisy, 0.02)
    assert v.code == "cannot tell" and "seeds would detect" in v.text and noisy.lo < 0 < noisy.hi
    assert v.seeds_needed > 6
    tight = paired({s: v + (0.001 if s % 2 else -0.001) for s, v in base.items()}, base)
    v = verdict(tight, 0.02)
    assert v.code == "equivalent" and "no difference beyond ±0.02" in v.text
    assert verdict(paired({0: 1.0}, {0: 0.0}), 0.02).code == "cannot tell"  # one pair
    doubled = differences({s: math.log(2.0) + 0.01 * (-1) ** s for s in range(6)}, log=True).as_dict()
    assert doubled["mean"] == pytest.approx(2.0, rel=1e-3) and doubled["lo"] > 1.9 and doubled["mde"] > 1
    # the non-positive pair is left out
    ratio = paired({0: 2.0, 1: 4.0, 2: -1.0}, {0: 1.0, 1: 2.0, 2: 1.0}, log=True)
    assert ratio.n == 2 and ratio.as_dict()["mean"] == pytest.approx(2.0)


def test_lift_by_hand():
    line = np.array([[s, s / 9] for s in range(10)])  # 0 .. 1; 10% = one point at each end
    assert lift(line) == pytest.approx(1.0)
    assert lift(np.array([[0, 0.2], [1, 0.2], [2, 0.4], [3, 0.6]]), fraction=0.5) == pytest.approx(0.3)
    assert math.isnan(lift(np.zeros((1, 2))))


# ---- synthetic studies -------------------------------------------------------------------------------
def _add(study, params, attrs, grid):
    dists = {k: IntDistribution(0, 2**31 - 1) if k == "seed" else CategoricalDistribution(grid[k])
             for k in params}
    study.add_trial(create_trial(state=TrialState.COMPLETE, params=params, distributions=dists,
                                 value=attrs.get("auc", 0.0), user_attrs=attrs))


def _attrs(rng, slope, seed, probe, hard_slope=0.0):
    steps = np.arange(100)
    reward = 0.3 + slope * steps + rng.normal(0, 0.02, len(steps))
    curves = {"train/reward": [[int(s), float(v)] for s, v in zip(steps, reward, strict=True)],
              "train/reward_hard": [[int(s), 0.05 + hard_slope * s] for s in steps],
              "train/reward_easy": [[int(s), float(v) + 0.2] for s, v in zip(steps, reward, strict=True)]}
    for d, off in [("easy", 0.2), ("hard", -0.2)]:
        curves[f"val/acc_sampled_{d}"] = [[49, 0.3 + off + 20 * slope], [99, 0.3 + off + 50 * slope]]
    return {"curves": curves, "probe": probe, "auc": float(reward.mean()), "wall_time_s": 60.0 + seed,
            "steps_to_threshold": 50 if slope > 0.0008 else None, "last_step": 99,
            "final": {"sampled": 0.3 + 50 * slope, "sampled_easy": 0.5, "sampled_hard": 0.1, "greedy": 0.4},
            "command": "python -m grpo_lab.cli fit ...", "logdir": f"runs/ablate/synthetic/{seed}"}


def _probe(snrs: dict, seed: int, fractions=(0.0, 0.5, 1.0), spread=0.1):
    return [{"step": int(f * 100), "fraction": f, "estimator": e, "snr": v * (1 + spread * seed),
             "cosine": 0.9, "variance": 1.0, "signal": v, "relative_variance": 1 / v, "mean_norm": 1.0,
             "hard_share": 0.02 * v / 0.1, "ratio_to": "reward", "snr_ratio": v / 0.1,
             "snr_ratio_lo": 0.8 * v / 0.1, "snr_ratio_hi": 1.2 * v / 0.1}
            for f in fractions for e, v in snrs.items()]


def _synthetic_study(storage: str, seeds=(0, 1, 2)) -> optuna.Study:
    """COMPLETE trials as the trial runner writes them: rloo learns faster and has a higher SNR than
    reward."""
    space = SPACES["default"]
    study = optuna.create_study(study_name="synthetic", storage=storage, direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(0)
    snrs = {"reward": 0.1, "rloo": 0.3, "group_norm": 0.25}  # every trial probes every estimator
    for est, slope in [("reward", 0.0005), ("rloo", 0.0010), ("group_norm", 0.0009)]:
        for seed in seeds:
            _add(study, {"model.advantage": est, "seed": seed}, _attrs(rng, slope, seed, _probe(snrs, seed)),
                 space.grid)
    return study


def test_summary_json_schema(tmp_path):
    study = _synthetic_study(f"sqlite:///{tmp_path / 's.db'}")
    study.set_user_attr("wall_s", 123.5)  # the runner's recorded wall time is what the summary gives
    write_report(study, tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["baseline"] == "reward" and s["study"] == "synthetic" and s["wall_s"] == 123.5
    assert set(s["groups"]) == {"reward", "rloo", "group_norm"}
    for g in s["groups"].values():
        assert g["n_seeds"] == 3
        for metric in ("lift", "auc", "final_acc", "hard_lift", "snr", "hard_share"):
            assert set(g[metric]) == {"mean", "lo", "hi"}
            assert g[metric]["lo"] <= g[metric]["mean"] <= g[metric]["hi"]
    assert set(s["comparisons"]) == {"rloo", "group_norm"}
    for c in s["comparisons"].values():
        assert c["kind"] == "comparison" and c["n"] == 3 and c["baseline"] == "reward"
        for metric in ("auc_diff", "snr_ratio", "lift_diff", "hard_lift_diff", "final_acc_diff",
                       "hard_share_diff"):
            assert {"mean", "lo", "hi", "mde", "n"} <= set(c[metric]) and metric in c["mde"]
            assert metric in c["verdict"]
    rloo = s["comparisons"]["rloo"]
    # SNR 0.3 vs 0.1 on every seed and point: ×3 exactly, no spread, so the interval is [3, 3] and it holds.
    assert rloo["snr_ratio"]["mean"] == pytest.approx(3.0) and rloo["verdict"]["snr_ratio"] == "holds"
    assert rloo["snr_ratio"]["probe_half_width"] == pytest.approx(0.2)
    assert rloo["snr_ratio"]["probe_points"] == 3 * (1 + 3 * 2)  # per seed: the warm start once, 3 trials x 2
    assert set(s["claims"]) == {"baselines_lower_variance", "group_credit_helps_hard_queries",
                                "advantages_speed_up_learning"}
    table = summ.readme_table(s)
    assert "| `rloo` | 3 |" in table and "×3" in table and "holds" in table


def test_snr_ratio_at_each_probe_point_alone(tmp_path):
    """rloo/reward is ×2 at the warm start and ×4 at every trial's end: the pooled ratio averages a seed's
    points on the log scale (the warm start once, the 3 trials' ends), each point alone keeps its own."""
    space = SPACES["default"]
    study = optuna.create_study(study_name="points", storage=f"sqlite:///{tmp_path / 's.db'}",
                                direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(0)
    for est in ("reward", "rloo", "group_norm"):
        for seed in (0, 1, 2):
            probe = (_probe({"reward": 0.1, "rloo": 0.2, "group_norm": 0.1}, seed, fractions=(0.0,))
                     + _probe({"reward": 0.1, "rloo": 0.4, "group_norm": 0.05}, seed, fractions=(1.0,)))
            _add(study, {"model.advantage": est, "seed": seed}, _attrs(rng, 0.001, seed, probe), space.grid)
    text = write_report(study, tmp_path / "out").read_text()
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    rloo, gn = s["comparisons"]["rloo"]["snr_ratio"], s["comparisons"]["group_norm"]["snr_ratio"]
    assert rloo["mean"] == pytest.approx(math.exp((math.log(2) + 3 * math.log(4)) / 4))
    assert set(rloo["by_point"]) == {"0", "1"}
    assert rloo["by_point"]["0"]["mean"] == pytest.approx(2.0) and rloo["by_point"]["0"]["n"] == 3
    assert rloo["by_point"]["1"]["mean"] == pytest.approx(4.0)
    assert rloo["by_point"]["1"]["lo"] == pytest.approx(4.0) == rloo["by_point"]["1"]["hi"]  # no spread
    assert gn["by_point"]["0"]["mean"] == pytest.approx(1.0)
    assert gn["by_point"]["1"]["mean"] == pytest.approx(0.5)
    assert "| rloo vs reward | ×2 [×2, ×2] (±0%, n = 3) | ×4 [×4, ×4] (±0%, n = 3) |" in text


def test_probe_noise_share_by_hand(tmp_path):
    """Each synthetic point's interval is [0.8, 1.2] x its ratio: a standard error of log(1.5) / (2 z) on the
    log scale; a seed's mean over n independent points has that squared over n."""
    from ablations.report.runs import load_runs, probe_variance_by_seed

    runs, _ = load_runs(_synthetic_study(f"sqlite:///{tmp_path / 's.db'}"))
    se2 = (math.log(1.5) / (2 * sps.norm.ppf(0.975))) ** 2
    every = probe_variance_by_seed(runs, "rloo", "reward")
    assert set(every) == {0, 1, 2}
    assert every[0] == pytest.approx(se2 / 7)  # the warm start once + 3 trials x (0.5, 1.0)
    assert probe_variance_by_seed(runs, "rloo", "reward", 1.0)[2] == pytest.approx(se2 / 3)
    assert probe_variance_by_seed(runs, "rloo", "group_norm") == {}  # the probe's ratios are to reward
    # variance across seeds of (0, 0.2, 0.4) is 0.04; the probe's mean variance 0.02: half of the spread
    assert summ.noise_share({0: 0.0, 1: 0.2, 2: 0.4}, {0: 0.01, 1: 0.01, 2: 0.04}) == pytest.approx(0.5)
    assert math.isnan(summ.noise_share({0: 0.1, 1: 0.1}, {0: 0.01, 1: 0.01}))  # no spread
    assert math.isnan(summ.noise_share({0: 0.1}, {0: 0.01}))  # one seed


def test_report_from_a_synthetic_study(tmp_path):
    study = _synthetic_study(f"sqlite:///{tmp_path / 's.db'}")
    text = write_report(study, tmp_path / "out").read_text()
    assert "| group | seeds |" in text and "| **rloo** | 3 |" in text and "| **reward** | 3 |" in text
    assert "## Paired comparisons" in text and "## Verdicts" in text and "## Controls" in text
    assert "(i) baselines lower gradient variance" in text and "holds: group_norm, rloo" in text
    assert "(ii) group-relative credit helps hard queries" in text
    assert "(iii) advantages speed up learning" in text
    assert "×3 [×3, ×3]" in text and "MDE" in text
    assert "same policies" in text and "unbiased" in text and "not run beside this study" in text
    assert "≥ 100 ± 0 (0/3 reached)" in text  # reward never reached the threshold: censored at its length
    for png in ("reward_curves.png", "easy_hard.png", "probe.png"):
        img = tmp_path / "out" / png
        assert img.stat().st_size > 20_000, png
        h, w = __import__("matplotlib.image").image.imread(img).shape[:2]
        assert h >= 400 and w >= 700


def test_report_with_one_seed_says_na(tmp_path):
    study = _synthetic_study(f"sqlite:///{tmp_path / 's.db'}", seeds=(0,))
    text = write_report(study, tmp_path / "out").read_text()
    assert "(CI n/a)" in text and "cannot tell with 1 pair" in text
    assert (tmp_path / "out" / "reward_curves.png").is_file()


def test_report_of_a_space_without_probe_compares_to_its_baseline(tmp_path):
    space = SPACES["objectives"]
    study = optuna.create_study(study_name="obj", storage=f"sqlite:///{tmp_path / 'o.db'}",
                                direction="maximize")
    study.set_user_attr("space", space.describe())
    for variant, auc in [("grpo", 0.30), ("constant", 0.35)]:
        for seed in (0, 1):
            curves = {"train/reward": [[s, auc] for s in range(10)]}
            _add(study, {"variant": variant, "seed": seed},
                 {"curves": curves, "auc": auc + 0.01 * seed, "final": {}}, space.grid)
    text = write_report(study, tmp_path / "out").read_text()
    assert "## Paired comparisons" in text and "| **constant** | grpo | 2 | +0.050 [+0.050, +0.050]" in text
    assert "SNR" not in text.split("## Paired")[0] and not (tmp_path / "out" / "probe.png").exists()


def test_report_of_an_empty_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}")
    assert "nothing to report" in write_report(study, tmp_path / "out").read_text()


def _controls_study(storage: str, seeds=(0, 1, 2, 3)) -> optuna.Study:
    """The controls as the trial runner writes them: under the shift `reward` has a far lower SNR than the
    centred estimators; the two rloo arms are draws of one distribution."""
    space = SPACES["controls"]
    study = optuna.create_study(study_name="controls", storage=storage, direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(1)
    snrs = {"reward": 0.01, "mean_baseline": 0.2, "group_norm": 0.22, "rloo": 0.2}
    for arm, slope in [("reward+3", 0.0002), ("rloo+3", 0.0009), ("rloo+3 (seeds+1000)", 0.0009)]:
        for seed in seeds:
            probe = _probe({e: v * rng.uniform(0.8, 1.25) for e, v in snrs.items()}, seed, (0.0, 1.0),
                           spread=0.0)
            _add(study, {"arm": arm, "seed": seed}, _attrs(rng, slope, seed, probe), space.grid)
    return study


def test_controls_detect_the_shift_and_claim_nothing_in_aa(tmp_path):
    study = _controls_study(f"sqlite:///{tmp_path / 'c.db'}")
    text = write_report(study, tmp_path / "ablate" / "controls").read_text()
    s = json.loads((tmp_path / "ablate" / "controls" / "summary.json").read_text())
    pos, aa = s["controls"]["positive"], s["controls"]["aa"]
    assert pos["passed"] and set(pos["snr_ratio_vs_reward"]) == {"mean_baseline", "group_norm", "rloo"}
    assert all(d["lo"] > 1 for d in pos["snr_ratio_vs_reward"].values())
    assert aa["tests"] >= 5 and aa["passed"] and aa["false_positives"] == []
    assert "positive control (reward shift +3) passed" in text and "A/A control passed" in text
    assert s["claims"] == {}  # no estimator claims in a controls study
    # Another study's report beside it quotes the controls.
    other = write_report(_synthetic_study(f"sqlite:///{tmp_path / 's.db'}"), tmp_path / "ablate" / "default")
    other = other.read_text()
    assert "(the full controls, study `controls`" in other and "reward shift +3) passed" in other


def test_the_readme_table_script(tmp_path, capsys):
    write_report(_synthetic_study(f"sqlite:///{tmp_path / 's.db'}"), tmp_path / "out")
    assert summ.main([str(tmp_path / "out" / "summary.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| group | seeds |") and "| `group_norm` | 3 |" in out and "wall" in out
    assert summ.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_snr_precision_by_hand(tmp_path):
    """The SNR ratios' relative half-widths, the widest of them, and --snr-precision's test on them."""
    from ablations.report.markdown import precision_sentence
    from ablations.runner.sequential import open_comparisons

    assert summ.relative_half_width({"mean": 2.0, "lo": 1.8, "hi": 2.2}) == pytest.approx(0.1)
    assert math.isnan(summ.relative_half_width({"mean": 2.0, "lo": None, "hi": None}))  # one seed
    ratio = lambda hw: {"mean": 1.0, "lo": 1 - hw, "hi": 1 + hw, "half_width": hw}  # noqa: E731
    a = {"snr_ratio": {**ratio(0.05), "by_point": {"0": ratio(0.08), "1": ratio(0.12)}}}
    b = {"snr_ratio": {**ratio(0.09), "by_point": {"0": ratio(0.02)}}}
    p = summ.snr_precision({"a": a, "b": b}, 0.10)
    assert p["met"] is False and p["widest"] == {"comparison": "a", "point": "1", "half_width": 0.12}
    assert summ.snr_precision({"a": a, "b": b}, 0.15)["met"] is True
    assert summ.snr_precision({"a": a}, None)["met"] is None
    # --snr-precision plans Stein's seeds from each ratio's first-stage SD: the widest point decides
    plan = {"snr_ratio": {"sd0": 0.05, "n0": 4, "by_point": {"0": {"sd0": 0.1, "n0": 4}}}}
    expected = math.ceil((sps.t.ppf(0.975, 3) * 0.1 / math.asinh(0.10)) ** 2)
    assert summ.precision_seeds(plan, 0.10, 4096) == expected == 11
    assert summ.precision_seeds(plan, 0.10, 8) == 8  # capped at --max-seeds
    one_seed = {"snr_ratio": {**ratio(math.nan), "by_point": {}}}
    assert summ.snr_precision({"b": b, "c": one_seed}, 0.5)["widest"]["comparison"] == "c"
    assert "none (under 2 seeds with a ratio) (c, pooled)" in precision_sentence(
        summ.snr_precision({"b": b, "c": one_seed}, 0.5))
    assert summ.snr_precision({}, 0.1) == {"target": 0.1, "widest": None, "met": None}
    assert precision_sentence(p) == (" Widest SNR-ratio interval: ±12.0% (a, at end); every SNR ratio, "
                                     "pooled and at each probe point, within ±10%: no.")
    # A study whose rloo/reward ratio is 3, 3.3, 3.6 on seeds 0-2 at every point: the half-width by hand.
    space = SPACES["default"]
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{tmp_path / 's.db'}",
                                direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(0)
    for est in ("reward", "rloo"):
        for seed in (0, 1, 2):
            probe = _probe({"reward": 0.1, "rloo": 0.3 * (1 + 0.1 * seed)}, 0, fractions=(0.0, 1.0))
            _add(study, {"model.advantage": est, "seed": seed}, _attrs(rng, 0.001, seed, probe), space.grid)
    logs = np.log(3 * (1 + 0.1 * np.arange(3)))
    half = math.sinh(sps.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3))  # (e^{m+h} − e^{m−h}) / 2e^m
    s = summ.build_summary(study, precision=0.10)
    rloo = s["comparisons"]["rloo"]["snr_ratio"]
    assert rloo["half_width"] == pytest.approx(half) == rloo["by_point"]["1"]["half_width"]
    assert s["snr_precision"]["met"] is (half <= 0.10) and s["snr_precision"]["target"] == 0.10
    study.set_user_attr("snr_precision", half + 0.01)  # kept on the study by --until-decisive
    assert summ.build_summary(study)["snr_precision"]["met"] is True
    loose = open_comparisons(study, summ.DEFAULT_MIN_EFFECT)
    assert "rloo" in open_comparisons(study, summ.DEFAULT_MIN_EFFECT, half - 0.01)
    assert open_comparisons(study, summ.DEFAULT_MIN_EFFECT, half + 0.01) == loose
