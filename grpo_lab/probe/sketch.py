"""A fixed random projection of gradient rows whose dot products are unbiased: a CountSketch.

The probe's statistics are all inner products of gradients (``stats.py``), so it can keep d-dim sketches
S·g instead of the D-dim gradients when E_S[(S·x)·(S·y)] = x·y for every x, y. A CountSketch does that
with O(D) work and no D×d matrix: coordinate i of x is added, with a sign s(i) = ±1, to bucket h(i) of d,

    (S·x)[j] = Σ_{i: h(i) = j} s(i) x_i,     (S·x)·(S·y) = x·y + Σ_{i≠j, h(i)=h(j)} s(i) s(j) x_i y_j,

and the cross terms have mean 0 because the signs are pairwise independent. With 4-wise independent h and
s its variance is (‖x‖²‖y‖² + (x·y)² − 2 Σ_i x_i² y_i²) / d (Charikar, Chen & Farach-Colton 2002; the same
as a Gaussian projection's (‖x‖²‖y‖² + (x·y)²) / d but for the last term), so the relative error of a
squared norm is about √(2/d): 0.6% at d = 65536.

h and s are degree-3 polynomials over the prime field p = 2³¹ − 1 of the coordinate's index in the flat
gradient (4-wise independent), their 8 coefficients drawn from ``seed``. They are computed on the
gradient's own device, chunk by chunk, and kept (5 bytes per parameter), so a sketch never materialises
anything of size D × d, the gradient never leaves its device, and one seed gives the same sketch on every
device. A gradient given as per-parameter tensors is projected parameter by parameter (its
coordinates numbered as in the flat vector), so the result equals the flat vector's sketch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

PRIME = 2**31 - 1
CHUNK = 1 << 22  # indices hashed at once: 4M int64 temporaries (32 MiB each)


Coefficients = tuple[tuple[int, ...], tuple[int, ...]]


def hash_coefficients(seed: int) -> Coefficients:
    """The 4 coefficients in [0, p) of the bucket polynomial and the 4 of the sign polynomial, from
    ``seed`` (Python ints: hashing on a GPU never waits for the host to read them)."""
    gen = torch.Generator().manual_seed(int(seed))
    bucket, sign = torch.randint(0, PRIME, (2, 4), generator=gen, dtype=torch.int64).tolist()
    return tuple(bucket), tuple(sign)


def polynomial_hash(index: Tensor, coefs: Sequence[int]) -> Tensor:
    """``(c3 i³ + c2 i² + c1 i + c0) mod p`` of int64 ``index`` (< p), by Horner's rule: every product stays
    below 2⁶² (both factors < 2³¹), so int64 never overflows."""
    c3, c2, c1, c0 = (int(c) for c in coefs)
    h = torch.full_like(index, c3)
    for c in (c2, c1, c0):
        h = (h * index + c) % PRIME
    return h


def buckets_and_signs(index: Tensor, coefs: Coefficients, dim: int) -> tuple[Tensor, Tensor]:
    """The bucket in [0, dim) (int64) and the sign ±1 (float64) of each flat coordinate ``index``."""
    bucket = polynomial_hash(index, coefs[0]) % dim
    sign = 1.0 - 2.0 * (polynomial_hash(index, coefs[1]) & 1).to(torch.float64)
    return bucket, sign


def hashes(offset: int, n: int, coefs: Coefficients, dim: int, device: torch.device | str = "cpu",
           chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """``(bucket int32 [n], sign int8 [n])`` of the flat coordinates ``offset .. offset + n``, hashed on
    ``device`` ``chunk`` coordinates at a time (int64 temporaries of ``chunk`` entries only)."""
    bucket = torch.empty(n, dtype=torch.int32, device=device)
    sign = torch.empty(n, dtype=torch.int8, device=device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        index = torch.arange(offset + lo, offset + hi, device=device, dtype=torch.int64)
        b, s = buckets_and_signs(index, coefs, dim)  # [c] each
        bucket[lo:hi], sign[lo:hi] = b, s
    return bucket, sign


@dataclass(frozen=True)
class CountSketch:
    """The probe's projection of D-dim gradients to ``dim`` dimensions (see the module docstring).

    The buckets and signs of each parameter are hashed once, on its device, and kept for the sketch's life
    (one probe): 5 bytes per parameter (int32 bucket, int8 sign), nothing of size D × d. Every projection
    after the first is one ``index_add_`` per parameter."""

    dim: int
    """d, the sketch's dimension (buckets); the Gram matrices are accumulated from d-dim rows."""
    seed: int = 0
    """Seed of the hash polynomials: one seed, one fixed projection for every row of a probe."""
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    """``{(offset, n, device): (bucket, sign)}``, filled as parameters are first projected."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"a sketch needs dim >= 1, got {self.dim}")

    def hashes(self, offset: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The (cached) buckets and signs of coordinates ``offset .. offset + n`` on ``device``."""
        key = (offset, n, str(device))
        if key not in self.cache:
            self.cache[key] = hashes(offset, n, hash_coefficients(self.seed), self.dim, device)
        return self.cache[key]

    def add(self, out: Tensor, x: Tensor, offset: int) -> None:
        """``out [d] += S · x`` for the flat coordinates ``offset .. offset + x.numel()`` (float64 sums)."""
        bucket, sign = self.hashes(offset, x.numel(), x.device)
        out.index_add_(0, bucket, x.detach().reshape(-1).to(torch.float64) * sign)

    def project(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
        """``[d]`` float32 on the CPU: S·g of the gradient given per parameter (``None``: zeros, as
        ``torch.autograd.grad(..., allow_unused=True)`` returns them), projected on its device."""
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        out = torch.zeros(self.dim, dtype=torch.float64, device=device)
        offset = 0
        for g, p in zip(grads, params, strict=True):
            if g is not None:
                self.add(out, g, offset)
            offset += p.numel()
        return out.float().cpu()

    def project_rows(self, rows: Tensor) -> Tensor:
        """``[n, d]`` float64: S·x of each row of ``rows`` ``[n, D]`` (for tests and gradients at hand)."""
        out = torch.zeros(rows.shape[0], self.dim, dtype=torch.float64, device=rows.device)
        for i in range(rows.shape[0]):
            self.add(out[i], rows[i], 0)
        return out
