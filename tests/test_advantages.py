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
    # i.e. [[0.483046, -0.483046, ...], [1.932182, 0, -0.966091, -0.966091]]  (2/1.0350983 = 1.932184, minus ~2e-6 from eps)
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
        torch.testing.assert_close(compute_advantages(torch.ones(1, 3), "my_estimators_xyz:median_baseline"), torch.zeros(1, 3))
        with pytest.raises(ValueError, match="num_generations >= 2"):
            compute_advantages(torch.tensor([[1.0]]), "my_estimators_xyz:median_baseline")
        # a decorated function keeps its registration's needs_group when named by path
        torch.testing.assert_close(compute_advantages(torch.tensor([[1.0]]), "my_estimators_xyz:flat"), torch.tensor([[7.0]]))
    finally:
        ADVANTAGES.pop("_test_flat", None)
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        compute_advantages(r, "no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        compute_advantages(r, "my_estimators_xyz:missing")


# ---- center x scale: today's names are presets of the pair, with exactly today's values ------------------
def _old_formulas(r, eps=EPS):
    """The estimators as written before they became presets (copied), to check bit-for-bit equality."""
    g = r.shape[-1]
    mean, std = r.mean(dim=-1, keepdim=True), r.std(dim=-1, keepdim=True)
    return {
        "reward": r,
        "mean_baseline": r - r.mean(dim=-1, keepdim=True),
        "group_norm": (r - mean) / (std + eps),
        "rloo": r - (r.sum(dim=-1, keepdim=True) - r) / (g - 1),
        "batch_norm": (r - r.mean(dim=-1, keepdim=True)) / ((r.std() if r.numel() > 1 else r.new_zeros(())) + eps),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_presets_give_exactly_the_old_values(dtype):
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(5, 6, generator=gen, dtype=dtype)
    r[1] = 0.3  # a zero-spread group, zeroed by the group estimators as before
    r[3] = (r[3] > 0.5).to(dtype)
    for name, old in _old_formulas(r).items():
        if name != "reward":
            old = old.masked_fill((r.amax(-1) == r.amin(-1)).unsqueeze(-1), 0.0)
        assert torch.equal(compute_advantages(r, name), old), name


def test_presets_are_pairs():
    from grpo_lab.advantages import PRESETS

    assert PRESETS["group_norm"] == ("group", "group") and PRESETS["rloo"] == ("leave_one_out", "none")
    assert PRESETS["mean_baseline"] == ("group", "none") and PRESETS["batch_norm"] == ("group", "batch")
    for name, (center, scale) in PRESETS.items():
        est = ADVANTAGES[name]
        assert (est.center, est.scale) == (center, scale)


def test_center_and_scale_by_hand():
    from grpo_lab.advantages import resolve_estimator

    r = rewards()  # row 0 [1,0,1,0] mean .5 std sqrt(1/3); row 1 [3,1,0,0] mean 1 std sqrt(2); batch mean .75
    loo = torch.tensor([[1 / 3, 2 / 3, 1 / 3, 2 / 3], [1 / 3, 1.0, 4 / 3, 4 / 3]], dtype=torch.float64)
    group_std = torch.tensor([[math.sqrt(1 / 3)], [math.sqrt(2)]], dtype=torch.float64) + EPS
    batch_std = math.sqrt(7.5 / 7) + EPS
    cases = {
        ("leave_one_out", "group"): (r - loo) / group_std,  # RLOO scaled by the group's std
        ("batch", "none"): r - 0.75,  # REINFORCE with the batch mean as baseline
        ("batch", "batch"): (r - 0.75) / batch_std,  # REINFORCE++ / "batch_whiten"
        ("none", "group"): r / group_std,
        ("leave_one_out", "batch"): (r - loo) / batch_std,
    }
    for (center, scale), want in cases.items():
        got = compute_advantages(r, resolve_estimator("group_norm", center, scale))
        torch.testing.assert_close(got, want, msg=f"{center} x {scale}")
    torch.testing.assert_close(compute_advantages(r, "batch_whiten"), cases[("batch", "batch")])
    # replacing one half of a preset: group_norm without its scale is mean_baseline, rloo with a group scale
    assert torch.equal(compute_advantages(r, resolve_estimator("group_norm", scale="none")), compute_advantages(r, "mean_baseline"))
    torch.testing.assert_close(compute_advantages(r, resolve_estimator("rloo", scale="group")), cases[("leave_one_out", "group")])


def test_center_scale_errors():
    from grpo_lab.advantages import resolve_estimator

    with pytest.raises(ValueError, match="unknown advantage center 'median'; known: batch, gradient_weighted, group, "):
        resolve_estimator("group_norm", center="median")
    with pytest.raises(ValueError, match="unknown advantage scale 'mad'; known: batch, group, none"):
        resolve_estimator("group_norm", scale="mad")
    name = "_test_free_form"
    register_advantage(name)(lambda r, eps: r)
    try:
        with pytest.raises(ValueError, match="'_test_free_form' is not a center/scale preset"):
            resolve_estimator(name, scale="group")
    finally:
        ADVANTAGES.pop(name)


def test_flat_groups_under_each_center():
    """A zero-spread group is exactly 0 under a group-relative center or a per-group scale; a baseline that
    borrows from other groups (batch mean, James-Stein) keeps its signal."""
    from grpo_lab.advantages import resolve_estimator

    r = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    for center in ("group", "leave_one_out"):
        assert torch.equal(compute_advantages(r, resolve_estimator("rloo", center, "none"))[0], torch.zeros(3))
    for center in ("batch", "james_stein"):
        assert (compute_advantages(r, resolve_estimator("rloo", center, "none"))[0] != 0).all(), center
        assert torch.equal(compute_advantages(r, resolve_estimator("rloo", center, "group"))[0], torch.zeros(3))
    # batch center/scale need no group: G = 1 works
    single = torch.tensor([[1.0], [0.0], [0.5]])
    torch.testing.assert_close(compute_advantages(single, "batch_whiten"), (single - 0.5) / (0.5 + EPS))


# ---- James-Stein shrinkage baseline ------------------------------------------------------------------------
def test_james_stein_by_hand():
    # P = 3 queries, G = 2. Per query: mean mu, v = Bessel var / G:
    #   q0 [1, 0]: mu .5, v = .5/2 = .25     q1 [1, 1]: mu 1, v 0     q2 [0, 0]: mu 0, v 0
    # q0: others q1, q2: m = .5, v2 = 0, s2 = ((1-.5)^2 + (0-.5)^2)/2 = .25 -> lam = 0 -> b = RLOO = [0, 1]
    # q1: others q0, q2: m = .25, v2 = .125, s2 = ((.5-.25)^2 + (0-.25)^2)/2 = .0625 -> lam = .125/.1875 = 2/3
    #     b = (1/3)*RLOO(=1) + (2/3)*.25 = .5 -> A = [.5, .5]: a flat group keeps a signal
    # q2: others q0, q1: m = .75, v2 = .125, s2 = .0625 -> lam = 2/3 -> b = (1/3)*0 + (2/3)*.75 = .5 -> A = [-.5, -.5]
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lam = 0.125 / (0.1875 + EPS)
    b1, b2 = (1 - lam) * 1 + lam * 0.25, (1 - lam) * 0 + lam * 0.75
    want = torch.tensor([[1.0, -1.0], [1 - b1, 1 - b1], [-b2, -b2]], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(r, "james_stein"), want)
    assert want[1, 0].item() == pytest.approx(0.5, abs=1e-5)


def _james_stein_loop(r, eps=EPS):
    """The official JSPO code's per-sample loop (arXiv 2511.03710), restated: statistics of the other queries."""
    p, g = r.shape
    out = torch.empty_like(r)
    for q in range(p):
        others = [k for k in range(p) if k != q]
        mus = torch.stack([r[k].mean() for k in others])
        v2 = torch.stack([r[k].var() / g for k in others]).mean()
        s2 = ((mus - mus.mean()) ** 2).mean()
        lam = v2 / (v2 + s2 + eps)
        for i in range(g):
            loo = (r[q].sum() - r[q, i]) / (g - 1)
            out[q, i] = r[q, i] - ((1 - lam) * loo + lam * mus.mean())
    return out


@pytest.mark.parametrize("shape", [(2, 2), (4, 3), (6, 8)])
def test_james_stein_matches_the_loop_and_never_sees_its_own_reward(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    r = (torch.rand(*shape, generator=gen, dtype=torch.float64) > 0.5).double()
    torch.testing.assert_close(compute_advantages(r, "james_stein"), _james_stein_loop(r))
    # unbiased: b_{q,i} does not depend on r_{q,i}: the Jacobian's entries d b_{q,i} / d r_{q,i} are exactly 0
    from grpo_lab.advantages import james_stein_baseline

    jac = torch.autograd.functional.jacobian(james_stein_baseline, r).reshape(r.numel(), r.numel())
    assert torch.equal(jac.diagonal(), torch.zeros(r.numel(), dtype=torch.float64))
    assert jac.abs().sum() > 0


def test_james_stein_with_one_query_is_rloo():
    r = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.equal(compute_advantages(r, "james_stein"), compute_advantages(r, "rloo"))


# ---- gradient-weighted baseline ----------------------------------------------------------------------------
def test_gradient_weighted_by_hand():
    # r = [1, 0, 0], w = [1, 2, 3]: b_0 = (2*0 + 3*0)/5 = 0, b_1 = (1*1 + 3*0)/4 = .25, b_2 = (1*1 + 2*0)/3 = 1/3
    r = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=w),
                               torch.tensor([[1.0, -0.25, -1 / 3]], dtype=torch.float64))
    # equal weights: RLOO; no weight anywhere: falls back to the unweighted leave-one-out mean (RLOO)
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=torch.ones_like(r)), compute_advantages(r, "rloo"))
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=torch.zeros_like(r)), compute_advantages(r, "rloo"))
    with pytest.raises(ValueError, match="needs weights of shape"):
        compute_advantages(r, "gradient_weighted")


