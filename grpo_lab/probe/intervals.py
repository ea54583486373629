"""Per-point intervals of SNR and of the paired SNR ratio: the delta method with the unbiased variance of
a U-statistic, from the K×K Gram matrices of the batches' gradients. Pure math, O(K²) per estimator.

**The statistics are U-statistics.** With M[k, l] = g_k·g_l and off-diagonal kernels (k ≠ l)

    hs[k, l] = M[k, l]                                  S = U(hs) = Σ_{k≠l} hs[k, l] / (K(K − 1))
    hv[k, l] = (M[k, k] + M[l, l]) / 2 − M[k, l]        V = U(hv) = Σ_{k≠l} ‖g_k − g_l‖² / (2K(K − 1))

S and V (``stats.py``) are means of a kernel over the pairs of different batches.

**Delta method.** log SNR = log S − log V moves, to first order, as U(hs)/S − U(hv)/V: a U-statistic of
the kernel hs/S − hv/V (the coefficients at the estimates). A paired log ratio of estimators e and b on the
same batches is the U-statistic of the kernel difference (``Linearized.log`` of e minus b's), so the noise
the two share cancels pair by pair.

**The variance of a U-statistic, unbiased.** For a symmetric kernel h of two batches and U its mean over
the K(K − 1) ordered pairs, E[U²] = Var U + θ² with θ = E h, and θ² has an unbiased estimate, the mean of
h[i, j]·h[k, l] over the ordered quadruples of four *different* batches. With row sums r_k = Σ_l h[k, l]:

    P = Σ_{k≠l} h = Σ_k r_k        Q = Σ_{k≠l} h²        T = Σ_k r_k² − Q   (pairs sharing one index)
    Σ over four different batches = P² − 4T − 2Q          (P² counts pairs sharing one index 4 ways, both 2)
    Var̂ U = U² − (P² − 4T − 2Q) / (K(K − 1)(K − 2)(K − 3))

(Hoeffding's Var U = [4(K − 2) ζ₁ + 2 ζ₂] / (K(K − 1)) with each ζ estimated without bias gives the same
number.) Why not a resampling: the bootstrap and the delete-one jackknife both estimate ζ₂, the part of a
pair's kernel not explained by its two batches alone, about twice over (the Efron–Stein bias; a bootstrap
resample's distinct pairs are fewer and unevenly weighted). When the per-batch SNR is low, and more so for
a paired difference whose first-order terms largely cancel, ζ₂ is most of the variance: the BCa intervals
the probe used were 1.1–1.6× too wide in a Gaussian toy and ~2.4× at the default study's warm start
(issue 19). :func:`jackknife_variance` remains the fallback where the unbiased estimate is ≤ 0 (possible
at small K; an upper bound in expectation, Efron & Stein 1981).

**The interval.** estimate ± t_{ν, (1+c)/2} × SE (``scipy.stats.t``), ν the Satterthwaite degrees of
freedom of the variance estimate (:func:`u_variance_terms`): on the log scale, exponentiated, where the
SNRs are > 0; on the linear scale where the estimator's signal estimate is ≤ 0, then bounded below by 0
(the true SNR ‖μ‖²/tr Σ is ≥ 0). Coverage through this code: tests/test_probe_coverage.py and
docs/ablations.md ("The probe's precision"). The batches are the only noise these intervals know: a
sketched probe (``sketch_dim`` > 0) projects every batch with one sketch per probe, whose own error they
do not contain.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def pair_kernels(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hs, hv)`` ``[K, K]``: the kernels of S and V (module docstring), 0 on the diagonal."""
    m = np.asarray(gram, dtype=np.float64)  # [K, K]
    d = np.diagonal(m)  # [K] ‖g_k‖²
    hs, hv = m.copy(), (d[:, None] + d[None, :]) / 2 - m
    np.fill_diagonal(hs, 0.0)
    np.fill_diagonal(hv, 0.0)
    return hs, hv


def u_mean(h: np.ndarray) -> float:
    """U = Σ_{k≠l} h[k, l] / (K(K − 1)) (the diagonal is not read)."""
    k = h.shape[0]
    return float((h.sum() - np.trace(h)) / (k * (k - 1)))


def u_variance_terms(h: np.ndarray) -> tuple[float, float]:
    """``(Var̂ U, ν)`` for a symmetric kernel ``h`` ``[K, K]`` (K ≥ 4): the unbiased variance estimate
    (module docstring) and its Satterthwaite degrees of freedom.

    The estimate does not change when a constant is added to h, so take h̃ = h − U (off the diagonal):
    then P = 0 and Var̂ U = 4 Σ_k c_k / (K(K − 1)(K − 2)(K − 3)) with c_k = r̃_k² − q̃_k / 2,
    q̃_k = Σ_l h̃[k, l]²: a sum of one term per batch. Matching Var̂ to a scaled χ²_ν (Var = 2 Var̂²/ν) with
    the c_k's spread, ν = 2K c̄² / s_c² (capped to [1, K − 1]; Gaussian c-terms of a linear statistic give
    about K). Where the pair terms dominate, the c_k vary more than a sample variance's would and ν falls
    below K − 1: the unbiased estimate is noisier than a chi-square with K − 1 degrees of freedom, and a
    t(K − 1) quantile covered ~0.90–0.93 at K = 32 where t(ν) covers ~0.95 (docs/ablations.md).
    Var̂ can be ≤ 0 when the variance is small against its own noise."""
    k = h.shape[0]
    if k < 4:
        raise ValueError(f"the unbiased variance of a U-statistic needs K >= 4 batches, got K={k}")
    h = np.array(h, dtype=np.float64)
    np.fill_diagonal(h, 0.0)
    h -= h.sum() / (k * (k - 1))
    np.fill_diagonal(h, 0.0)  # h̃ [K, K]
    r, q = h.sum(1), (h * h).sum(1)  # [K], [K]
    c = r * r - q / 2  # [K]
    var = 4 * float(c.sum()) / (k * (k - 1) * (k - 2) * (k - 3))
    spread = float(c.var(ddof=1))
    nu = 2 * k * float(c.mean()) ** 2 / spread if spread > 0 else k - 1.0
    return var, min(max(nu, 1.0), k - 1.0)


