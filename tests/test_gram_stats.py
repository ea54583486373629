"""grpo_lab.probe.gram_stats and .intervals: the Gram-matrix statistics against the direct computation and by
hand; the U-statistic variance and the delta-method intervals by their parts (their coverage:
test_probe_coverage.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from grpo_lab.probe.gram_stats import (
    GramAccumulator,
    gradient_statistics,
    gram_snr,
    gram_statistics,
    snr_intervals,
    u_statistic,
)
from grpo_lab.probe.intervals import Linearized, jackknife_variance, u_mean, u_variance, u_variance_terms

HAND = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])  # K = 3 estimates of a D = 2 gradient


def test_gradient_statistics_by_hand():
    s = gradient_statistics(HAND, reference=torch.tensor([0.0, 1.0]))
    # mean ḡ = (2, 3), ‖ḡ‖² = 13; deviations (-1,-1), (1,-1), (0,2): Σ‖·‖² = 8, V = 8/2 = 4
    # S = 13 − 4/3 = 35/3; SNR = 35/12; cosine with (0, 1) = 3/√13; relative variance 4/13
    assert s["variance"] == pytest.approx(4.0) and s["signal"] == pytest.approx(35 / 3)
    assert s["snr"] == pytest.approx(35 / 12) and s["cosine"] == pytest.approx(3 / math.sqrt(13))
    assert s["mean_norm"] == pytest.approx(math.sqrt(13)) and s["relative_variance"] == pytest.approx(4 / 13)
    assert s["num_batches"] == 3 and gradient_statistics(HAND)["cosine"] is None
    assert gradient_statistics(HAND, torch.tensor([-4.0, -6.0]))["cosine"] == pytest.approx(-1.0)


def test_gram_statistics_equal_the_direct_ones_by_hand_and_at_random():
    # The signal is also the mean over pairs of different batches: (g1·g2 + g1·g3 + g2·g3)·2 / 6
    # = (7 + 12 + 16)/3 = 35/3, as above.
    gram = (HAND @ HAND.T).double().numpy()
    assert gram_statistics(gram)["signal"] == pytest.approx(35 / 3)
    torch.manual_seed(3)
    for k, d in [(3, 2), (7, 40), (20, 5)]:
        g = torch.randn(k, d, dtype=torch.float64) + 0.3
        direct, via = gradient_statistics(g), gram_statistics((g @ g.T).numpy())
        for key in ("variance", "signal", "snr", "mean_norm", "relative_variance", "num_batches"):
            assert via[key] == pytest.approx(direct[key], rel=1e-10), key
        assert gram_snr((g @ g.T).numpy(), np.ones(k)) == pytest.approx(direct["snr"], rel=1e-10)


def test_a_resample_counts_only_pairs_of_different_batches():
    """Drawing batch 0 twice and batch 1 once: the pairs of different batches are (0,1) twice each way, so
    S = g0·g1 and V = ‖g0 − g1‖²/2, as for the two batches alone."""
    g = torch.tensor([[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]], dtype=torch.float64)
    gram = (g @ g.T).numpy()
    # S = g0·g1 = 3; V = ‖(−2, −4)‖²/2 = 10; SNR = 0.3
    assert gram_snr(gram, np.array([2.0, 1.0, 0.0])) == pytest.approx(0.3)
    assert gram_snr(gram, np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]])) == pytest.approx([0.3, 0.3])


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="K >= 2"):
        gradient_statistics(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        gradient_statistics(torch.ones(3))
    with pytest.raises(ValueError, match="K >= 2"):
        gram_statistics(np.ones((1, 1)))
    zero = gradient_statistics(torch.zeros(4, 3), torch.ones(3))  # e.g. every group had zero spread
    assert zero["snr"] == 0.0 and zero["cosine"] == 0.0 and zero["relative_variance"] == 0.0
    same = gradient_statistics(torch.ones(4, 3))  # no noise, non-zero signal
    assert same["snr"] == math.inf and same["variance"] == 0.0
    assert gram_statistics(np.zeros((4, 4)))["snr"] == 0.0
    assert gram_statistics(np.ones((4, 4)))["snr"] == math.inf


def test_scale_changes_variance_but_not_snr_or_cosine():
    torch.manual_seed(1)
    grads, ref = torch.randn(5, 7) + 0.5, torch.randn(7)
    a, b = gradient_statistics(grads, ref), gradient_statistics(10 * grads, 10 * ref)
    assert b["variance"] == pytest.approx(100 * a["variance"])
    assert b["signal"] == pytest.approx(100 * a["signal"])
    for key in ("snr", "cosine", "relative_variance"):
        assert b[key] == pytest.approx(a[key])


def test_u_statistic_by_hand():
    a = [np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([1.0, 1.0])]
    b = [np.array([2.0, 1.0]), np.array([1.0, 1.0]), np.array([0.0, 3.0])]
    pairs = [a[i] @ b[j] for i in range(3) for j in range(3) if i != j]  # 1, 0, 2, 6, 3, 2
    assert sum(pairs) == 14.0  # = (Σa)·(Σb) − Σ a_i·b_i = (2,3)·(3,5) − (2 + 2 + 3) = 21 − 7
    same_batch = float(sum(x @ y for x, y in zip(a, b, strict=True)))
    assert u_statistic(float(sum(a) @ sum(b)), same_batch, 6) == 14 / 6


def test_accumulator_matches_the_direct_computation():
    """Per estimator: the Gram statistics, the noise-free cosine with the reference (pairs of different
    batches only) and both hard shares, against sums written out over the gradients."""
    torch.manual_seed(0)
    k, d = 6, 11
    mu = torch.randn(d)
    # b: another direction
    g = {"a": mu + torch.randn(k, d), "b": 2 * mu + 3 * torch.randn(d) + 3 * torch.randn(k, d)}
    h = {n: 0.4 * x + 0.2 * torch.randn(k, d) for n, x in g.items()}
    r = mu + 0.5 * torch.randn(k + 2, d)  # two reference-only batches after the K shared ones
    acc = GramAccumulator(["a", "b"], k)
    for i in range(k):
        acc.add({n: x[i] for n, x in g.items()}, {n: x[i] for n, x in h.items()}, r[i])
    for i in range(k, k + 2):
        acc.add_reference(r[i])
    stats = acc.statistics()
    g64, h64, r64 = ({n: x.double() for n, x in t.items()} for t in (g, h, {"r": r}))
    r64 = r64["r"]

    def u(x, y):  # mean of x_i·y_j over i != j, y may have extra rows
        total = sum(float(x[i] @ y[j]) for i in range(len(x)) for j in range(len(y)) if i != j)
        return total / (len(x) * (len(y) - 1))

    ref_signal = u(r64, r64)
    for n in ("a", "b"):
        direct = gradient_statistics(g64[n])
        for key in ("variance", "signal", "snr", "mean_norm"):
            assert stats[n][key] == pytest.approx(direct[key], rel=1e-6)
        cosine = u(g64[n], r64) / math.sqrt(u(g64[n], g64[n]) * ref_signal)
        assert stats[n]["cosine"] == pytest.approx(max(-1.0, min(1.0, cosine)), rel=1e-6)
        share = sum(float(h64[n][i] @ g64[n][i]) for i in range(k)) / sum(float(x @ x) for x in g64[n])
        assert stats[n]["hard_share"] == pytest.approx(share, rel=1e-6)
        assert stats[n]["hard_signal_share"] == pytest.approx(u(h64[n], g64[n]) / u(g64[n], g64[n]), rel=1e-6)
    assert -1 < stats["b"]["cosine"] < 0.9  # not clipped: the check above saw the formula
    assert stats["a"]["reference_snr"] == pytest.approx(ref_signal / gradient_statistics(r64)["variance"],
                                                        rel=1e-6)


def test_snr_intervals_pair_the_estimators_and_contain_the_point_estimate():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 8))
    ga, gb = 1.0 + z, 0.5 + z + 0.3 * rng.normal(size=(40, 8))
    grams = {"a": ga @ ga.T, "b": gb @ gb.T, "a2": (3 * ga) @ (3 * ga).T}
    iv = snr_intervals(grams, "a", n_resamples=500)
    snr = {n: gram_statistics(g)["snr"] for n, g in grams.items()}
    assert iv["b"]["snr_ratio"] == pytest.approx(snr["b"] / snr["a"]) and iv["b"]["ratio_to"] == "a"
    assert iv["b"]["snr_ratio_lo"] < iv["b"]["snr_ratio"] < iv["b"]["snr_ratio_hi"]
    assert iv["a"]["snr_lo"] < snr["a"] < iv["a"]["snr_hi"]
    assert iv["a"]["snr_ratio"] == 1.0 and iv["a2"]["snr_ratio"] == pytest.approx(1.0)  # scale-free
    # Pure noise: a signal estimate <= 0 is log SNR = -inf, so its ratio to a is 0 and the interval
    # still exists.
    noise = rng.normal(size=(40, 8))
    grams["n"] = noise @ noise.T
    if gram_statistics(grams["n"])["snr"] <= 0:
        iv = snr_intervals(grams, "a", n_resamples=500)["n"]
        assert iv["snr_ratio"] == 0.0 and iv["snr_ratio_lo"] == 0.0 and 0 < iv["snr_ratio_hi"] < 1


def test_u_variance_and_the_jackknife_are_the_sums_written_out():
    """Var̂ U = U² − (mean of h[i, j]·h[k, l] over ordered quadruples of different batches); the jackknife
    drops one batch at a time."""
    rng = np.random.default_rng(4)
    k = 6
    h = rng.normal(size=(k, k))
    h = h + h.T
    u = sum(h[i, j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
    quads = [h[i, j] * h[m, n] for i, j, m, n in itertools.permutations(range(k), 4)]
    assert u_variance(h) == pytest.approx(u**2 - np.mean(quads), rel=1e-10)
    assert u_variance(h + 5.0) == pytest.approx(u_variance(h), rel=1e-10)  # shift-invariant
    loo = np.array([u_mean(np.delete(np.delete(h, i, 0), i, 1)) for i in range(k)])
    assert jackknife_variance(h) == pytest.approx((k - 1) / k * ((loo - loo.mean()) ** 2).sum(), rel=1e-10)
    with pytest.raises(ValueError, match="K >= 4"):
        u_variance(h[:3, :3])


def test_u_variance_is_unbiased_and_the_jackknife_is_not():
    """h(x, y) = x·y with x ~ N(m, 1): Var U = (4(K − 2)ζ₁ + 2ζ₂) / (K(K − 1)), ζ₁ = m², ζ₂ = 1 + 2m².
    Over 4000 samples the unbiased estimate's mean is Var U within 3 Monte-Carlo SE; the jackknife's is
    above it (it counts the pair term ζ₂ about twice)."""
    rng = np.random.default_rng(5)
    k, m, reps = 8, 0.3, 4000
    exact = (4 * (k - 2) * m**2 + 2 * (1 + 2 * m**2)) / (k * (k - 1))
    x = rng.normal(m, 1.0, size=(reps, k))
    unbiased = np.array([u_variance(np.outer(r, r)) for r in x])
    jack = np.array([jackknife_variance(np.outer(r, r)) for r in x])
    assert abs(unbiased.mean() - exact) < 3 * unbiased.std() / np.sqrt(reps), (unbiased.mean(), exact)
    assert jack.mean() > exact + 3 * jack.std() / np.sqrt(reps), (jack.mean(), exact)


def test_delta_interval_by_its_parts():
    """The ratio's interval is exp(log ratio ± t_ν · SE) with SE² and ν those of the kernel difference;
    an estimator whose signal estimate is <= 0 gets a ratio of 0 with a linear-scale upper bound, and
    against it as the baseline, the inverted interval of the reciprocal ratio."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(24, 8))
    ga, gb = 1.0 + z, 0.5 + z + 0.3 * rng.normal(size=(24, 8))
    grams = {"a": ga @ ga.T, "b": gb @ gb.T}
    la, lb = Linearized(grams["a"]), Linearized(grams["b"])
    var, nu = u_variance_terms(lb.log - la.log)
    assert 1 <= nu <= 23 and var == pytest.approx(u_variance(lb.log - la.log))
    half = sps.t.ppf(0.975, nu) * math.sqrt(var)
    iv = snr_intervals(grams, "a")["b"]
    assert iv["snr_ratio"] == pytest.approx(lb.snr / la.snr)
    assert iv["snr_ratio_lo"] == pytest.approx(lb.snr / la.snr * math.exp(-half))
    assert iv["snr_ratio_hi"] == pytest.approx(lb.snr / la.snr * math.exp(half))
    noise = rng.normal(size=(24, 8))
    grams["n"] = noise @ noise.T
    assert gram_statistics(grams["n"])["snr"] <= 0  # this seed's pure noise has a signal estimate <= 0
    to_a, to_n = snr_intervals(grams, "a")["n"], snr_intervals(grams, "n")["a"]
    assert to_a["snr_ratio"] == 0.0 and to_a["snr_ratio_lo"] == 0.0 and to_a["snr_ratio_hi"] > 0
    assert to_n["snr_ratio"] == math.inf and to_n["snr_ratio_hi"] == math.inf
    assert to_n["snr_ratio_lo"] == pytest.approx(1 / to_a["snr_ratio_hi"])
    small = snr_intervals({n: g[:3, :3] for n, g in grams.items()}, "a")["b"]  # K = 3: no interval
    assert math.isfinite(small["snr_ratio"]) and math.isnan(small["snr_ratio_lo"])


def test_interval_methods_by_name():
    rng = np.random.default_rng(7)
    g = 1.0 + rng.normal(size=(12, 5))
    grams = {"a": g @ g.T, "b": (2 * g) @ (2 * g).T}
    bca = snr_intervals(grams, "a", method="bca", n_resamples=200)
    assert set(bca["b"]) == set(snr_intervals(grams, "a")["b"])  # one schema
    with pytest.raises(ValueError, match="unknown interval method 'jack'; known: 'delta', 'bca'"):
        snr_intervals(grams, "a", method="jack")
