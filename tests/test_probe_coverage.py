"""The probe's per-point 95% intervals cover what they claim (issue 19, item 6), through the probe's own code.

(a) A Gaussian toy where the truth is known: two estimators sharing their noise (paired), K batches, the
    delta-method intervals (``snr_intervals``' default) cover the true SNR and SNR ratio about 95% of the
    time, while the BCa bootstrap the probe used before covers well above (too wide).
(b) The real probe on a fixed tiny policy: independent probes (different probe seeds) fall inside one
    probe's interval about 95% of the time (``precision.replicate_calibration``: each interval against the
    mean of the other probes). ``PROBE_COVERAGE_N`` probes (default 20); the figure in
    docs/ablations.md comes from ``PROBE_COVERAGE_N=60 .venv/bin/python -m pytest
    tests/test_probe_coverage.py -k tiny -s``.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from grpo_lab.probe.gram_stats import snr_intervals
from grpo_lab.probe.precision import replicate_calibration


def first_char_reward(completions, **_):
    """1 when the completion starts with one of a few characters: one sampled token decides it, so the tiny
    policy's gradient has a clear signal (per-batch SNR ~0.1) and the probe resolves it at small K."""
    return [float(c[:1] in "aeiou0123456789 ") for c in completions]


# ---- (a) the Gaussian toy -----------------------------------------------------------------------------
def _toy(d: int, k: int, reps: int, seed: int = 0):
    """Per repetition: does each method's interval cover the true SNR of a and the true ratio SNR_b/SNR_a,
    and its log width. g = μ + z A (per-batch SNR 0.1 for a), b's noise z B shares z with a's."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)  # [D, D]
    b = a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    mu_a = rng.normal(size=d)
    mu_a *= np.sqrt(0.1 * np.sum(a * a) / (mu_a @ mu_a))  # ‖μ‖² / tr Σ = 0.1, Σ = AᵀA
    mu_b = 0.8 * mu_a + 0.3 * rng.normal(size=d) * np.abs(mu_a).mean()
    snr_a, snr_b = mu_a @ mu_a / np.sum(a * a), mu_b @ mu_b / np.sum(b * b)
    out = {m: {"snr": [], "ratio": [], "width": []} for m in ("delta", "bca")}
    for _ in range(reps):
        z = rng.normal(size=(k, d))  # [K, D]
        ga, gb = mu_a + z @ a, mu_b + z @ b
        grams = {"a": ga @ ga.T, "b": gb @ gb.T}
        for m, res in out.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                iv = snr_intervals(grams, "a", method=m, n_resamples=499, seed=int(rng.integers(1 << 30)))
            res["snr"].append(iv["a"]["snr_lo"] <= snr_a <= iv["a"]["snr_hi"])
            res["ratio"].append(iv["b"]["snr_ratio_lo"] <= snr_b / snr_a <= iv["b"]["snr_ratio_hi"])
            res["width"].append(math.log(iv["b"]["snr_ratio_hi"] / iv["b"]["snr_ratio_lo"]))
    return out


def test_delta_intervals_cover_the_known_truth_and_bca_is_too_wide():
    reps = 300
    out = _toy(d=100, k=32, reps=reps)
    for key in ("snr", "ratio"):
        hits = int(np.sum(out["delta"][key]))
        # within a binomial tolerance of 0.95 (two-sided, 1%)
        assert sps.binomtest(hits, reps, 0.95).pvalue > 0.01, (key, hits, reps)
    bca_hits = int(np.sum(out["bca"]["ratio"]))
    assert sps.binomtest(bca_hits, reps, 0.95, alternative="greater").pvalue < 0.01, bca_hits
    assert np.mean(out["bca"]["width"]) > 1.15 * np.mean(out["delta"]["width"])


# ---- (b) the real probe on a tiny policy --------------------------------------------------------------
def probe_replicates(n: int, num_batches: int, prompts_per_batch: int) -> list[dict]:
    """``n`` independent probes (probe seeds 0..n−1) of one fixed tiny policy on one query pool."""
    import torch

    from grpo_lab.data.tasks import load_queries
    from grpo_lab.model.policy import PolicyConfig
    from grpo_lab.model.warmstart import WarmStartConfig
    from grpo_lab.module import GRPOModule
    from grpo_lab.probe.core import probe

    torch.manual_seed(0)
    module = GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2),
                        warm_start=WarmStartConfig(steps=0), num_generations=4, max_new_tokens=1,
                        rewards=["tests.test_probe_coverage:first_char_reward"])
    module.model.eval()
    queries = load_queries("arithmetic", 64, 0)
    return [probe(module, queries, ["mean_baseline", "group_norm", "reward"], num_batches=num_batches,
                  prompts_per_batch=prompts_per_batch, seed=seed, split=None, reference_estimator=None)
            for seed in range(n)]


@pytest.mark.slow
def test_tiny_probe_replicates_fall_inside_one_probes_interval():
    n, k, p = int(os.environ.get("PROBE_COVERAGE_N", "20")), 32, 4
    rows = probe_replicates(n, k, p)
    total = checks = 0
    for estimator, key in (("reward", "snr_ratio"), ("group_norm", "snr_ratio"), ("mean_baseline", "snr")):
        x, lo, hi = (np.log([r[estimator][f] for r in rows]) for f in (key, f"{key}_lo", f"{key}_hi"))
        c = replicate_calibration(x, lo, hi)
        print(f"{estimator} {key}: {c['hits']}/{c['n']} probes' intervals hold the others' mean; SD of the "
              f"log estimates {c['sd']:.4f}, RMS SE of the intervals {c['rms_se']:.4f} (K = {k} x {p})")
        total, checks = total + c["hits"], checks + c["n"]
        assert 0.25 < c["share"] < 4.0, (estimator, c)
    ci = sps.binomtest(total, checks).proportion_ci(0.95)
    print(f"together: {total}/{checks} = {total / checks:.3f} (binomial 95% CI {ci.low:.3f}-{ci.high:.3f})")
    assert sps.binomtest(total, checks, 0.947).pvalue > 0.01, (total, checks)


def test_replicate_calibration_by_hand():
    x = [0.0, 0.1, -0.1, 0.3]
    c = replicate_calibration(x, [v - 0.2 for v in x], [v + 0.2 for v in x])
    # the others' means: 0.1, 0.0667, 0.1333, 0.0 -> distances 0.1, 0.033, 0.233, 0.3: two within 0.2
    assert (c["hits"], c["n"]) == (2, 4)
    assert c["sd"] == pytest.approx(math.sqrt(0.0875 / 3))
    assert c["rms_se"] == pytest.approx(0.4 / (2 * sps.norm.ppf(0.975)))
    assert c["share"] == pytest.approx(c["rms_se"] ** 2 / c["sd"] ** 2)
