"""Signal and noise of K gradient estimates, from their gradients or from their K×K Gram matrix. Pure math.

Every statistic the probe reports is a function of inner products g_k·g_l between the K per-batch
gradients (within one estimator) and a few running sums across estimators, so the probe keeps the Gram
matrix M[k, l] = g_k·g_l (O(K²) numbers): the per-point intervals (``intervals.py``, the delta method) read
it, and a bootstrap resamples *batches* by resampling indices: a resample is a count vector w[k] (how often
batch k was drawn, n = Σ w), and

    Σ_{i,j} g_{b_i}·g_{b_j} = wᵀ M w        Σ_i ‖g_{b_i}‖² = Σ_k w_k M[k, k]

give everything below (``gram_statistics``). With w = 1 they are exactly :func:`gradient_statistics` of the
gradients themselves (tested).

Definitions (K independent estimates g_1..g_K of one expectation μ, ḡ their mean):

- ``variance`` V = Σ_k ‖g_k − ḡ‖² / (K − 1): the total variance tr Cov(g) of *one* estimate (unbiased);
- ``signal`` S = ‖ḡ‖² − V/K = Σ_{k≠l} g_k·g_l / (K(K − 1)): unbiased for ‖μ‖² (a U-statistic: only
  pairs of independent batches; it can come out negative when the noise dominates, and is not clipped);
- ``snr`` S / V ≈ ‖μ‖² / tr Cov(g), the signal-to-noise ratio of one estimate. V = 0 gives 0 when ḡ = 0
  and ``inf`` otherwise; never NaN;
- ``mean_norm`` ‖ḡ‖ and ``relative_variance`` V / ‖ḡ‖² (compare it only at equal K; 1/``snr`` is K-free).

Why SNR rather than V: estimators differ in *scale* (``group_norm`` divides each group by its reward std,
``rloo`` is G/(G−1) × ``mean_baseline``), V grows with the square of the scale, and an Adam or clipped step
hardly depends on it. Multiplying every g_k by c leaves ``snr``, ``cosine`` and ``relative_variance``
unchanged. A biased estimator can still have a high SNR around the wrong mean; the cosine with an unbiased
reference exposes that.

Cross-estimator statistics use U-statistics too, so that noise shared by batch k's two gradients (the
same rollout) does not leak into them:

- ``cosine`` = U(g, r) / √(U(g, g) U(r, r)) with U(a, b) = Σ_{k≠l} a_k·b_l / (K(K − 1)) and r_k the
  reference estimator's gradient on batch k: an estimate of cos(E g, E r), not attenuated by noise (the
  cosine of two noisy means is). None when either signal estimate is ≤ 0; clipped to [−1, 1];
- ``hard_share`` = Σ_k h_k·g_k / Σ_k ‖g_k‖², with h_k the part of g_k that comes from hard queries
  (g_k = h_k + e_k by linearity, both with the whole batch's normalizer): the share of the squared norm of
  a step's gradient that hard queries contribute (h·g + e·g = ‖g‖², so the easy share is 1 − it; a share
  can leave [0, 1] when the parts point against each other);
- ``hard_signal_share`` = U(h, g) / U(g, g): the same split of the expected gradient's squared norm ‖μ‖²
  (noise removed), None when U(g, g) ≤ 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from grpo_lab.probe.intervals import delta_intervals


# ---- from the gradients themselves ---------------------------------------------------------------------
def gradient_statistics(grads: Tensor, reference: Tensor | None = None) -> dict[str, float | None]:
    """``variance``, ``signal``, ``snr``, ``mean_norm``, ``relative_variance``, ``num_batches`` of K
    gradient estimates ``grads`` ``[K, D]`` (float64 inside), and ``cosine`` ḡ·r/(‖ḡ‖‖r‖) with a fixed
    ``reference`` direction r (None without one; 0 if a norm is 0). The direct computation, for checks
    and for gradients at hand; the probe uses :func:`gram_statistics`."""
    if grads.dim() != 2:
        raise ValueError("grads must be [K, D] (K estimates of a D-dim gradient), got shape "
                         f"{tuple(grads.shape)}")
    k = grads.shape[0]
    if k < 2:
        raise ValueError(f"need K >= 2 gradient estimates to estimate a variance, got K={k}")
    g = grads.detach().to(torch.float64)
    mean = g.mean(dim=0)
    out = _moments(float(mean.dot(mean)), float(((g - mean) ** 2).sum()) / (k - 1), k)
    out["cosine"] = None
    if reference is not None:
        ref = reference.detach().to(device=mean.device, dtype=torch.float64).flatten()
        if ref.shape != mean.shape:
            raise ValueError(f"reference must have D={mean.numel()} entries, got shape "
                             f"{tuple(reference.shape)}")
        denom = math.sqrt(out["mean_norm"] ** 2) * float(ref.norm())
        out["cosine"] = max(-1.0, min(1.0, float(mean.dot(ref)) / denom)) if denom > 0.0 else 0.0
    return out


def _moments(norm_sq: float, v: float, k: float) -> dict[str, float]:
    """The statistics from ‖ḡ‖² and V at K batches (see the module docstring for the degenerate cases)."""
    s = norm_sq - v / k
    snr = s / v if v > 0.0 else (math.inf if norm_sq > 0.0 else 0.0)
    rel = v / norm_sq if norm_sq > 0.0 else (math.inf if v > 0.0 else 0.0)
    return {"mean_norm": math.sqrt(max(norm_sq, 0.0)), "variance": v, "signal": s, "snr": snr,
            "relative_variance": rel, "num_batches": float(k)}


# ---- from the Gram matrix ------------------------------------------------------------------------------
def gram_sums(gram: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, Σ_{i,j}, Σ_i diagonal)`` of the resample(s) with batch counts ``counts`` ``[..., K]``."""
    w = np.asarray(counts, dtype=np.float64)
    full = np.einsum("...i,ij,...j->...", w, gram, w)
    return w.sum(-1), full, w @ np.diagonal(gram)


