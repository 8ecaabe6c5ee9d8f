"""Orthogonal matrices that spread a channel's outlier over every channel evenly: randomised Hadamard matrices.

A rotation fused into the weights costs nothing at run time whatever its structure, so the fast transform a
Hadamard matrix allows does not matter here; its flat entries (every one ±1/√n) do: an outlier channel is spread
over all n channels equally, where a random orthogonal matrix spreads it unevenly (Gaussian entries), which leaves
some channels larger than others. Hidden sizes that are not a power of two (576 = 36·16, 896 = 28·32,
1536 = 12·128) take a Kronecker product of a Paley Hadamard matrix (built from the quadratic residues of a prime)
and a Sylvester one; a size with no such factor falls back to a random orthogonal matrix (Haar), and says so.
"""
from __future__ import annotations

import numpy as np


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i), χ the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order n by Paley's constructions over a prime field, or None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return np.eye(n, dtype=np.int64) + s, "Paley I"
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(c, [[1, -1], [-1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, 1], [1, -1]]), "Paley II"
    return None


def sylvester(n: int) -> np.ndarray:
    """The ±1 Walsh-Hadamard matrix of order n (a power of two), Sylvester's construction (ggml's too)."""
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(n: int) -> tuple[np.ndarray, str] | None:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I) and how it was built, or None when none is known here."""
    power = n & -n  # the largest power of two dividing n
    if power == n:
        return sylvester(n), f"Sylvester {n}"
    odd = n // power
    factor = odd
    while factor <= n:  # the smallest Paley order odd·2^j, times a Sylvester matrix for the rest
        found = _paley(factor)
        if found is not None:
            h = np.kron(found[0], sylvester(n // factor))
            if np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64)):
                return h, f"{found[1]} {factor} ⊗ Sylvester {n // factor}"
        factor *= 2
    return None


def random_rotation(n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """An n×n orthogonal matrix (float64): a Hadamard matrix with random signs on its rows when one is known,
    else a Haar-random orthogonal matrix; and what it is, for the manifest."""
    found = hadamard(n)
    if found is not None:
        h, how = found
        signs = rng.choice([-1.0, 1.0], size=n)
        return signs[:, None] * h / np.sqrt(n), f"randomised Hadamard ({how})"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :], f"random orthogonal {n}×{n} (no Hadamard matrix of order {n} known here)"
