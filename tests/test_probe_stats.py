"""grpo_lab.probe.stats: the Gram-matrix statistics against the direct computation, by hand, and the
bootstrap's coverage where the truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grpo_lab.probe.stats import (
    GramAccumulator,
    gradient_statistics,
    gram_snr,
    gram_statistics,
    snr_intervals,
    u_statistic,
)

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


def test_bootstrap_ratio_interval_covers_the_truth():
    """Gaussian gradients with known mean and covariance, two estimators sharing their noise (paired):
    the 95% interval of SNR_b / SNR_a covers the true ratio in about 95% of 120 repetitions."""
    rng = np.random.default_rng(1)
    d, k, reps = 30, 64, 120
    a_cov = rng.normal(size=(d, d)) / np.sqrt(d)
    b_cov = a_cov + 0.7 * rng.normal(size=(d, d)) / np.sqrt(d)
    mu_a = rng.normal(size=d)
    mu_a *= np.sqrt(0.3 * np.trace(a_cov.T @ a_cov) / (mu_a @ mu_a))  # per-batch SNR 0.3
    mu_b = 0.8 * mu_a + 0.3 * rng.normal(size=d) * np.abs(mu_a).mean()
    truth = (mu_b @ mu_b / np.trace(b_cov.T @ b_cov)) / (mu_a @ mu_a / np.trace(a_cov.T @ a_cov))
    hits = finite = 0
    for _ in range(reps):
        z = rng.normal(size=(k, d))
        ga, gb = mu_a + z @ a_cov, mu_b + z @ b_cov
        iv = snr_intervals({"a": ga @ ga.T, "b": gb @ gb.T}, "a", n_resamples=499,
                           seed=int(rng.integers(1 << 30)))["b"]
        if np.isfinite(iv["snr_ratio_lo"]):
            finite += 1
            hits += iv["snr_ratio_lo"] <= truth <= iv["snr_ratio_hi"]
    assert finite >= 0.9 * reps
    assert 0.88 <= hits / finite <= 0.995, (hits, finite)