def gram_snr(gram: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """SNR = S/V of each resample ``counts`` ``[..., K]`` of the batches whose Gram matrix is ``gram``.

    Both are averages over pairs of *different* batches, weighted by the counts: a batch drawn twice is
    not an independent pair with itself (with it, S would gain ‖g_k‖² terms, about V/K too much, and the
    bootstrap intervals would miss). With ``counts`` = 1 they are the module docstring's S and V exactly:
    V = Σ_{k≠l} ‖g_k − g_l‖² / (2K(K − 1)) is the unbiased sample variance.
    """
    w = np.asarray(counts, dtype=np.float64)
    d = np.diagonal(gram)
    sq = (w * w).sum(-1)
    pairs = w.sum(-1) ** 2 - sq  # Σ_{k≠l} w_k w_l
    cross = np.einsum("...i,ij,...j->...", w, gram, w) - (w * w) @ d  # Σ_{k≠l} w_k w_l g_k·g_l
    diag = (w.sum(-1) * (w @ d) - (w * w) @ d)  # Σ_{k≠l} w_k w_l ‖g_k‖²
    with np.errstate(divide="ignore", invalid="ignore"):
        s = cross / pairs
        v = (diag - cross) / pairs  # Σ_{k≠l} w_k w_l (‖g_k‖² + ‖g_l‖² − 2 g_k·g_l) / 2 / pairs
        snr = s / v
    return np.where(v > 0, snr, np.where(cross > 0, np.inf, 0.0))


def gram_statistics(gram: np.ndarray) -> dict[str, float]:
    """:func:`gradient_statistics` (without the cosine) from the K×K Gram matrix of the K gradients."""
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    if gram.shape != (k, k) or k < 2:
        raise ValueError(f"gram must be a [K, K] matrix with K >= 2, got shape {gram.shape}")
    n, full, diag = gram_sums(gram, np.ones(k))
    return _moments(float(full) / k**2, float(diag - full / n) / (k - 1), k)


def u_statistic(dot_of_sums: float, sum_of_dots: float, pairs: int) -> float:
    """Σ_{k≠l} a_k·b_l / pairs = ((Σa)·(Σb) − Σ_k a_k·b_k) / pairs: unbiased for (E a)·(E b) when a_k and
    b_l are independent for k ≠ l. ``pairs`` counts the (k, l) with k ≠ l: K(K − 1) for K batches of both,
    K(K + R − 1) when b has R further batches of its own (the sums then run over all of b's)."""
    return (dot_of_sums - sum_of_dots) / pairs


def snr_intervals(grams: dict[str, np.ndarray], ratio_to: str | None, n_resamples: int = 2000,
                  confidence: float = 0.95, seed: int = 0,
                  method: str = "delta") -> dict[str, dict[str, float]]:
    """Per estimator ``snr_lo``/``snr_hi`` and, against ``ratio_to``, ``snr_ratio`` = SNR_e / SNR_ratio_to
    with ``snr_ratio_lo``/``snr_ratio_hi``, paired (the same batches for every estimator). A signal estimate
    ≤ 0 (too few batches to see the signal) counts as log SNR = −∞, so a ratio or a bound can be 0 or
    ``inf``; NaN where both SNRs are ≤ 0 or the interval cannot be computed.

    ``method="delta"`` (the probe's): the delta method with the unbiased variance of the U-statistics,
    ``intervals.py`` (calibrated: tests/test_probe_coverage.py). ``"bca"``: the BCa bootstrap over the K
    batches (``n_resamples``, ``seed``) the probe used before issue 19, kept for comparison: too wide, since
    a resample over-weights the pair term of a U-statistic's variance.
    """
    if method == "delta":
        return delta_intervals(grams, ratio_to, confidence)
    if method != "bca":
        raise ValueError(f"unknown interval method {method!r}; known: 'delta', 'bca'")
    return _bca_intervals(grams, ratio_to, n_resamples, confidence, seed)


def _bca_intervals(grams: dict[str, np.ndarray], ratio_to: str | None, n_resamples: int,
                   confidence: float, seed: int) -> dict[str, dict[str, float]]:
    """BCa bootstrap over the K batches (``scipy.stats.bootstrap``), the same resampled batches for every
    estimator; the ratio's interval is that of the log ratio, exponentiated."""
    names = list(grams)
    k = next(iter(grams.values())).shape[0]
    stacked = np.stack([np.asarray(grams[n], dtype=np.float64) for n in names])  # [E, K, K]
    base = names.index(ratio_to) if ratio_to in grams else None

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:  # idx [..., m] -> [2E, ...]
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        counts = (idx[..., None] == np.arange(k)).sum(-2)  # [..., K]
        snr = np.stack([gram_snr(g, counts) for g in stacked])  # [E, ...]
        with np.errstate(divide="ignore", invalid="ignore"):  # an SNR <= 0 counts as log SNR = −∞
            logs = np.where(snr > 0, np.log(np.where(snr > 0, snr, 1.0)), -np.inf)
            ratio = logs - logs[base] if base is not None else np.full_like(logs, np.nan)  # −∞ − −∞: NaN
        return np.concatenate([snr, ratio])

    point = statistic(np.arange(k))
    lo = hi = np.full(2 * len(names), np.nan)
    if k >= 3 and np.isfinite(point).any():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # scipy warns (and returns NaN) where BCa is degenerate
            res = sps.bootstrap((np.arange(k),), statistic, vectorized=True, n_resamples=n_resamples,
                                confidence_level=confidence, method="BCa", batch=250,
                                rng=np.random.default_rng(seed))
        lo, hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
        # Where BCa is undefined (its jackknife meets an SNR <= 0: log −∞), the percentile interval of the
        # same resamples, taken without interpolation so that ±∞ stay ±∞.
        dist, tail = res.bootstrap_distribution, (1 - confidence) / 2
        lo = np.where(np.isnan(lo), np.quantile(dist, tail, axis=-1, method="lower"), lo)
        hi = np.where(np.isnan(hi), np.quantile(dist, 1 - tail, axis=-1, method="higher"), hi)
    out: dict[str, dict[str, float]] = {}
    e = len(names)
    for i, name in enumerate(names):
        row = {"snr_lo": float(lo[i]), "snr_hi": float(hi[i])}
        if base is not None:
            row.update(snr_ratio=float(np.exp(point[e + i])), snr_ratio_lo=float(np.exp(lo[e + i])),
                       snr_ratio_hi=float(np.exp(hi[e + i])), ratio_to=ratio_to)
        out[name] = row
    if base is not None and point[base] > 0:  # the baseline against itself (no ratio when its SNR is <= 0)
        out[ratio_to].update(snr_ratio=1.0, snr_ratio_lo=1.0, snr_ratio_hi=1.0)
    return out


# ---- accumulating a probe's batches --------------------------------------------------------------------
class GramAccumulator:
    """The sums a probe point needs, batch by batch: each estimator's K gradients (kept, float32, for its
    Gram matrix: E·K·D·4 bytes), and running float64 sums for the hard parts h and the reference r.

    ``add(grads, hard, reference)`` takes one batch: ``{estimator: g_k [D]}``, ``{estimator: h_k [D]}`` (or
    None: no split) and the reference estimator's r_k (or None). ``add_reference(r)`` takes a further,
    reference-only batch. ``statistics()`` returns ``{estimator: {...}}`` (module docstring) and
    ``grams()`` the K×K matrices for :func:`snr_intervals`.
    """

    def __init__(self, names: list[str], num_batches: int) -> None:
        self.names, self.capacity, self.k = list(names), num_batches, 0
        self.store: Tensor | None = None  # [E, K, D]
        self.sum_h: dict[str, Tensor] = {}
        self.h_dot_g = dict.fromkeys(self.names, 0.0)
        self.g_dot_r = dict.fromkeys(self.names, 0.0)
        self.sum_r: Tensor | None = None
        self.r_sq, self.n_ref = 0.0, 0
        self._grams: dict[str, np.ndarray] | None = None  # computed once the batches are in

    def add(self, grads: dict[str, Tensor], hard: dict[str, Tensor] | None = None,
            reference: Tensor | None = None) -> None:
        if self.k == self.capacity:
            raise ValueError(f"already holds {self.capacity} batches")
        first = grads[self.names[0]]
        if self.store is None:
            self.store = torch.zeros(len(self.names), self.capacity, first.numel(), dtype=torch.float32)
        r = None if reference is None else reference.detach().flatten().float()
        for i, name in enumerate(self.names):
            g = self.store[i, self.k]
            g.copy_(grads[name].detach().flatten())
            if hard is not None:  # float32 dot products (blocked sums), float64 running sums
                h = hard[name].detach().flatten().float()
                if name not in self.sum_h:
                    self.sum_h[name] = torch.zeros(h.numel(), dtype=torch.float64)
                self.sum_h[name] += h
                self.h_dot_g[name] += float(h.dot(g))
            if r is not None:
                self.g_dot_r[name] += float(g.dot(r))
        self.k += 1
        self._grams = None
        if reference is not None:
            self.add_reference(reference)

    def add_reference(self, reference: Tensor) -> None:
        r = reference.detach().flatten().float()
        if self.sum_r is None:
            self.sum_r = torch.zeros(r.numel(), dtype=torch.float64)
        self.sum_r += r
        self.r_sq += float(r.dot(r))
        self.n_ref += 1

    def grams(self, chunk: int = 1 << 16) -> dict[str, np.ndarray]:
        """Each estimator's Gram matrix ``[K, K]`` in float64 (computed in column chunks, once)."""
        if self.store is None or self.k < 2:
            raise ValueError(f"need K >= 2 gradient estimates to estimate a variance, got K={self.k}")
        if self._grams is not None:
            return self._grams
        out = {}
        for i, name in enumerate(self.names):
            x = self.store[i, : self.k]
            gram = torch.zeros(self.k, self.k, dtype=torch.float64)
            for lo in range(0, x.shape[1], chunk):
                part = x[:, lo : lo + chunk].double()
                gram += part @ part.T
            out[name] = gram.numpy()
        self._grams = out
        return out

    def statistics(self) -> dict[str, dict[str, float | None]]:
        grams, k = self.grams(), self.k
        ref_signal = None
        out: dict[str, dict[str, float | None]] = {}
        if self.sum_r is not None and self.n_ref >= 2:
            r_norm_sq = float(self.sum_r.dot(self.sum_r))
            ref_signal = u_statistic(r_norm_sq, self.r_sq, self.n_ref * (self.n_ref - 1))
            ref_var = (self.r_sq - r_norm_sq / self.n_ref) / (self.n_ref - 1)
            ref_snr = ref_signal / ref_var if ref_var > 0 else None
        for i, name in enumerate(self.names):
            s = {**gram_statistics(grams[name]), "cosine": None, "reference_snr": None,
                 "hard_share": None, "hard_signal_share": None}
            sum_g = self.store[i, :k].sum(0, dtype=torch.float64)
            signal = s["signal"]
            if ref_signal is not None:
                cross = u_statistic(float(sum_g.dot(self.sum_r)), self.g_dot_r[name], k * (self.n_ref - 1))
                if signal > 0 and ref_signal > 0:
                    s["cosine"] = max(-1.0, min(1.0, cross / math.sqrt(signal * ref_signal)))
                s["reference_snr"] = ref_snr
            if name in self.sum_h:
                total = float(np.trace(grams[name]))
                s["hard_share"] = self.h_dot_g[name] / total if total > 0 else None
                hg = u_statistic(float(self.sum_h[name].dot(sum_g)), self.h_dot_g[name], k * (k - 1))
                s["hard_signal_share"] = hg / signal if signal > 0 else None
            out[name] = s
        return out
