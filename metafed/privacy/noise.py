"""Randomness that protects privacy: Gaussian noise and client sampling drawn from a
cryptographically secure generator.

``PrivacyRandom.secure()`` keys AES-256-CTR with 32 bytes from the OS's secure generator
(``os.urandom``); the key lives only in memory and is never written anywhere, so nobody
holding the run folder can rebuild the noise or the cohort. Uniforms take the top 53 bits
of each 64-bit keystream word; normals come from the Box-Muller transform in float64, so
their tails reach sqrt(-2 ln 2^-53) ~ 8.57 sigma (float32 ``torch.randn`` stops near 5.77
sigma, truncating the Gaussian the accountant assumes).

``PrivacyRandom.insecure_reproducible(seed, ...)`` derives the key from the seed: same
numbers on every run, for tests and benchmarks only. Anyone who knows the seed can subtract
the noise, so a run that uses it reports that its privacy guarantee does not hold.
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_POW_53 = float(2 ** 53)


class PrivacyRandom:
    def __init__(self, key: bytes, secure: bool):
        if len(key) != 32:
            raise ValueError("a privacy generator needs a 32-byte key")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.secure = secure

    @classmethod
    def secure_fresh(cls) -> "PrivacyRandom":
        return cls(os.urandom(32), secure=True)

    @classmethod
    def insecure_reproducible(cls, seed: int, *stream: int) -> "PrivacyRandom":
        material = repr(("metafed insecure reproducible privacy randomness", seed, *stream)).encode()
        return cls(hashlib.sha256(material).digest(), secure=False)

    def words(self, n: int) -> np.ndarray:
        """n uniform uint64 words (little-endian keystream)."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8").astype(np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """float64 [n], uniform on [0, 1) with 53-bit resolution."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) / _TWO_POW_53

    def normal(self, n: int) -> np.ndarray:
        """float64 [n] standard normals (Box-Muller; u1 in (0, 1] so the log is finite)."""
        pairs = -(-n // 2)
        u1 = 1.0 - self.uniform(pairs)  # (0, 1]
        u2 = self.uniform(pairs)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
        return z[:n]

    def normal_tensor(self, shape, std: float) -> torch.Tensor:
        """float64 tensor of N(0, std^2) draws."""
        n = int(np.prod(shape)) if len(shape) else 1
        return torch.from_numpy(self.normal(n) * std).reshape(tuple(shape))

    def sample_fixed(self, num_clients: int, per_round: int) -> np.ndarray:
        """m of N clients uniformly without replacement (a random permutation's first m)."""
        if per_round >= num_clients:
            return np.arange(num_clients)
        return np.argsort(self.uniform(num_clients), kind="stable")[:per_round]

    def sample_poisson(self, num_clients: int, per_round: int) -> np.ndarray:
        """Each client independently with probability q = m / N."""
        q = min(1.0, per_round / num_clients)
        return np.flatnonzero(self.uniform(num_clients) < q)


def box_muller_extreme() -> float:
    """The largest |z| the normal sampler can return: sqrt(-2 ln 2^-53)."""
    return math.sqrt(-2.0 * math.log(1.0 / _TWO_POW_53))
