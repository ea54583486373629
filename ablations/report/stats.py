"""The statistics of an ablation report: Student-t intervals, paired comparisons and power.

Everything is from ``scipy.stats`` (the t and noncentral-t distributions) and ``scipy.optimize.brentq``;
nothing here reads a study.

- ``t_interval``: mean and the two-sided Student-t interval over seeds.
- ``paired``: a comparison of two groups paired by seed, mean of the per-seed differences (or of the log
  ratios, for ratio metrics such as the SNR) with its t-interval, the SD of the differences, and the
  **minimum detectable effect**: the smallest true mean difference a two-sided paired t-test at
  α = 0.05 would detect with 80% power at this n, given the observed SD of the differences (noncentral t,
  ``mde``). With fewer than 2 pairs every interval and the MDE are NaN (reported as n/a).

The verdict rule (intervals against the smallest effect of interest, TOST, Holm) is ``verdicts.py``; the
MDE here is a planning figure only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.80


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)


def t_half_width(sd, n: int, confidence: float = 1 - ALPHA):
    """Half-width of the two-sided Student-t interval of a mean of ``n`` values with SD ``sd``."""
    if n < 2:
        return np.full_like(np.asarray(sd, dtype=float), math.nan)
    return _t_quantile(0.5 + confidence / 2, n - 1) * np.asarray(sd, dtype=float) / math.sqrt(n)


@functools.lru_cache(maxsize=4096)
def _t_quantile(q: float, df: int) -> float:
    return float(sps.t.ppf(q, df))


def t_interval(values, confidence: float = 1 - ALPHA) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student t-interval of the mean of the finite ``values``; NaN
    bounds with fewer than 2 values, all NaN with none."""
    x = _finite(values)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return (mean, math.nan, math.nan)
    half = float(t_half_width(x.std(ddof=1), len(x), confidence))
    return (mean, mean - half, mean + half)