def u_variance(h: np.ndarray) -> float:
    """The unbiased estimate of Var U for a symmetric kernel ``h`` ``[K, K]`` (K ≥ 4; module docstring):
    U² − (P² − 4T − 2Q) / (K(K − 1)(K − 2)(K − 3)), as :func:`u_variance_terms` computes it."""
    return u_variance_terms(h)[0]


def jackknife_variance(h: np.ndarray) -> float:
    """Delete-one jackknife estimate of Var U over the batches: (K − 1)/K Σ_k (U₋ₖ − Ū)², where
    U₋ₖ = (P − 2 r_k) / ((K − 1)(K − 2)) drops row and column k. Biased upward (module docstring)."""
    k = h.shape[0]
    h = np.array(h, dtype=np.float64)
    np.fill_diagonal(h, 0.0)
    r = h.sum(1)  # [K]
    loo = (r.sum() - 2 * r) / ((k - 1) * (k - 2))  # [K]
    return float((k - 1) / k * ((loo - loo.mean()) ** 2).sum())


def half_width(h: np.ndarray, confidence: float) -> float:
    """t_{ν, (1+c)/2} × SE of the U-statistic of ``h``: SE and ν from :func:`u_variance_terms`, or the
    jackknife's SE with ν = K − 1 where the unbiased estimate is ≤ 0; NaN for K < 4."""
    k = h.shape[0]
    if k < 4:
        return math.nan
    var, nu = u_variance_terms(h)
    if not var > 0:
        var, nu = jackknife_variance(h), k - 1.0
    return float(sps.t.ppf((1 + confidence) / 2, nu)) * math.sqrt(max(var, 0.0))


class Linearized:
    """One estimator's S, V and SNR with the kernels of log SNR (``log``, when S > 0) and of SNR
    (``linear``) to first order."""

    def __init__(self, gram: np.ndarray) -> None:
        hs, hv = pair_kernels(gram)
        self.s, self.v = u_mean(hs), u_mean(hv)
        self.ok = self.v > 0  # no noise at all: nothing to linearize
        self.snr = self.s / self.v if self.ok else math.nan
        self.log = hs / self.s - hv / self.v if self.ok and self.s > 0 else None  # d log S − d log V
        self.linear = hs / self.v - self.s * hv / self.v**2 if self.ok else None  # dS/V − S dV/V²


def _linear_interval(point: float, kernel: np.ndarray, c: float) -> tuple[float, float]:
    half = half_width(kernel, c)
    return max(point - half, 0.0), max(point + half, 0.0)


def _ratio_interval(e: Linearized, b: Linearized, c: float) -> tuple[float, float, float]:
    """``(ratio, lo, hi)`` of SNR_e / SNR_b on the same batches (module docstring; a signal ≤ 0 counts as
    log SNR = −∞ as in the point estimate: a ratio of 0 or ``inf``, NaN when both are)."""
    if not (e.ok and b.ok):
        return math.nan, math.nan, math.nan
    if e.log is not None and b.log is not None:
        x, half = math.log(e.snr / b.snr), half_width(e.log - b.log, c)
        return math.exp(x), math.exp(x - half), math.exp(x + half)
    if e.log is None and b.log is None:
        return math.nan, math.nan, math.nan
    flip = e.log is not None  # S_b <= 0 < S_e: the interval of the reciprocal SNR_b / SNR_e, inverted
    num, den = (b, e) if flip else (e, b)
    raw = num.snr / den.snr  # < 0 or 0: dR = d SNR_num / SNR_den − R d log SNR_den
    lo, hi = _linear_interval(raw, num.linear / den.snr - raw * den.log, c)
    if flip:
        return math.inf, (1 / hi if hi > 0 else math.inf if hi == 0 else math.nan), math.inf
    return 0.0, lo, hi


def delta_intervals(grams: dict[str, np.ndarray], ratio_to: str | None,
                    confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Per estimator ``snr_lo``/``snr_hi`` and, against ``ratio_to``, ``snr_ratio`` with
    ``snr_ratio_lo``/``snr_ratio_hi`` and ``ratio_to`` (the schema of ``stats.snr_intervals``). NaN where
    K < 4 or an estimator's gradients do not vary (V = 0)."""
    lin = {name: Linearized(g) for name, g in grams.items()}
    base = lin.get(ratio_to) if ratio_to is not None else None
    out: dict[str, dict[str, float]] = {}
    for name, e in lin.items():
        if not e.ok:
            lo = hi = math.nan
        elif e.log is not None:
            half = half_width(e.log, confidence)
            lo, hi = e.snr * math.exp(-half), e.snr * math.exp(half)
        else:
            lo, hi = _linear_interval(e.snr, e.linear, confidence)
        row = {"snr_lo": lo, "snr_hi": hi}
        if base is not None:
            ratio, rlo, rhi = _ratio_interval(e, base, confidence)
            if name == ratio_to and base.log is not None:
                ratio, rlo, rhi = 1.0, 1.0, 1.0
            row.update(snr_ratio=ratio, snr_ratio_lo=rlo, snr_ratio_hi=rhi, ratio_to=ratio_to)
        out[name] = row
    return out
