"""Fixed-point encoding of real vectors into Z_{2^64} for masked summation.

x in [-R, R] maps to q = round((x + R) * s), s = (2^bits - 1) / (2R), so 0 <= q < 2^bits.
The sum of n encodings must stay below the modulus 2^64: configurations with
n * (2^bits - 1) >= 2^64 are refused. Values outside [-R, R] are an error naming how many
there are; nothing is silently clamped. Decoding: sum(x) = sum(q) / s - n R, exact up to
n * 0.5 / s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 64


class QuantizationRangeError(ValueError):
    """Some input lies outside the agreed fixed-point range."""


@dataclass(frozen=True)
class FixedPoint:
    value_range: float
    bits: int = 32

    def __post_init__(self):
        if not self.value_range > 0:
            raise ValueError("secure aggregation range must be > 0")
        if not 1 <= self.bits < MODULUS_BITS:
            raise ValueError(f"quantization bits must be in [1, {MODULUS_BITS - 1}]")

    @property
    def scale(self) -> float:
        return (2 ** self.bits - 1) / (2 * self.value_range)

    def check_capacity(self, n: int) -> None:
        """Refuse sums that could wrap the 2^64 modulus, or leave float64's exact-integer range
        (2^53) when decoded."""
        if n * (2 ** self.bits - 1) >= 2 ** 53:
            raise ValueError(f"{n} clients x {self.bits}-bit values could overflow the modulus / exact decoding "
                             f"range: use at most {53 - n.bit_length()} bits")

    def max_error(self, n: int) -> float:
        """Worst-case absolute error of a decoded sum of n vectors, per coordinate."""
        return n * 0.5 / self.scale

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        outside = int(np.count_nonzero(~(np.abs(x) <= self.value_range)))
        if outside:
            raise QuantizationRangeError(f"{outside} of {x.size} values lie outside [-{self.value_range}, "
                                         f"{self.value_range}] (or are not finite): raise the secure-aggregation range")
        return np.rint((x + self.value_range) * self.scale).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, n: int) -> np.ndarray:
        return total.astype(np.float64) / self.scale - n * self.value_range
