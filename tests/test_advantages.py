"""Advantage estimators: hand-computed values, zero-spread groups, properties, registry, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.advantages import ADVANTAGES, available_advantages, compute_advantages, register_advantage

CENTERED = ["mean_baseline", "group_norm", "rloo", "batch_norm"]
EPS = 1e-6

# The shared hand-made [2, 4] example.
#   row 0 = [1, 0, 1, 0]: mean 0.5, deviations [+.5, -.5, +.5, -.5],
#           unbiased var = 4 * 0.25 / 3 = 1/3, std = sqrt(1/3) = 0.57735
#   row 1 = [3, 1, 0, 0]: mean 1.0, deviations [2, 0, -1, -1],
#           unbiased var = (4 + 0 + 1 + 1) / 3 = 2, std = sqrt(2) = 1.41421
R = [[1.0, 0.0, 1.0, 0.0], [3.0, 1.0, 0.0, 0.0]]


def rewards(dtype=torch.float64):
    return torch.tensor(R, dtype=dtype)


def test_reward_is_raw_reward():
    r = rewards()
    out = compute_advantages(r, "reward")
    assert torch.equal(out, r)
    # "reward" does not need a group: G = 1 is fine and still returns r unchanged.
    r1 = torch.tensor([[0.3], [0.7]])
    assert torch.equal(compute_advantages(r1, "reward"), r1)


def test_mean_baseline_by_hand():
    # r - group mean: row 0 mean 0.5, row 1 mean 1.0
    expected = torch.tensor([[0.5, -0.5, 0.5, -0.5], [2.0, 0.0, -1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(rewards(), "mean_baseline"), expected)


def test_group_norm_by_hand():
    # (r - mean) / (std + eps), std unbiased:
    #   row 0: +-0.5 / (sqrt(1/3) + eps) = +-0.866025  (= sqrt(3)/2)
    #   row 1: [2, 0, -1, -1] / (sqrt(2) + eps) = [1.414213, 0, -0.707106, -0.707106]
    s0, s1 = math.sqrt(1 / 3) + EPS, math.sqrt(2) + EPS
    expected = torch.tensor(
        [[0.5 / s0, -0.5 / s0, 0.5 / s0, -0.5 / s0], [2 / s1, 0.0, -1 / s1, -1 / s1]], dtype=torch.float64
    )
    torch.testing.assert_close(compute_advantages(rewards(), "group_norm"), expected)
    torch.testing.assert_close(
        expected[0, 0], torch.tensor(math.sqrt(3) / 2, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_group_norm_eps_is_added_to_std():
    # eps goes on the std, not the variance: row 0 with eps = 0.5
    #   0.5 / (sqrt(1/3) + 0.5) = 0.5 / 1.077350 = 0.464102   (sqrt(1/3 + 0.5) would give 0.547723)
    out = compute_advantages(rewards(), "group_norm", eps=0.5)
    assert out[0, 0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 0.5), rel=1e-9)
    assert out[0, 0].item() == pytest.approx(0.464102, abs=1e-6)


def test_rloo_by_hand():
    # A_i = r_i - mean of the other 3 rewards
    #   row 0: 1 - (0+1+0)/3 = 2/3 ; 0 - (1+1+0)/3 = -2/3
    #   row 1: 3 - (1+0+0)/3 = 8/3 ; 1 - (3+0+0)/3 = 0 ; 0 - (3+1+0)/3 = -4/3 (twice)
    expected = torch.tensor(
        [[2 / 3, -2 / 3, 2 / 3, -2 / 3], [8 / 3, 0.0, -4 / 3, -4 / 3]], dtype=torch.float64
    )
    torch.testing.assert_close(compute_advantages(rewards(), "rloo"), expected)


def test_batch_norm_by_hand():
    # numerator: r - group mean (as mean_baseline): [[.5, -.5, .5, -.5], [2, 0, -1, -1]]
    # denominator: std over all 8 rewards [1,0,1,0,3,1,0,0]: mean 6/8 = 0.75,
    #   squared deviations: 1 -> 0.0625 (x3), 0 -> 0.5625 (x4), 3 -> 5.0625
    #   sum = 0.1875 + 2.25 + 5.0625 = 7.5 ; unbiased var = 7.5/7 = 1.0714286 ; std = 1.0350983
    std = math.sqrt(7.5 / 7)
    assert std == pytest.approx(1.0350983, abs=1e-7)
    d = std + EPS
    expected = torch.tensor(
        [[0.5 / d, -0.5 / d, 0.5 / d, -0.5 / d], [2 / d, 0.0, -1 / d, -1 / d]], dtype=torch.float64
    )
    # i.e. [[0.483046, -0.483046, ...], [1.932182, 0, -0.966091, -0.966091]]
    # (2/1.0350983 = 1.932184, minus ~2e-6 from eps)
    torch.testing.assert_close(compute_advantages(rewards(), "batch_norm"), expected)
    assert expected[1, 0].item() == pytest.approx(1.932182, abs=1e-6)


@pytest.mark.parametrize("estimator", CENTERED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.3, 0.1, 1 / 3])
def test_zero_spread_group_is_exactly_zero(estimator, dtype, value):
    # 0.3, 0.1, 1/3 repeated do not average back to exactly themselves in floating point;
    # the advantage must still be exactly 0 (not 1e-8, not NaN from 0/0).
    r = torch.full((2, 3), value, dtype=dtype)
    out = compute_advantages(r, estimator)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(r))


@pytest.mark.parametrize("estimator", CENTERED)
def test_zero_spread_row_next_to_a_spread_row(estimator):
    # Row 0 is constant (0.3 x 3) -> exactly 0; row 1 has spread and gets nonzero advantages.
    r = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.0, 0.0]])
    out = compute_advantages(r, estimator)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(3))
    assert (out[1] != 0).all()


@st.composite
def binary_rewards(draw):
    p = draw(st.integers(1, 4))
    g = draw(st.integers(2, 16))
    bits = draw(st.lists(st.lists(st.integers(0, 1), min_size=g, max_size=g), min_size=p, max_size=p))
    return torch.tensor(bits, dtype=torch.float32)


@settings(max_examples=100, deadline=None)
@given(binary_rewards())
def test_group_norm_binary_rewards_properties(r):
    g = r.shape[1]
    a = compute_advantages(r, "group_norm")
    assert a.shape == r.shape
    assert torch.isfinite(a).all()
    # centred per group
    torch.testing.assert_close(a.mean(dim=1), torch.zeros(r.shape[0]), atol=1e-5, rtol=0)
    # With k of G correct (p = k/G), the correct ones get sqrt((1-p)(G-1)/(G p)), the wrong ones
    # -sqrt(p(G-1)/(G(1-p))); both are at most (G-1)/sqrt(G) in size (k = 1 resp. k = G-1).
    assert a.abs().max().item() <= (g - 1) / math.sqrt(g) + 1e-5


@st.composite
def one_odd_out(draw):
    p = draw(st.integers(1, 4))
    g = draw(st.integers(2, 16))
    positions = draw(st.lists(st.integers(0, g - 1), min_size=p, max_size=p))
    flip = draw(st.booleans())
    r = torch.zeros(p, g)
    r[torch.arange(p), torch.tensor(positions)] = 1.0
    if flip:  # exactly one wrong instead of exactly one right: same extreme by symmetry
        r = 1.0 - r
    return r, positions


@settings(max_examples=100, deadline=None)
@given(one_odd_out())
def test_group_norm_extreme_attained_with_exactly_one_correct(case):
    r, positions = case
    g = r.shape[1]
    a = compute_advantages(r, "group_norm")
    # e.g. G = 4, one correct: mean 1/4, dev 3/4, std = sqrt(4 * 1/4 * 3/4 / 3) = 1/2 -> 3/2 = (4-1)/sqrt(4)
    extreme = (g - 1) / math.sqrt(g)
    odd = a[torch.arange(r.shape[0]), torch.tensor(positions)].abs()
    torch.testing.assert_close(odd, torch.full_like(odd, extreme), rtol=1e-4, atol=0)


@pytest.mark.parametrize("g", [2, 3, 5, 8])
def test_rloo_is_rescaled_mean_baseline(g):
    # r_i - (S - r_i)/(G-1) = (G r_i - S)/(G-1) = G/(G-1) * (r_i - S/G)
    gen = torch.Generator().manual_seed(g)
    r = torch.rand(3, g, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        compute_advantages(r, "rloo"), g / (g - 1) * compute_advantages(r, "mean_baseline")
    )


def test_builtins_are_registered():
    names = available_advantages()
    assert isinstance(names, list)
    for name in ["reward", *CENTERED]:
        assert name in names
        assert name in ADVANTAGES


def test_unknown_estimator_lists_names():
    with pytest.raises(ValueError) as err:
        compute_advantages(rewards(), "no_such_estimator")
    msg = str(err.value)
    for name in available_advantages():
        assert name in msg


@pytest.mark.parametrize("estimator", CENTERED)
def test_group_estimators_reject_single_sample_groups(estimator):
    with pytest.raises(ValueError):
        compute_advantages(torch.tensor([[1.0], [0.0]]), estimator)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), ()])
@pytest.mark.parametrize("estimator", ["reward", *CENTERED])
def test_non_2d_input_rejected(shape, estimator):
    with pytest.raises(ValueError):
        compute_advantages(torch.zeros(shape), estimator)


def test_register_custom_estimator():
    name = "_test_max_baseline"

    def max_baseline(r, eps):
        return r - r.max(dim=1, keepdim=True).values

    try:
        returned = register_advantage(name)(max_baseline)
        assert callable(returned)
        assert name in ADVANTAGES
        assert name in available_advantages()
        # row 0 max 1 -> [0, -1, 0, -1]; row 1 max 3 -> [0, -2, -3, -3]
        expected = torch.tensor([[0.0, -1.0, 0.0, -1.0], [0.0, -2.0, -3.0, -3.0]], dtype=torch.float64)
        torch.testing.assert_close(compute_advantages(rewards(), name), expected)
        # needs_group defaults to True: G = 1 is rejected like the built-in group estimators
        with pytest.raises(ValueError):
            compute_advantages(torch.tensor([[1.0], [0.0]]), name)
    finally:
        ADVANTAGES.pop(name, None)
    assert name not in available_advantages()


def test_register_custom_estimator_without_group_and_eps_passthrough():
    name = "_test_eps_constant"

    @register_advantage(name, needs_group=False)
    def eps_everywhere(r, eps):
        return torch.full_like(r, eps)

    try:
        # eps is handed to the estimator; needs_group=False allows G = 1
        out = compute_advantages(torch.tensor([[1.0], [0.0]]), name, eps=0.25)
        torch.testing.assert_close(out, torch.full((2, 1), 0.25))
        out = compute_advantages(torch.tensor([[1.0, 0.0, 2.0]]), name, eps=0.125)
        torch.testing.assert_close(out, torch.full((1, 3), 0.125))
    finally:
        ADVANTAGES.pop(name, None)


def test_estimator_by_import_path_is_imported_only_from_that_path(tmp_path, monkeypatch):
    (tmp_path / "my_estimators_xyz.py").write_text(
        "from grpo_lab.advantages import register_advantage\n"
        "def median_baseline(rewards, eps):\n"
        "    return rewards - rewards.median(dim=-1, keepdim=True).values\n"
        "@register_advantage('_test_flat', needs_group=False)\n"
        "def flat(rewards, eps):\n"
        "    return rewards * 0 + 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="unknown advantage estimator 'median_baseline'"):
        compute_advantages(rewards(), "median_baseline")  # a bare name never searches modules
    try:
        r = torch.tensor([[1.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
        out = compute_advantages(r, "my_estimators_xyz:median_baseline")
        torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 0.0]]))
        # a plain function named by path is a group estimator: zero-spread groups get 0, G = 1 is rejected
        torch.testing.assert_close(compute_advantages(torch.ones(1, 3), "my_estimators_xyz:median_baseline"),
                                   torch.zeros(1, 3))
        with pytest.raises(ValueError, match="num_generations >= 2"):
            compute_advantages(torch.tensor([[1.0]]), "my_estimators_xyz:median_baseline")
        # a decorated function keeps its registration's needs_group when named by path
        torch.testing.assert_close(compute_advantages(torch.tensor([[1.0]]), "my_estimators_xyz:flat"),
                                   torch.tensor([[7.0]]))
    finally:
        ADVANTAGES.pop("_test_flat", None)
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        compute_advantages(r, "no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        compute_advantages(r, "my_estimators_xyz:missing")
