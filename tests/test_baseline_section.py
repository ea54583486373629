"""The baseline map in summary.json and the report (ablations/report/baseline_section.py), from hand-made
probe rows."""

import math

import numpy as np
import pytest
import torch

from ablations.report.baseline_section import baseline_map_summary, pooled, report_lines
from ablations.report.runs import Run
from grpo_lab.probe.baseline_map import C_GRID, cross_gram, point_map


def _map(seed: int, noise: float) -> dict:
    gen = torch.Generator().manual_seed(seed)
    g_reward = torch.randn(12, 20, generator=gen, dtype=torch.float64) + 1.0
    g_rloo = 0.6 * g_reward + noise * torch.randn(12, 20, generator=gen, dtype=torch.float64)
    return point_map((g_reward @ g_reward.T).numpy(), cross_gram(g_reward, g_rloo),
                     (g_rloo @ g_rloo.T).numpy())


def _run(number: int, seed: int, fractions=(0.0, 1.0)) -> Run:
    rows = []
    for f in fractions:
        m = _map(1000 * seed + (0 if f == 0.0 else number), 0.3)
        m["mechanism"] = {"score_norm_ratio": 3.0 + seed, "c_star_pred": 0.5, "b1": 0.5 * m["v"][1],
                          "b2": 0.5 * m["v"][2], "oracle_ratio_pred": 0.9}
        rows += [{"fraction": f, "estimator": "reward", "snr": 0.1},
                 {"fraction": f, "estimator": "rloo", "snr": 0.1, "baseline_map": m}]
    return Run(number, {"seed": seed}, "rloo", seed, {"probe": rows})


def test_summary_pools_per_seed_then_over_seeds(tmp_path):
    runs = [_run(i, s) for i, s in enumerate((0, 1, 2))]
    out = baseline_map_summary(runs)
    assert out["c"] == list(C_GRID)
    assert len(out["v_ratio"]) == len(C_GRID)
    zero = C_GRID.index(0.0)
    assert out["v_ratio"][zero]["mean"] == pytest.approx(1.0)
    assert out["c_star"]["n"] == 3 and out["c_star"]["lo"] < out["c_star"]["mean"] < out["c_star"]["hi"]
    # c*: per seed the mean over the seed's points (warm start, end), then the t-interval over seeds
    per_seed = [np.mean([r["baseline_map"]["c_star"] for r in run.attrs["probe"] if "baseline_map" in r])
                for run in runs]
    assert out["c_star"]["mean"] == pytest.approx(np.mean(per_seed))
    assert out["score_norm_ratio"]["mean"] == pytest.approx(math.exp(np.mean(np.log([3.0, 4.0, 5.0]))))
    assert set(out["by_point"]) == {"0", "1"}
    # the predicted curve: 1 + (c²·b₂ − 2c·b₁)/v₀ with b = v/2 is 1 + (V(c)/V(0) − 1)/2 at every point
    one = C_GRID.index(1.0)
    assert out["v_ratio_pred"][zero]["mean"] == pytest.approx(1.0)
    assert out["v_ratio_pred"][one]["n"] == 3
    lines = report_lines({"baseline_map": out}, tmp_path)
    assert lines[0] == "## Baseline map"
    assert (tmp_path / "baseline_map.png").is_file()
    assert any(line.startswith("| warm start | 3 |") for line in lines)


def test_one_point_uses_its_own_jackknife_interval():
    m = _map(5, 0.3)
    out = pooled({0: [m]})
    assert out["interval"] == "jackknife"
    assert (out["c_star"]["lo"], out["c_star"]["hi"]) == (m["c_star_lo"], m["c_star_hi"])


def test_no_rloo_rows_no_map(tmp_path):
    run = Run(0, {"seed": 0}, "reward", 0, {"probe": [{"fraction": 0.0, "estimator": "reward"}]})
    assert baseline_map_summary([run]) is None
    assert report_lines({"baseline_map": None}, tmp_path) == []


def test_regimes_table_and_phase_diagram(tmp_path):
    from ablations.spaces import regimes
    runs = []
    for i, (g, coding) in enumerate((g, c) for g in (4, 16) for c in ("r", "r+3")):
        for seed in (0, 1):
            run = _run(10 * i + seed, seed, fractions=(0.0,))
            run.params = {"model.num_generations": g, "mix": "mixed", "coding": coding, "seed": seed}
            run.group = f"coding={coding}, mix=mixed, num_generations={g}"
            a, b = regimes.CODINGS[coding]
            run.attrs["overrides"] = {"model.reward_weights": [a, b]}
            run.attrs["curves"] = {"train/reward": [[0, a * 0.25 + b]]}
            for row in run.attrs["probe"]:  # distinct warm starts per cell (different rollouts)
                if "baseline_map" in row:
                    mech = row["baseline_map"]["mechanism"]
                    row["baseline_map"] = {**_map(100 * i + seed, 0.3), "mechanism": mech}
            runs.append(run)
    out = baseline_map_summary(runs)
    assert len(out["by_group"]) == 4
    cell = out["by_group"]["coding=r+3, mix=mixed, num_generations=16"]
    assert cell["params"]["coding"] == "r+3" and cell["success_rate"] == pytest.approx(0.25)
    lines = report_lines({"baseline_map": out}, tmp_path)
    assert "## Baseline map: regimes" in lines
    assert not any(line.startswith("| all points") for line in lines)  # cells differ: no pooled row
    assert sum(line.startswith("| 4 | mixed |") for line in lines) == 2
    assert (tmp_path / "baseline_regimes.png").is_file()


def test_a_trained_regimes_cell_gets_a_row_per_point_and_the_measured_oracle_is_pooled(tmp_path):
    runs = []
    for coding in ("r", "r+1"):
        for seed in (0, 1):
            run = _run(seed, seed)  # probed at the warm start and after training
            run.params = {"model.num_generations": 16, "mix": "easy", "coding": coding, "seed": seed}
            run.group = f"coding={coding}"
            a, b = (1.0, 1.0) if coding == "r+1" else (1.0, 0.0)
            run.attrs["overrides"] = {"model.reward_weights": [a, b]}
            run.attrs["curves"] = {"train/reward": [[0, 0.25 + b], [59, 0.5 + b]]}  # success 0.25 → 0.5
            for row in run.attrs["probe"]:
                if "baseline_map" in row:
                    row["baseline_map"]["oracle_ratio"] = 1.05 if seed == 0 else 1.1
            runs.append(run)
    out = baseline_map_summary(runs)
    cell = out["by_group"]["coding=r+1"]
    assert set(cell["by_point"]) == {"0", "1"}
    lines = report_lines({"baseline_map": out}, tmp_path)
    assert sum(line.startswith("| 16 | easy | r+1 | warm start | 0.25 |") for line in lines) == 1
    assert sum(line.startswith("| 16 | easy | r+1 | trained | 0.50 |") for line in lines) == 1
    assert (tmp_path / "baseline_regimes.png").is_file()
    assert out["oracle_ratio"]["mean"] == pytest.approx(math.sqrt(1.05 * 1.1))  # geometric over seeds
