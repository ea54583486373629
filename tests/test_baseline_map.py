"""The baseline map (grpo_lab/probe/baseline_map.py): V(c), S(c) from the cross-Gram against the gradients
of A(c) itself."""

import math

import numpy as np
import pytest
import torch

from grpo_lab.advantages import compute_advantages, register_advantage
from grpo_lab.probe import probe
from grpo_lab.probe.baseline_map import (
    Quadratics,
    cross_gram,
    curve,
    jackknife_interval,
    point_map,
    quadratics,
)
from grpo_lab.probe.gram_stats import gradient_statistics
from tests.test_variance import _module, _queries

COEF = 0.3


@register_advantage("test_baseline_coef_0.3", needs_group=False)
def _coef(rewards, eps):  # [P, G] -> [P, G]: r_i − 0.3·b̄₋ᵢ (no zeroing of flat groups: linear in c)
    loo = (rewards.sum(-1, keepdim=True) - rewards) / (rewards.shape[-1] - 1)
    return rewards - COEF * loo


def _grams(a, b):
    return a.double() @ a.double().T, cross_gram(a, b), b.double() @ b.double().T


def test_quadratics_match_the_statistics_of_the_combined_gradients():
    gen = torch.Generator().manual_seed(0)
    k, d = 9, 40
    g_reward = torch.randn(k, d, generator=gen, dtype=torch.float64) + 0.5
    g_rloo = 0.4 * g_reward + torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.3 + 0.2
    r, x, ll = _grams(g_reward, g_rloo)
    q = quadratics(r.numpy(), x, ll.numpy())
    for c in (-0.5, 0.0, 0.3, 1.0, 1.5):
        direct = gradient_statistics(g_reward - c * (g_reward - g_rloo))
        assert q.variance(c) == pytest.approx(direct["variance"], rel=1e-9)
        assert q.signal(c) == pytest.approx(direct["signal"], rel=1e-9, abs=1e-9)
    grid = np.linspace(-0.5, 1.5, 2001)
    assert float(q.c_star) == pytest.approx(grid[np.argmin(q.variance(grid))], abs=1e-3)
    assert float(q.v_star_ratio) == pytest.approx(float(q.v_ratio(float(q.c_star))), rel=1e-9)


def test_point_map_jackknife_intervals_cover_the_point_and_curve_reads_it_back():
    gen = torch.Generator().manual_seed(1)
    g_reward = torch.randn(16, 30, generator=gen) + 1.0
    g_rloo = g_reward * 0.5 + torch.randn(16, 30, generator=gen) * 0.5
    r, x, ll = _grams(g_reward, g_rloo)
    m = point_map(r.numpy(), x, ll.numpy())
    for name in ("c_star", "v1_ratio", "v_star_ratio"):
        assert m[f"{name}_lo"] < m[name] < m[f"{name}_hi"]
    c = curve(m, (0.0, 1.0))
    assert c["v_ratio"][0] == pytest.approx(1.0)
    assert c["v_ratio"][1] == pytest.approx(m["v1_ratio"])
    assert m["v_star_ratio"] <= 1.0


def test_jackknife_of_the_mean_is_the_t_interval():
    x = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    loo = (x.sum() - x) / (len(x) - 1)
    lo, hi = jackknife_interval(float(x.mean()), loo)
    from scipy import stats as sps

    half = sps.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5)
    assert (lo, hi) == pytest.approx((x.mean() - half, x.mean() + half))


def test_the_family_is_linear_in_c_on_the_probes_own_batches():
    """On the probe's batches, the map from the reward/rloo cross-Gram gives A(0.3)'s own V and S."""
    module = _module()
    est = ["reward", "rloo", "test_baseline_coef_0.3"]
    out = probe(module, _queries(16), est, num_batches=6, prompts_per_batch=4, seed=3,
                reference_estimator=None, split=None, n_resamples=50)
    m = out["rloo"]["baseline_map"]
    q = Quadratics(tuple(m["v"]), tuple(m["s"]))
    assert q.variance(0.0) == pytest.approx(out["reward"]["variance"], rel=1e-4)
    assert q.variance(1.0) == pytest.approx(out["rloo"]["variance"], rel=1e-4)
    assert q.variance(COEF) == pytest.approx(out["test_baseline_coef_0.3"]["variance"], rel=1e-4)
    scale = abs(out["reward"]["signal"]) + abs(out["rloo"]["signal"])
    assert q.signal(COEF) == pytest.approx(out["test_baseline_coef_0.3"]["signal"], abs=1e-4 * scale)
    assert "baseline_map" not in out["reward"]


def test_rloo_is_exactly_the_c_equals_one_member():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # a flat group too
    loo = (r.sum(-1, keepdim=True) - r) / 3
    assert torch.allclose(compute_advantages(r, "rloo"), r - loo)
    assert torch.allclose(compute_advantages(r, "test_baseline_coef_0.3"), r - COEF * loo)