def t_test_power(ncp: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t-test with ``df`` degrees of freedom when the statistic is noncentral t with
    noncentrality ``ncp``: P(|T| > t_{1−α/2}) (both tails)."""
    crit, ncp = sps.t.ppf(1 - alpha / 2, df), abs(ncp)  # the power is symmetric in the sign of ncp
    far = sps.nct.cdf(-crit, df, ncp)  # the wrong-sign tail: tiny, and NaN in scipy where it underflows
    return float(sps.nct.sf(crit, df, ncp) + (far if np.isfinite(far) else 0.0))


def paired_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test on ``n`` pairs whose differences have SD ``sd``, when the true
    mean difference is ``effect``: noncentral t with n − 1 df and noncentrality effect·√n / sd."""
    return t_test_power(effect * math.sqrt(n) / sd, n - 1, alpha)


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of the two-sided paired t-test: the true mean difference with
    ``paired_power`` = ``power`` (NaN with n < 2 or a non-finite SD; 0 when the SD is 0)."""
    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    hi = sd
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda e: paired_power(e, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


@dataclass
class Paired:
    """A paired comparison: ``mean`` [``lo``, ``hi``] (95%) of the per-seed differences ``values`` (of
    ``seeds``), their ``sd``, ``n`` pairs and (computed when asked) the ``mde``; for a ratio metric
    (``log=True``) all are on the log scale and :meth:`as_dict` reports exp(mean) [exp(lo), exp(hi)] and the
    MDE as a factor exp(mde). ``df`` is the t-distribution's degrees of freedom: n − 1, or for Stein's
    two-stage comparison (:func:`stein`) the first stage's n₀ − 1 with ``sd`` the first stage's SD. The
    verdict on it is ``ablations.report.verdicts.verdict``."""

    mean: float
    lo: float
    hi: float
    sd: float
    n: int
    log: bool = False
    values: tuple[float, ...] = ()
    seeds: tuple = ()
    df: int | None = None

    @property
    def dof(self) -> int:
        return self.n - 1 if self.df is None else self.df

    @functools.cached_property
    def mde(self) -> float:
        """The minimum detectable effect at this n and SD (a planning figure; see :func:`mde`)."""
        return mde(self.sd, self.n)

    def interval(self, confidence: float) -> tuple[float, float]:
        """The two-sided t interval of the mean difference at ``confidence``, mean ± t(df)·sd/√n (NaN
        under 2 pairs)."""
        if self.n < 2 or self.dof < 1 or not np.isfinite(self.sd):
            return (math.nan, math.nan)
        half = _t_quantile(0.5 + confidence / 2, self.dof) * self.sd / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)

    def excludes_null(self) -> bool | None:
        """Whether the 95% interval excludes no difference (None when the interval is n/a)."""
        if not (np.isfinite(self.lo) and np.isfinite(self.hi)):
            return None
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict[str, float | int]:
        f = math.exp if self.log else float
        out = {k: f(v) if np.isfinite(v) else math.nan for k, v in
               (("mean", self.mean), ("lo", self.lo), ("hi", self.hi), ("mde", self.mde))}
        out = {**out, "n": self.n}
        return out if self.df is None else {**out, "df": self.df, "stein": True}


def paired(a: dict, b: dict, log: bool = False, confidence: float = 1 - ALPHA) -> Paired:
    """``a`` − ``b`` paired by key (seed), over the keys both have with finite values (positive ones for
    ``log``, which compares log a − log b)."""
    d = {}
    for k in a:
        x, y = a[k], b.get(k)
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)) or (log and (x <= 0 or y <= 0)):
            continue
        d[k] = math.log(x) - math.log(y) if log else x - y
    return differences(d, log, confidence)


def differences(d: dict, log: bool = False, confidence: float = 1 - ALPHA) -> Paired:
    """The comparison from per-seed differences ``d`` already taken (log ratios with ``log``)."""
    kept = {k: float(v) for k, v in d.items() if v is not None and np.isfinite(v)}
    x = np.asarray(list(kept.values()), dtype=float)
    mean, lo, hi = t_interval(x, confidence)
    sd = float(x.std(ddof=1)) if len(x) >= 2 else math.nan
    return Paired(mean, lo, hi, sd, len(x), log, tuple(x.tolist()), tuple(kept))


def stein(p: Paired, first: set, confidence: float = 1 - ALPHA) -> Paired:
    """Stein's two-stage comparison (Stein 1945) of a study whose later seeds were added by a rule that
    looked at its first-stage seeds ``first`` only: the mean over every seed, with the first stage's SD s₀
    and n₀ − 1 degrees of freedom, t = mean·√n / s₀. With normal differences this t is exactly Student's t
    with n₀ − 1 df whatever the number of seeds the rule chose. ``p`` itself when every seed is in the
    first stage (a fixed-n study) or the first stage has under 2 seeds."""
    s0, n0 = first_stage(p, first)
    if n0 < 2 or n0 == p.n:
        return p
    out = Paired(p.mean, math.nan, math.nan, s0, p.n, p.log, p.values, p.seeds, n0 - 1)
    out.lo, out.hi = out.interval(confidence)
    return out


def first_stage(p: Paired, first: set) -> tuple[float, int]:
    """(SD, n) of the per-seed differences of the first-stage seeds ``first`` (NaN SD under 2)."""
    x0 = [v for k, v in zip(p.seeds, p.values, strict=True) if k in first]
    return (float(np.std(x0, ddof=1)) if len(x0) >= 2 else math.nan), len(x0)


def stein_seeds(sd0: float, n0: int, half_width: float, max_seeds: int) -> int:
    """Stein's second stage: the fewest seeds n ≥ n₀ whose interval t_{n₀−1}·s₀/√n has at most
    ``half_width`` (95%), capped at ``max_seeds``; a function of the first stage's SD only."""
    if n0 < 2 or not np.isfinite(sd0) or (half_width <= 0 and sd0 > 0):
        return max_seeds
    if sd0 == 0:
        return n0
    need = math.ceil((_t_quantile(1 - ALPHA / 2, n0 - 1) * sd0 / half_width) ** 2)
    return int(min(max(n0, need), max_seeds))


def clip_stats(norms, max_norm: float | None) -> dict[str, float | None]:
    """Gradient clipping in one run: the median pre-clip global norm over its steps and the share of steps
    whose norm passed ``max_norm`` (0 without clipping); NaN without norms."""
    x = _finite(norms)
    if len(x) == 0:
        return {"median": math.nan, "clipped_share": math.nan, "max_grad_norm": max_norm}
    share = float((x > max_norm).mean()) if max_norm is not None else 0.0
    return {"median": float(np.median(x)), "clipped_share": share, "max_grad_norm": max_norm}


def interval_dict(ci: tuple[float, float, float]) -> dict[str, float]:
    mean, lo, hi = ci
    return {"mean": mean, "lo": lo, "hi": hi}


def end_mean(points: np.ndarray, fraction: float = 0.1, first: bool = False) -> float:
    """Mean of the last (``first``: the first) ``fraction`` of a curve's values, at least one point; NaN
    for an empty curve. ``points`` ``[N, 2]`` (step, value)."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if not len(pts):
        return math.nan
    k = max(1, int(round(fraction * len(pts))))
    return float((pts[:k] if first else pts[-k:])[:, 1].mean())


def lift(points: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of a curve's values minus the mean of its first ``fraction`` (at least
    one point each); NaN with fewer than 2 points. ``points`` ``[N, 2]`` (step, value)."""
    if len(np.asarray(points, dtype=float).reshape(-1, 2)) < 2:
        return math.nan
    return end_mean(points, fraction) - end_mean(points, fraction, first=True)


def _nan(v) -> float:
    """A figure read back from strict JSON: None (undefined) as NaN."""
    return math.nan if v is None else float(v)


def fmt_ci(ci, spec: str = ".3f", prefix: str = "") -> str:
    """``0.412 ± 0.031`` (mean ± half-width), ``0.412 (CI n/a)``, or ``n/a``; ``ci`` a tuple or a dict."""
    mean, lo, hi = (_nan(v) for v in ((ci["mean"], ci["lo"], ci["hi"]) if isinstance(ci, dict) else ci))
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{prefix}{mean:{spec}} (CI n/a)"
    return f"{prefix}{mean:{spec}} ± {(hi - lo) / 2:{spec}}"


def fmt_diff(d: dict, spec: str = ".3f", ratio: bool = False) -> str:
    """``+0.031 [+0.010, +0.052] (MDE 0.04)`` or ``×1.20 [×1.05, ×1.37] (MDE ×1.15)``; n/a parts said so."""
    mean, lo, hi, m = (_nan(d.get(k)) for k in ("mean", "lo", "hi", "mde"))
    if not np.isfinite(mean):
        return "n/a"
    f = (lambda v: f"×{v:{spec}}") if ratio else (lambda v: f"{v:+{spec}}")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{f(mean)} (CI n/a)"
    mde_text = f"±{(m - 1) * 100:.0f}%" if ratio else f"{m:{spec.lstrip('+')}}"
    interval = f"{f(mean)} [{f(lo)}, {f(hi)}]"
    return f"{interval} (MDE {mde_text})" if np.isfinite(m) else interval