def test_gradient_weighted_baseline_ignores_its_own_reward_and_weight():
    from grpo_lab.advantages import gradient_weighted_baseline

    gen = torch.Generator().manual_seed(1)
    r = torch.rand(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = gradient_weighted_baseline(r, w)
    own = torch.zeros(3, 5, dtype=torch.float64)
    own[1, 2] = 1.0
    gr, gw = torch.autograd.grad((b * own).sum(), (r, w))
    assert gr[1, 2].item() == 0.0 and gw[1, 2].item() == 0.0 and gr[1].abs().sum() > 0


def test_logit_gradient_energy_by_hand_and_its_bound():
    from grpo_lab.advantages import logit_gradient_energy

    # tokens with probability .5 and .9, then padding: (1-.5)^2 + (1-.9)^2 = .26
    logp = torch.tensor([[math.log(0.5), math.log(0.9), -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    assert logit_gradient_energy(logp, mask).item() == pytest.approx(0.26, abs=1e-12)
    # the exact squared logit-gradient norm 1 - 2 pi + sum pi^2 lies in [1, 2] x (1 - pi)^2
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 7, generator=gen, dtype=torch.float64) * 2, dim=-1)
    tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    pi = probs.gather(-1, tok[:, None]).squeeze(-1)
    exact = 1 - 2 * pi + (probs**2).sum(-1)
    proxy = logit_gradient_energy(pi.log()[:, None], torch.ones(200, 1))
    assert (exact >= proxy - 1e-12).all() and (exact <= 2 * proxy + 1e-12).all()
