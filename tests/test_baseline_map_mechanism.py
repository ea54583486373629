"""The mechanism's closed form (grpo_lab/probe/mechanism.py) against an exactly solvable toy, and the
per-completion scores on a real rollout (grpo_lab/probe/scores.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

from grpo_lab.probe import probe
from grpo_lab.probe.baseline_map import Quadratics, point_map
from grpo_lab.probe.mechanism import c_terms, exact_variance, group_moments, predict, score_norm_ratio
from tests.test_variance import _module, _queries

# A softmax policy over 3 fixed completions: logits θ, π = softmax(θ), ∇_θ log π(k) = e_k − π.
THETA = np.array([0.3, -0.8, 0.5])
REWARD = np.array([1.0, 0.0, 0.0])  # completion 0 is the success


def _toy(offset: float = 0.0):
    pi = np.exp(THETA) / np.exp(THETA).sum()
    scores = np.eye(3) - pi  # [K, D]: row k is ∇log π(k)
    return pi, scores, REWARD + offset


def _exact_moments(pi, s, r) -> dict:
    q = (s * s).sum(1)
    p, p2, mu = pi @ r, pi @ r**2, (pi * r) @ s
    big_q = pi @ q
    return {"pC": p * (pi @ (r * q)), "p2Q": p2 * big_q, "ppQ": p * p * big_q, "M": float(mu @ mu),
            "D": pi @ (r * r * q), "Q": big_q}


def _enumerate(g: int, offset: float = 0.0):
    """Every outcome of G draws: (probability, rewards [G], scores [G, D])."""
    pi, s, r = _toy(offset)
    for outcome in itertools.product(range(3), repeat=g):
        idx = list(outcome)
        yield float(np.prod(pi[idx])), r[idx], s[idx]


def _estimate(r, s, c):  # X(c) = Σ_i (r_i − c·b̄₋ᵢ) s_i
    g = r.size
    loo = (r.sum() - r) / (g - 1)
    return ((r - c * loo)[:, None] * s).sum(0)


@pytest.mark.parametrize("g", [3, 4, 5])
def test_closed_form_variance_is_exact_on_the_toy(g):
    pi, s, r = _toy()
    m = _exact_moments(pi, s, r)
    for c in (-0.5, 0.0, 0.4, 1.0, 1.5):
        outcomes = [(w, _estimate(rr, ss, c)) for w, rr, ss in _enumerate(g)]
        mean = sum(w * x for w, x in outcomes)
        var = sum(w * float(x @ x) for w, x in outcomes) - float(mean @ mean)
        assert exact_variance(m, c, g) == pytest.approx(var, rel=1e-10)
        assert mean == pytest.approx(g * (pi * r) @ s)  # unbiased for every c


def test_group_moments_are_unbiased_on_the_toy():
    pi, s, r = _toy()
    exact = _exact_moments(pi, s, r)
    expected = dict.fromkeys(exact, 0.0)
    for w, rr, ss in _enumerate(4):
        for k, v in group_moments(rr, ss @ ss.T).items():
            expected[k] += w * v
    for k in exact:
        assert expected[k] == pytest.approx(exact[k], rel=1e-10, abs=1e-12), k


def test_c_star_approaches_one_under_a_large_reward_offset():
    pi, s, _ = _toy()
    stars = []
    for offset in (0.0, 1.0, 3.0, 100.0):
        b1, b2 = c_terms(_exact_moments(pi, s, REWARD + offset), 8)
        stars.append(b1 / b2)
    assert stars[-1] == pytest.approx(1.0, abs=0.01)
    assert all(abs(1 - a) > abs(1 - b) for a, b in zip(stars, stars[1:], strict=False))


def test_measured_c_star_from_sampled_batches_under_an_offset():
    """The cross-Gram's c* on sampled toy batches: near the closed form's, near 1 under a +3 offset."""
    rng = np.random.default_rng(0)
    pi, s, r = _toy(3.0)
    k, p, g = 400, 4, 8
    gr, gl = np.zeros((k, 3)), np.zeros((k, 3))
    for b in range(k):
        for _ in range(p):
            idx = rng.choice(3, size=g, p=pi)
            gr[b] += _estimate(r[idx], s[idx], 0.0)
            gl[b] += _estimate(r[idx], s[idx], 1.0)
    m = point_map(gr @ gr.T, gr @ gl.T, gl @ gl.T)
    b1, b2 = c_terms(_exact_moments(pi, s, r), g)
    assert m["c_star_lo"] < b1 / b2 < m["c_star_hi"]
    assert 0.8 < m["c_star"] < 1.05
    q = Quadratics(tuple(m["v"]), tuple(m["s"]))
    assert q.v_ratio(1.0) < 1.0  # under the offset the leave-one-out baseline lowers the variance


def test_predict_recovers_the_toy_quadratic_from_its_groups():
    """predict() averages the groups' U-statistics: with every outcome weighted by its probability it is
    the exact B₁, B₂ (here as a weighted mean over all outcomes of G = 4)."""
    pi, s, r = _toy()
    outcomes = list(_enumerate(4))
    w = np.array([o[0] for o in outcomes])
    preds = [predict([(rr, ss @ ss.T)], None, prompts=1, normalizer=1.0) for _, rr, ss in outcomes]
    b1 = sum(wi * pr["b1"] for wi, pr in zip(w, preds, strict=True))
    b2 = sum(wi * pr["b2"] for wi, pr in zip(w, preds, strict=True))
    e1, e2 = c_terms(_exact_moments(pi, s, r), 4)
    assert (b1, b2) == pytest.approx((4 * e1, 4 * e2), rel=1e-10)  # P·G/N² with P = N = 1


def test_score_norm_ratio_by_reward_midpoint():
    out = score_norm_ratio(np.array([[1.0, 1.0, -1.0, -1.0]]), np.array([2.0, 4.0, 9.0, 15.0]))
    assert out["score_norm_ratio"] == pytest.approx(12.0 / 3.0)
    assert math.isnan(score_norm_ratio(np.ones(4), np.ones(4))["score_norm_ratio"])


def test_probe_adds_the_mechanism_from_per_completion_scores():
    module = _module()
    out = probe(module, _queries(16), ["reward", "rloo"], num_batches=4, prompts_per_batch=4, seed=1,
                reference_estimator=None, split=None, n_resamples=50, score_prompts=2)
    mech = out["rloo"]["baseline_map"]["mechanism"]
    assert mech["prompts"] == 2 and mech["g"] == 4
    assert mech["seconds"] > 0
    for key in ("b1", "b2", "q_success", "v0_pred", "v1_ratio_pred"):
        assert math.isfinite(mech[key]), key
    without = probe(module, _queries(16), ["reward", "rloo"], num_batches=4, prompts_per_batch=4, seed=1,
                    reference_estimator=None, split=None, n_resamples=50)
    assert "mechanism" not in without["rloo"]["baseline_map"]
    assert without["rloo"]["baseline_map"]["v"] == out["rloo"]["baseline_map"]["v"]  # same batches


def test_per_completion_scores_match_single_completion_gradients():
    """The batched per-completion gradients equal each completion's own backward pass (token_mean: the
    score is Σ_t ∇log π(o_t))."""
    from grpo_lab.probe.core import frozen
    from grpo_lab.probe.scores import completion_scores
    from grpo_lab.rollout import sequence_logprobs

    module = _module()
    batch = _queries(2)
    with frozen(module, 5):
        sample = completion_scores(module, batch)
    with frozen(module, 5):
        rollout = module.rollout(batch)
        params = [p for p in module.model.parameters() if p.requires_grad]
        lp = sequence_logprobs(module.model, rollout, module.hparams.temperature)[0]
        total = (lp * rollout.completion_mask)[0].sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
        u0 = torch.cat([(torch.zeros(p.numel()) if gr is None else gr.flatten()) for gr, p in
                        zip(grads, params, strict=True)]).double()
    assert sample.gram[0, 0] == pytest.approx(float(u0 @ u0), rel=1e-4)


def test_the_callback_measures_scores_at_the_warm_start_only(tmp_path):
    from grpo_lab.probe.callback import GradientVarianceProbe

    module, queries = _module(), _queries(16)
    cb = GradientVarianceProbe(["reward", "rloo"], num_batches=4, prompts_per_batch=4, score_prompts=2,
                               split_column=None, n_resamples=50, cache_dir=str(tmp_path))
    later, _ = cb.measure(module, queries)  # outside the warm start: no scores
    assert "mechanism" not in later["rloo"]["baseline_map"]
    cb._score_now = 2  # what _maybe_probe sets at fraction 0
    start, hit = cb.measure(module, queries)
    assert not hit  # another cache entry than the point without scores
    assert start["rloo"]["baseline_map"]["mechanism"]["prompts"] == 2
