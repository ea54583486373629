"""The verdict rule of an ablation report: intervals against the smallest effect of interest, Holm over a
declared family, and a stopping rule for sequential seeds that keeps them valid.

A comparison (per-seed differences, ``stats.Paired``) gets one of four verdicts:

- **holds**: the two-sided t-test rejects no difference (p < α; the 95% interval excludes 0) and the
  effect points the claimed way;
- **the opposite**: it rejects no difference, the effect points the other way;
- **equivalent**: two one-sided t-tests at the smallest effect of interest (SESOI) both reject
  (TOST p < α, i.e. the 90% interval lies inside ±SESOI): any true difference is smaller than the SESOI;
- **cannot tell at this n**: neither, with the number of seeds at which the minimum detectable effect would
  reach the SESOI (a planning figure only: post-hoc power is never evidence of absence).

A *holds* or *opposite* also says its size: *larger than the SESOI* (the 95% interval lies beyond ±SESOI),
*negligible* (TOST also rejects: a real difference, smaller than the SESOI) or *of unclear size*.

Family-wise error: the report declares the seed post's claims up front as its family (``PRIMARY`` metrics
of every estimator-vs-baseline comparison) and adjusts their p-values by Holm's step-down (Holm 1979)
over every hypothesis the family tests, each metric's difference test and its equivalence test
(2m hypotheses: conservative, since at most one of a metric's two nulls can be true). Other metrics are
labelled *exploratory* and are unadjusted.

Sequential seeds (``grpo-lab-ablate --until-decisive``) follow Stein's two-stage procedure (Stein 1945): the
first round (the grid's seeds) fixes, from its own spread only, how many seeds make every deciding
comparison's 95% interval ±SESOI/2 wide (``planned_seeds``); the rounds add seeds up to that number; and
the final test uses the mean over all seeds with the first stage's SD and its n₀ − 1 degrees of freedom
(``stats.stein``), which is exactly Student's t whatever number of seeds was chosen. Stopping when the
running interval gets narrow enough (a Chow–Robbins rule) is not valid at these sizes: it stops when the
sample SD happens to be small, and its type-I error came out 0.068 ± 0.002 in simulation. Half the SESOI
guarantees a verdict in expectation: an interval that contains 0 then has its 90% interval inside ±SESOI.
``python -m ablations.calibration`` shows each
procedure's type-I error and power by simulation through this code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize
from scipy import stats as sps

from ablations.report.stats import ALPHA, POWER, Paired, first_stage, mde, stein_seeds

PRIMARY = ("snr_ratio", "hard_lift_diff", "auc_diff")  # the seed post's claims (i), (ii), (iii)
CODES = ("holds", "opposite", "equivalent", "cannot tell")


def margin(p: Paired, sesoi: float) -> float:
    """The SESOI on the scale of the differences: log(1 + SESOI) for a ratio metric (log scale)."""
    return math.log1p(sesoi) if p.log else float(sesoi)


def _t(p: Paired, null: float) -> float:
    return (p.mean - null) / (p.sd / math.sqrt(p.n))


def p_difference(p: Paired) -> float:
    """Two-sided one-sample t-test of mean difference 0 (the statistic of ``scipy.stats.ttest_1samp``, its
    p from ``scipy.stats.t``). With no spread (every seed's difference the same): 1 when that difference
    is 0, else 0. NaN with under 2 pairs."""
    if p.n < 2:
        return math.nan
    if p.sd == 0:
        return 1.0 if p.mean == 0 else 0.0
    return float(2 * sps.t.sf(abs(_t(p, 0.0)), p.dof))


def p_equivalence(p: Paired, m: float) -> float:
    """TOST: the larger p of the one-sided t-tests of mean > −m and mean < +m (``m`` the margin on the
    differences' scale). With no spread: 0 when |mean| < m, else 1. NaN with under 2 pairs."""
    if p.n < 2:
        return math.nan
    if p.sd == 0:
        return 0.0 if abs(p.mean) < m else 1.0
    return float(max(sps.t.sf(_t(p, -m), p.dof), sps.t.cdf(_t(p, m), p.dof)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with the m finite p's sorted ascending,
    p̃_(j) = max_{i ≤ j} min(1, (m − i + 1)·p_(i)). NaN stays NaN and does not count in m. Rejecting every
    p̃ < α controls the family-wise error at α under any dependence."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


@functools.cache
def _unit_mde(n: int) -> float:
    return mde(1.0, n)


def seeds_needed(sd: float, sesoi_margin: float, n: int, limit: int = 4096) -> int | None:
    """Planning: the fewest pairs at which the MDE (80% power, two-sided α) is at most the margin, given the
    observed SD (the MDE is linear in the SD, so sd·MDE(1, n)); None if not finite or beyond ``limit``."""
    if not (np.isfinite(sd) and sesoi_margin > 0):
        return None
    if sd == 0:
        return max(n, 2)
    target = sesoi_margin / sd
    lo = hi = max(n, 2)
    while _unit_mde(hi) > target:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:  # the MDE falls with n: the first n with MDE <= margin
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _unit_mde(mid) > target else (lo, mid)
    return lo


def tost_power(true_diff: float, margin_: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of TOST at margin ±``margin_`` on ``n`` pairs with SD ``sd`` when the true mean difference is
    ``true_diff``: it rejects iff |mean − 0| ≤ margin − t_{1−α, n−1}·s/√n on both sides, i.e. the mean lies
    in [−m + c·s, m − c·s] with c = t/√n; over s ~ σ·χ_{n−1}/√(n−1) (independent of the mean) this is the
    integral of Φ((m − c·s − δ)√n/σ) − Φ((−m + c·s − δ)√n/σ) where positive (``scipy.integrate.quad``)."""
    if n < 2 or not (sd > 0):
        return math.nan
    c = sps.t.ppf(1 - alpha, n - 1) / math.sqrt(n)
    se = sd / math.sqrt(n)

    def at(s: float) -> float:
        lo, hi = -margin_ + c * s, margin_ - c * s
        if hi <= lo:
            return 0.0
        dens = sps.chi.pdf(s * math.sqrt(n - 1) / sd, n - 1) * math.sqrt(n - 1) / sd
        return (sps.norm.cdf((hi - true_diff) / se) - sps.norm.cdf((lo - true_diff) / se)) * dens

    s_max = margin_ / c  # beyond it the acceptance region is empty
    return float(integrate.quad(at, 0.0, s_max, limit=200)[0])


def equivalence_margin(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """Planning: the margin at which TOST on ``n`` pairs with SD ``sd`` shows equivalence of a true
    difference of 0 with ``power`` (NaN under 2 pairs or without spread)."""
    if n < 2 or not (np.isfinite(sd) and sd > 0):
        return math.nan
    hi = sd
    while tost_power(0.0, hi, sd, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda m: tost_power(0.0, m, sd, n, alpha) - power, 1e-12 * sd, hi,
                                 xtol=1e-10 * sd))


@dataclass(frozen=True)
class Verdict:
    """A comparison's verdict: ``code`` (``CODES``), ``size`` of a holds/opposite, the test p-values (and
    Holm's, when the metric belongs to the family), and the sentence the report prints."""

    code: str
    size: str | None
    p: float
    p_equiv: float
    p_adjusted: float | None
    p_equiv_adjusted: float | None
    text: str
    seeds_needed: int | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "size": self.size, "p": self.p, "p_equiv": self.p_equiv,
                "p_holm": self.p_adjusted, "p_equiv_holm": self.p_equiv_adjusted,
                "seeds_needed": self.seeds_needed}


def _fmt(p: Paired):
    return (lambda v: f"×{math.exp(v):.3g}") if p.log else (lambda v: f"{v:+.3g}")


def _p_text(raw: float, adjusted: float | None, name: str = "p") -> str:
    return f"{name} = {raw:.2g}" + ("" if adjusted is None else f", Holm {adjusted:.2g}")


def verdict(p: Paired, sesoi: float, higher_is_better: bool = True, p_adjusted: float | None = None,
            p_equiv_adjusted: float | None = None, alpha: float = ALPHA) -> Verdict:
    """The verdict of one comparison (module docstring). ``sesoi``: the smallest effect of interest in the
    metric's units (a ratio metric's is relative: 0.10 = ×1.10). ``p_adjusted``/``p_equiv_adjusted``:
    Holm's p-values when the comparison is in the family; the verdict then uses them."""
    m = margin(p, sesoi)
    raw, raw_e = p_difference(p), p_equivalence(p, m)
    if p.n < 2:
        return Verdict("cannot tell", None, raw, raw_e, p_adjusted, p_equiv_adjusted,
                       f"cannot tell with {p.n} pair(s)")
    pd = raw if p_adjusted is None else p_adjusted
    pe = raw_e if p_equiv_adjusted is None else p_equiv_adjusted
    f = _fmt(p)
    ci = f"{f(p.mean)} [{f(p.lo)}, {f(p.hi)}], n = {p.n}"
    if p.df is not None:
        ci += f" (Stein two-stage: the first {p.df + 1} seeds' SD, {p.df} df)"
    bound = f"±{sesoi:.0%}" if p.log else f"±{sesoi:g}"
    if pd < alpha:
        code = "holds" if (p.mean > 0) == higher_is_better else "opposite"
        if p.lo > m or p.hi < -m:
            size = "larger than the SESOI"
        elif pe < alpha:
            size = "negligible"
        else:
            size = "of unclear size"
        name = "holds" if code == "holds" else "the opposite holds"
        text = f"{name}, {size} ({bound}): {ci}; {_p_text(raw, p_adjusted)}"
        return Verdict(code, size, raw, raw_e, p_adjusted, p_equiv_adjusted, text)
    if pe < alpha:
        lo90, hi90 = p.interval(1 - 2 * alpha)
        text = (f"equivalent: no difference beyond {bound} (90% interval [{f(lo90)}, {f(hi90)}]): {ci}; "
                f"{_p_text(raw_e, p_equiv_adjusted, 'TOST p')}")
        return Verdict("equivalent", None, raw, raw_e, p_adjusted, p_equiv_adjusted, text)
    need = seeds_needed(p.sd, m, p.n)
    plan = (f"about {need} seeds would detect a difference of {bound} (80% power)" if need
            else "no finite number of seeds plans for it")
    text = f"cannot tell at n = {p.n}: {ci}; {_p_text(raw, p_adjusted)}; {plan}"
    return Verdict("cannot tell", None, raw, raw_e, p_adjusted, p_equiv_adjusted, text, need)


def family_verdicts(tests: dict, sesoi: dict[str, float]) -> dict:
    """Verdicts of a family under Holm: ``tests`` ``{key: (Paired, metric, higher_is_better)}``; every key's
    difference and equivalence p-values are adjusted together (2m hypotheses). Returns ``{key: Verdict}``."""
    keys = list(tests)
    raw = [p_difference(p) for p, _, _ in tests.values()]
    raw_e = [p_equivalence(p, margin(p, sesoi[metric])) for p, metric, _ in tests.values()]
    adjusted = holm(raw + raw_e)
    out = {}
    for i, k in enumerate(keys):
        p, metric, higher = tests[k]
        out[k] = verdict(p, sesoi[metric], higher, adjusted[i], adjusted[len(keys) + i])
    return out


def planned_seeds(p: Paired, first: set, sesoi: float, max_seeds: int = 4096) -> int:
    """The sequential rule's target (Stein's second stage): the seeds at which the comparison's 95%
    interval, with the SD of its first-stage seeds ``first``, is within ±SESOI/2 (a function of the first
    stage's spread only, never of any mean)."""
    sd0, n0 = first_stage(p, first)
    return stein_seeds(sd0, n0, margin(p, sesoi) / 2, max_seeds)


def settled(code: str) -> bool:
    return code != "cannot tell"


__all__ = ["CODES", "PRIMARY", "Verdict", "equivalence_margin", "family_verdicts", "holm", "margin",
           "p_difference", "p_equivalence", "planned_seeds", "seeds_needed", "settled", "tost_power",
           "verdict"]
