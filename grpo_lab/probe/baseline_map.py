"""The baseline map: variance, signal and SNR of A_i(c) = r_i − c·b̄₋ᵢ for every c, from two Gram blocks.

b̄₋ᵢ = mean_{j≠i} r_j is the leave-one-out mean of completion i's group, independent of o_i, so A(c) is
unbiased for every c: c = 0 is ``reward`` (the constant baseline b = 0 under the reward's coding), c = 1 is
``rloo``. With one aggregation the normalizer of the loss depends on the completion mask only, never on
the advantages, and the probe's gradient is linear in them (``gradients.py``), so on one batch

    g(c) = g_reward − c·d,     d = g_reward − g_rloo       (d: the baseline's own term, c = 1)

exactly (``rloo`` zeroes a flat group's advantages, but there r_i − b̄₋ᵢ is 0 anyway). Every statistic of
``stats.py`` is linear in the Gram matrix of the K per-batch gradients, and the Gram matrix of g(c) is

    M(c) = M₀₀ − c·(M₀d + M₀dᵀ) + c²·M_dd,     M₀₀ = R,  M₀d = R − X,  M_dd = R − X − Xᵀ + L

with R, L the Gram matrices of ``reward`` and ``rloo`` and X[k, l] = g_reward,k · g_rloo,l their cross-Gram.
So V(c) = v₀ − 2c·v₁ + c²·v₂ and S(c) = s₀ − 2c·s₁ + c²·s₂ are quadratics (:class:`Quadratics`), and

    c* = argmin V(c) = v₁ / v₂,   V(c*)/V(0) = 1 − v₁² / (v₀ v₂)

in closed form. S(c) estimates ‖∇J‖² for every c (E d = 0: the baseline term has mean zero, up to the
token-count normalizer's dependence on o_i), so s₁, s₂ ≈ 0 and SNR(c) follows 1/V(c).

Per-point intervals are a jackknife over the K batches (each leave-one-out statistic is O(K²) from the
same matrices), with a Student t on K − 1 degrees of freedom (``scipy.stats``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

PAIR = ("reward", "rloo")  # the probe's estimators whose gradients span the family: c = 0 and c = 1
C_GRID: tuple[float, ...] = tuple(round(-0.5 + 0.1 * i, 2) for i in range(21))  # −0.5 … 1.5


def cross_gram(a: Tensor, b: Tensor, chunk: int = 1 << 16) -> np.ndarray:
    """X[k, l] = a_k · b_l ``[K, K]`` (float64) of two stacks of K gradients ``[K, D]``, in column chunks."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [K, D] stacks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64)
    for lo in range(0, a.shape[1], chunk):
        out += a[:, lo : lo + chunk].double() @ b[:, lo : lo + chunk].double().T
    return out.numpy()


def _v_s(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V, S)`` of Gram-like matrices ``[..., K, K]`` and, along a leading axis, of each leave-one-out
    submatrix: V = (tr M − ΣM/K)/(K − 1), S = (ΣM − tr M)/(K(K − 1)) (``stats.py``), both linear in M."""
    k = m.shape[-1]
    tr = np.trace(m, axis1=-2, axis2=-1)
    total = m.sum(axis=(-2, -1))
    return (tr - total / k) / (k - 1), (total - tr) / (k * (k - 1))


def _leave_one_out(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V [K], S [K])`` of M with batch k left out, for each k (O(K²) in all)."""
    k = m.shape[0]
    n = k - 1
    diag = np.diagonal(m)
    tr = np.trace(m) - diag
    total = m.sum() - m.sum(0) - m.sum(1) + diag
    return (tr - total / n) / (n - 1), (total - tr) / (n * (n - 1))


@dataclass(frozen=True)
class Quadratics:
    """V(c) = v₀ − 2c·v₁ + c²·v₂ and S(c) = s₀ − 2c·s₁ + c²·s₂ of the family g(c) = g₀ − c·d at one point
    (``v``/``s`` are ``(x₀, x₁, x₂)``; arrays along a leading axis for the jackknife)."""

    v: tuple
    s: tuple

    def variance(self, c):
        v0, v1, v2 = self.v  # a scalar c with arrays of coefficients, or an array of c with scalars
        return v0 - 2 * np.asarray(c) * v1 + np.square(c) * v2

    def signal(self, c):
        s0, s1, s2 = self.s
        return s0 - 2 * np.asarray(c) * s1 + np.square(c) * s2

    def snr(self, c):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.signal(c) / self.variance(c)

    def v_ratio(self, c):
        """V(c)/V(0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.variance(c) / self.v[0]

    @property
    def c_star(self):
        """argmin_c V(c) = v₁/v₂ (NaN when v₂ ≤ 0: V is then not a convex parabola)."""
        v1, v2 = np.asarray(self.v[1], float), np.asarray(self.v[2], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v2 > 0, v1 / v2, np.nan)

    @property
    def v_star_ratio(self):
        """V(c*)/V(0) = 1 − v₁²/(v₀v₂)."""
        v0, v1, v2 = (np.asarray(x, float) for x in self.v)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v2 > 0, 1 - v1**2 / (v0 * v2), np.nan)


def family_grams(reward: np.ndarray, cross: np.ndarray, rloo: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(M₀₀, M₀d, M_dd)`` ``[K, K]`` from R, X, L (module docstring); M₀d symmetrised (only its
    symmetric part enters V and S)."""
    r, x, ll = (np.asarray(a, dtype=np.float64) for a in (reward, cross, rloo))
    m0d = r - (x + x.T) / 2
    return r, m0d, r - x - x.T + ll


