"""Advantages as a center x scale pair: the old estimators as presets (bit-equal), every pair by hand, the
James-Stein shrinkage baseline and the gradient-weighted baseline."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.advantages import ADVANTAGES, compute_advantages, register_advantage
from tests.test_advantages import EPS, rewards


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
        "batch_norm": (r - r.mean(dim=-1, keepdim=True))
        / ((r.std() if r.numel() > 1 else r.new_zeros(())) + eps),
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
    assert torch.equal(compute_advantages(r, resolve_estimator("group_norm", scale="none")),
                       compute_advantages(r, "mean_baseline"))
    torch.testing.assert_close(compute_advantages(r, resolve_estimator("rloo", scale="group")),
                               cases[("leave_one_out", "group")])


def test_center_scale_errors():
    from grpo_lab.advantages import resolve_estimator

    with pytest.raises(ValueError,
                       match="unknown advantage center 'median'; known: batch, gradient_weighted, group, "):
        resolve_estimator("group_norm", center="median")
    with pytest.raises(ValueError, match="unknown advantage scale 'mad'; known: batch, group, mean, none"):
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
        assert torch.equal(compute_advantages(r, resolve_estimator("rloo", center, "none"))[0],
                           torch.zeros(3))
    for center in ("batch", "james_stein"):
        assert (compute_advantages(r, resolve_estimator("rloo", center, "none"))[0] != 0).all(), center
        assert torch.equal(compute_advantages(r, resolve_estimator("rloo", center, "group"))[0],
                           torch.zeros(3))
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
    # q2: others q0, q1: m = .75, v2 = .125, s2 = .0625 -> lam = 2/3 -> b = (1/3)*0 + (2/3)*.75 = .5
    #     -> A = [-.5, -.5]
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lam = 0.125 / (0.1875 + EPS)
    b1, b2 = (1 - lam) * 1 + lam * 0.25, (1 - lam) * 0 + lam * 0.75
    want = torch.tensor([[1.0, -1.0], [1 - b1, 1 - b1], [-b2, -b2]], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(r, "james_stein"), want)
    assert want[1, 0].item() == pytest.approx(0.5, abs=1e-5)


def _james_stein_loop(r, eps=EPS):
    """The official JSPO code's per-sample loop (arXiv 2511.03710), restated: other queries' statistics."""
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
    # r = [1, 0, 0], w = [1, 2, 3]: b_0 = (2*0 + 3*0)/5 = 0, b_1 = (1*1 + 3*0)/4 = .25,
    # b_2 = (1*1 + 2*0)/3 = 1/3
    r = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=w),
                               torch.tensor([[1.0, -0.25, -1 / 3]], dtype=torch.float64))
    # equal weights: RLOO; no weight anywhere: falls back to the unweighted leave-one-out mean (RLOO)
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=torch.ones_like(r)),
                               compute_advantages(r, "rloo"))
    torch.testing.assert_close(compute_advantages(r, "gradient_weighted", weights=torch.zeros_like(r)),
                               compute_advantages(r, "rloo"))
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
