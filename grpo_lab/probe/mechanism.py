"""Why a baseline helps or hurts: the closed-form V(c) of A_i = r_i − c·b̄₋ᵢ from per-completion moments.

One query q, G completions o_i with rewards r_i and scores s_i = ∇log π(o_i|q) (E s = 0), i.i.d.; the
query's gradient estimate X(c) = Σ_i (r_i − c·b̄₋ᵢ) s_i with b̄₋ᵢ = Σ_{j≠i} r_j / (G − 1). With

    p = E r,  p₂ = E r²,  σ² = p₂ − p²,  Q = E‖s‖²,  C = E[r‖s‖²],  D = E[r²‖s‖²],  μ = E[r s],  M = ‖μ‖²

write X(c) = Y − c/(G − 1)·Z, Y = Σ_i r_i s_i, Z = Σ_{i≠j} r_j s_i. Expanding the sums, every term with an
s_i not paired with its own r_i has mean 0, which leaves (tr Cov = the total variance):

    tr Cov Y = G(D − M)                      E[Y·Z] = G(G − 1)·pC
    E‖Z‖² = G(G − 1)·[p₂Q + (G − 2)p²Q + M],  E Z = 0

    tr Cov X(c) / G = (D − M) − 2c·pC + c²·[p²Q + (σ²Q + M)/(G − 1)]

The c-terms are b²Q − 2bC with b = c·p (the baseline's value, the textbook's extra variance of a constant
baseline: it lowers variance only for 0 < b < 2C/Q) plus c²(σ²Q + M)/(G − 1), the price of *estimating* p
from the other G − 1 completions. So V(c) = V(0) − 2c·B₁ + c²·B₂ with B₁ = E_q[pC], B₂ = E_q[p²Q + (σ²Q +
M)/(G − 1)], c* = B₁/B₂, and under a reward offset r + k (C → C + kQ, p → p + k, σ² and M unchanged)
c* → 1 as k grows. The oracle baseline b = p (known, not estimated) changes V by E_q[p²Q − 2pC].

A probe batch of P queries divides by its normalizer N (``losses.aggregation_normalizer``), so in the
probe's units V(c) = P/N² · Σ-terms above (per query: G times the per-completion value, plus the
between-query variance G²·Var_q(μ_q) in V(0), which no c changes).

Estimates from one group's G samples are unbiased U-statistics (products of moments from *different*
completions: p·C from pairs i ≠ j, p²Q from distinct triples), ``group_moments``; G ≥ 3.
"""

from __future__ import annotations

import math

import numpy as np


