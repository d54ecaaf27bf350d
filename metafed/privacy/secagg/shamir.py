"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1) (a Mersenne prime, so
any 32-byte secret is a field element). Shamir, "How to Share a Secret", CACM 1979."""
from __future__ import annotations

import os
from typing import Callable

PRIME = 2 ** 521 - 1


def split(secret: bytes, xs: list[int], threshold: int, random_bytes: Callable[[int], bytes] = os.urandom) -> dict[int, int]:
    """Shares f(x) for each x in ``xs`` of a random degree t-1 polynomial with f(0) = secret."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [value] + [int.from_bytes(random_bytes(66), "big") % PRIME for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def combine(shares: dict[int, int], threshold: int, length: int = 32) -> bytes:
    """Lagrange interpolation at 0 from >= threshold shares; returns the ``length``-byte secret."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret.to_bytes(length, "big")
