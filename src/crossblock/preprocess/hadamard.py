"""Orthonormal Hadamard matrices of many sizes, and seeded random orthogonal ones where none is known.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal and every
entry has the same magnitude: x ↦ x H / √n spreads one large channel evenly over all n. Orders
are 1, 2 or multiples of 4. Built here:
- Sylvester: H_{2m} = [[H_m, H_m], [H_m, -H_m]], every power of two;
- Paley I: q a prime power, q ≡ 3 (mod 4): order q + 1;
- Paley II: q a prime power, q ≡ 1 (mod 4): order 2 (q + 1);
- Kronecker products: H_a ⊗ H_b is Hadamard of order a·b, so n = base · 2^k works whenever the
  base has a Paley construction (12, 20, 28, 36, 44, 60, 72, ... times any 2^k: SmolLM2's
  576 = 36·16 and 1536 = 12·128).
Both Paley constructions use the quadratic character χ of GF(q) (χ(0) = 0, χ(a) = 1 when a is a
nonzero square, else -1) through the Jacobsthal matrix Q[i, j] = χ(a_i - a_j). Orders with no
construction here (e.g. 172 = 4·43: 171 and 85 are no prime powers) get a seeded random
orthogonal base instead: QR of a Gaussian with the signs of R's diagonal made positive (Haar
distributed), still Kronecker with the largest Sylvester factor so that it stays small.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


# -- finite fields GF(p^k), just enough for χ --------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # the smallest factor is prime
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """a·b mod (monic `mod`) over GF(p); polynomials as coefficient lists, lowest degree first."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # x^d = x^(d-k)·(x^k) and x^k = -(mod - x^k)
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * mod[i]) % p
    return prod[:k]


def _digits(a: int, p: int, k: int) -> list[int]:
    return [a // p ** i % p for i in range(k)]


def _number(d: list[int], p: int) -> int:
    return sum(c * p ** i for i, c in enumerate(d))


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k over GF(p) with no monic factor of degree <= k/2,
    i.e. irreducible (brute force; q is small here)."""
    def divides(f, g):  # does monic f divide g (both coefficient lists)
        g = g[:]
        for d in range(len(g) - 1, len(f) - 2, -1):
            c = g[d]
            if c:
                for i in range(len(f)):
                    g[d - len(f) + 1 + i] = (g[d - len(f) + 1 + i] - c * f[i]) % p
        return not any(g)
    for tail in range(p ** k):
        g = _digits(tail, p, k) + [1]
        if not any(divides(_digits(t, p, d) + [1], g) for d in range(1, k // 2 + 1) for t in range(p ** d)):
            return g
    raise AssertionError("every degree has an irreducible polynomial")


def quadratic_character(q: int) -> list[list[int]]:
    """χ(a_i - a_j) for all elements i, j of GF(q) (elements numbered by their base-p digits)."""
    p, k = _prime_power(q)
    if k == 1:
        squares = {a * a % p for a in range(1, p)}
        diff = lambda i, j: (i - j) % p  # noqa: E731
    else:
        mod = _irreducible(p, k)
        squares = {_number(_poly_mulmod(_digits(a, p, k), _digits(a, p, k), mod, p), p) for a in range(1, q)}
        diff = lambda i, j: _number([(x - y) % p for x, y in zip(_digits(i, p, k), _digits(j, p, k))], p)  # noqa: E731
    chi = lambda a: 0 if a == 0 else (1 if a in squares else -1)  # noqa: E731
    return [[chi(diff(i, j)) for j in range(q)] for i in range(q)]


# -- Hadamard constructions (entries ±1, H Hᵀ = n I) --------------------------------------------
def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def paley_order(n: int) -> str | None:
    """"paley1" or "paley2" if that construction gives order n, else None."""
    if _prime_power(n - 1) and (n - 1) % 4 == 3:
        return "paley1"
    if n % 2 == 0 and _prime_power(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@lru_cache(maxsize=None)
def _paley(n: int) -> torch.Tensor:
    kind = paley_order(n)
    q = n - 1 if kind == "paley1" else n // 2 - 1
    jac = torch.tensor(quadratic_character(q), dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 1:] = jac
    if kind == "paley1":  # Q antisymmetric: H = I + S with S = [[0, 1ᵀ], [-1, Q]]
        s[1:, 0] = -1
        h = torch.eye(q + 1, dtype=torch.float64) + s
    else:  # Q symmetric: S = [[0, 1ᵀ], [1, Q]], 0 -> [[1, -1], [-1, -1]], ±1 -> ±[[1, 1], [1, -1]]
        s[1:, 0] = 1
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(s, one) + torch.kron((s == 0).double(), zero)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)), f"Paley construction of {n} failed"
    return h


@dataclass(frozen=True)
class Factors:
    """An orthogonal n x n matrix as base ⊗ (Sylvester 2^k)/√2^k: `base` (its order) and `power`
    (2^k); kind "hadamard" (Paley or 1) or "random-orthogonal" (seeded base)."""
    kind: str
    base: int
    power: int

    @property
    def size(self) -> int:
        return self.base * self.power


def factors(n: int, random: bool = False) -> Factors:
    """The decomposition hadamard(n) uses: the largest power of two with a Hadamard base, else a
    random orthogonal base times the largest power of two; random=True: one dense random base."""
    if n < 1:
        raise ValueError(f"no orthogonal matrix of size {n}")
    power = n & -n  # the largest power of two dividing n
    if random:
        return Factors("random-orthogonal", n, 1)
    p = power
    while p >= 1:
        base = n // p
        if base == 1 or paley_order(base):
            return Factors("hadamard", base, p)
        p //= 2
    return Factors("random-orthogonal", n // power, power)  # base >= 3: 1 and 2 are Hadamard


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal n x n (float64): Q of the QR of a seeded Gaussian, columns signed
    so that R's diagonal is positive (otherwise the distribution is not uniform)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def base_matrix(f: Factors, seed: int | None) -> torch.Tensor:
    """The orthonormal base factor (float64)."""
    if f.kind == "random-orthogonal":
        return random_orthogonal(f.base, 0 if seed is None else seed)
    return (_paley(f.base) if f.base > 1 else torch.ones(1, 1, dtype=torch.float64)) / f.base ** 0.5


def dense(f: Factors, seed: int | None = None) -> torch.Tensor:
    return torch.kron(base_matrix(f, seed), sylvester(f.power) / f.power ** 0.5)


def hadamard(n: int, seed: int | None = None) -> tuple[torch.Tensor, str]:
    """(n x n float64 orthonormal matrix, kind): a Hadamard matrix / √n where a construction is
    known, else kind "random-orthogonal" (seeded base ⊗ Sylvester). Deterministic in (n, seed)."""
    f = factors(n)
    return dense(f, seed), f.kind


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded ±1 vector (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def randomized_hadamard(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(D H, kind) with D a seeded random ±1 diagonal (QuaRot): x D H flips input signs, then
    spreads. Still orthonormal; different seeds give different matrices of the same kind."""
    h, kind = hadamard(n, seed)
    return random_signs(n, seed)[:, None] * h, kind