def group_moments(rewards: np.ndarray, gram: np.ndarray) -> dict[str, float]:
    """Unbiased estimates of one query's pC, p₂Q, p²Q, M, D and Q from its G rewards ``[G]`` and the Gram
    matrix ``[G, G]`` of its completions' scores (Γ_ij = s_i·s_j); q_i = Γ_ii.

        pC  = Σ_{i≠j} r_i q_i r_j / (G(G−1))          p₂Q = Σ_{i≠j} q_i r_j² / (G(G−1))
        p²Q = Σ_{i,j,k distinct} q_i r_j r_k / (G(G−1)(G−2))
        M   = Σ_{i≠j} r_i r_j Γ_ij / (G(G−1))         D = mean r_i² q_i,   Q = mean q_i
    """
    r = np.asarray(rewards, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    g = r.size
    if g < 3 or gram.shape != (g, g):
        raise ValueError(f"need G >= 3 rewards and a [G, G] Gram matrix, got {g} and {gram.shape}")
    q = np.diagonal(gram)
    total, total_sq = r.sum(), (r * r).sum()
    rest, rest_sq = total - r, total_sq - r * r  # Σ_{j≠i} r_j, Σ_{j≠i} r_j²  [G]
    pairs, triples = g * (g - 1), g * (g - 1) * (g - 2)
    rr = np.outer(r, r)
    return {"pC": float((r * q * rest).sum() / pairs), "p2Q": float((q * rest_sq).sum() / pairs),
            "ppQ": float((q * (rest**2 - rest_sq)).sum() / triples),
            "M": float(((rr * gram).sum() - (r * r * q).sum()) / pairs), "D": float((r * r * q).mean()),
            "Q": float(q.mean())}


def c_terms(m: dict[str, float], g: int) -> tuple[float, float]:
    """``(b₁, b₂)`` per completion of one query: b₁ = pC, b₂ = p²Q + (σ²Q + M)/(G − 1), σ²Q = p₂Q − p²Q."""
    return m["pC"], m["ppQ"] + (m["p2Q"] - m["ppQ"] + m["M"]) / (g - 1)


def exact_variance(m: dict[str, float], c: float, g: int) -> float:
    """tr Cov X(c) of one query (module docstring), from its exact moments: G·[(D − M) − 2c·b₁ + c²·b₂]."""
    b1, b2 = c_terms(m, g)
    return g * ((m["D"] - m["M"]) - 2 * c * b1 + c * c * b2)


def predict(groups: list[tuple[np.ndarray, np.ndarray]], cross: np.ndarray | None, prompts: int,
            normalizer: float) -> dict[str, float]:
    """The probe-unit quadratic V(c) = V(0) − 2c·B₁ + c²·B₂ predicted from per-completion scores.

    ``groups``: per query ``(rewards [G], score Gram [G, G])`` (unnormalized scores, one G for all);
    ``cross``: ``[n, n]`` μ̂_q·μ̂_q' between the queries' mean reward-weighted scores (for the between-query
    term of V(0); None: left out); ``prompts`` P and ``normalizer`` N of one probe batch. Returns ``b1``,
    ``b2``, ``c_star_pred`` = B₁/B₂, ``v0_pred`` (within- plus between-query variance at c = 0) and
    ``oracle_delta`` = P·G·E_q[p²Q − 2pC]/N² (the change of V from the oracle baseline b = p)."""
    g = groups[0][0].size
    moments = [group_moments(r, gram) for r, gram in groups]
    terms = np.array([c_terms(m, g) for m in moments])  # [n, 2]
    scale = prompts * g / normalizer**2
    b1, b2 = (float(x) * scale for x in terms.mean(0))
    within = float(np.mean([m["D"] - m["M"] for m in moments]))
    between = math.nan
    if cross is not None and len(groups) >= 2:
        n = len(groups)
        mean_sq = float(np.mean([m["M"] for m in moments]))  # E_q‖μ_q‖²
        sq_mean = (cross.sum() - np.trace(cross)) / (n * (n - 1))  # ‖E_q μ_q‖² (pairs of queries)
        between = g * g * (mean_sq - float(sq_mean))
    oracle = float(np.mean([m["ppQ"] - 2 * m["pC"] for m in moments])) * scale
    return {"b1": b1, "b2": b2, "c_star_pred": b1 / b2 if b2 > 0 else math.nan,
            "v0_pred": prompts * (g * within + between) / normalizer**2, "oracle_delta": oracle}


def score_norm_ratio(rewards: np.ndarray, sq_norms: np.ndarray) -> dict[str, float]:
    """Failures' and successes' mean squared score norm and their ratio. A completion succeeds when its
    reward is above the midpoint of the rewards seen (any coding of a 0/1 reward); NaN without both kinds."""
    r, q = np.asarray(rewards, np.float64).ravel(), np.asarray(sq_norms, np.float64).ravel()
    mid = (r.min() + r.max()) / 2 if r.size else math.nan
    win, lose = q[r > mid], q[r <= mid]
    qs = float(win.mean()) if win.size else math.nan
    qf = float(lose.mean()) if lose.size and win.size else math.nan
    return {"q_success": qs, "q_failure": qf, "n_success": int(win.size), "n_failure": int(lose.size),
            "score_norm_ratio": qf / qs if qs > 0 else math.nan}