def quadratics(reward: np.ndarray, cross: np.ndarray, rloo: np.ndarray) -> Quadratics:
    """The family's :class:`Quadratics` from the Gram blocks of ``reward`` (R), ``rloo`` (L) and the
    cross-Gram X[k, l] = g_reward,k · g_rloo,l, all ``[K, K]``."""
    m00, m0d, mdd = family_grams(reward, cross, rloo)
    (v0, s0), (v1, s1), (v2, s2) = (tuple(float(x) for x in _v_s(m)) for m in (m00, m0d, mdd))
    return Quadratics((v0, v1, v2), (s0, s1, s2))


def jackknife_quadratics(reward: np.ndarray, cross: np.ndarray, rloo: np.ndarray) -> Quadratics:
    """K :class:`Quadratics` (arrays ``[K]``), the k-th without batch k."""
    parts = [_leave_one_out(m) for m in family_grams(reward, cross, rloo)]
    return Quadratics(tuple(p[0] for p in parts), tuple(p[1] for p in parts))


def jackknife_interval(full: float, loo: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """``(lo, hi)``: full ± t_{K−1} · SE_jack, SE² = (K − 1)/K · Σ (θ₋ₖ − mean θ₋)² (NaN if any θ₋ₖ is)."""
    loo = np.asarray(loo, dtype=np.float64)
    k = loo.size
    if k < 3 or not np.isfinite(loo).all() or not math.isfinite(full):
        return math.nan, math.nan
    se = math.sqrt((k - 1) / k * float(((loo - loo.mean()) ** 2).sum()))
    half = float(sps.t.ppf(0.5 + confidence / 2, k - 1)) * se
    return full - half, full + half


def point_map(reward: np.ndarray, cross: np.ndarray, rloo: np.ndarray) -> dict:
    """One probe point's map, JSON-ready: ``v``/``s`` (the quadratics' coefficients, so any c can be
    evaluated later), ``k``, and with jackknife intervals ``c_star``, ``v1_ratio`` (V(1)/V(0)) and
    ``v_star_ratio`` (V(c*)/V(0)); the ratios' intervals from the jackknife of their logs."""
    q, jack = quadratics(reward, cross, rloo), jackknife_quadratics(reward, cross, rloo)
    out: dict = {"v": list(q.v), "s": list(q.s), "k": int(np.asarray(reward).shape[0])}
    with np.errstate(divide="ignore", invalid="ignore"):
        cases = {"c_star": (float(q.c_star), jack.c_star, False),
                 "v1_ratio": (float(q.v_ratio(1.0)), jack.v_ratio(1.0), True),
                 "v_star_ratio": (float(q.v_star_ratio), jack.v_star_ratio, True)}
        for name, (value, loo, log) in cases.items():
            if log:
                ok = value > 0 and bool(np.all(loo > 0))
                lo, hi = jackknife_interval(math.log(value), np.log(loo)) if ok else (math.nan, math.nan)
                lo, hi = math.exp(lo), math.exp(hi)
            else:
                lo, hi = jackknife_interval(value, loo)
            out.update({name: value, f"{name}_lo": lo, f"{name}_hi": hi})
    return out


def curve(point: dict, grid=C_GRID) -> dict[str, list[float]]:
    """V(c)/V(0), S(c) and SNR(c) on ``grid`` from a stored :func:`point_map`."""
    q = Quadratics(tuple(point["v"]), tuple(point["s"]))
    c = np.asarray(grid, dtype=np.float64)
    return {"c": c.tolist(), "v_ratio": np.asarray(q.v_ratio(c), float).tolist(),
            "signal": np.asarray(q.signal(c), float).tolist(), "snr": np.asarray(q.snr(c), float).tolist()}
