"""Update compressors, batched over clients: ``encode`` runs where the clients run (rows of
x [C, D], one flattened upload per client), ``decode`` at the server, and ``packed_bytes``
is the exact size of one client's encoded message. ``pack`` writes that message as bytes
(numpy bit packing), so the count is a tested fact, not an estimate; ``unpack`` reads one
back at the server (deployment), checking what it can (finite values, index and level
ranges) and raising ValueError on a malformed message.

- ``identity``: float32 values, 4 D bytes.
- ``randk:F`` (random-k): k = ceil(F D) coordinates drawn from a per-round seed that every
  client shares (so all keep the same coordinates; the indices are not sent), scaled by
  D / k: unbiased. 4 k bytes.
- ``topk:F``: each client's k largest-magnitude coordinates: 4 k bytes of values and 4 k of
  int32 indices. Biased: use it with error feedback (Stich et al. 2018; Karimireddy et al.
  2019), which keeps what was not sent as per-client state.
- ``qsgd:S`` (Alistarh et al. 2017): per client the L2 norm (float32) and, per coordinate,
  its sign and a level in 0..S drawn by stochastic rounding of S |x| / norm: unbiased.
  4 + ceil(D (1 + ceil(log2(S + 1))) / 8) bytes (fixed-width codes, not the paper's Elias).
- ``q8`` / ``q4``: uniform quantization between each client's min and max (two float32),
  rounded to the nearest of 2^b levels: error at most (max - min) / (2 (2^b - 1)) per
  coordinate. 8 + ceil(D b / 8) bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _k(fraction: float, d: int) -> int:
    return max(1, min(d, math.ceil(fraction * d)))


@dataclass(frozen=True)
class Identity:
    name = "identity"
    unbiased = True

    def encode(self, x: Tensor, gen: torch.Generator) -> dict:
        return {"values": x.float()}

    def decode(self, payload: dict, d: int) -> Tensor:
        return payload["values"].double()

    def packed_bytes(self, d: int) -> int:
        return 4 * d

    def pack(self, payload: dict, i: int) -> bytes:
        return payload["values"][i].numpy().astype("<f4").tobytes()

    def unpack(self, blob: bytes, d: int, gen: torch.Generator) -> dict:
        return {"values": _floats(blob, 0, d)[None]}


@dataclass(frozen=True)
class RandomK:
    fraction: float
    name = "randk"
    unbiased = True

    def indices(self, d: int, gen: torch.Generator) -> Tensor:
        return torch.randperm(d, generator=gen)[: _k(self.fraction, d)]  # shared by every client of the round

    def encode(self, x: Tensor, gen: torch.Generator) -> dict:
        idx = self.indices(x.shape[1], gen)
        return {"values": x[:, idx].float(), "idx": idx}

    def decode(self, payload: dict, d: int) -> Tensor:
        values, idx = payload["values"].double(), payload["idx"]
        out = values.new_zeros((values.shape[0], d))
        out[:, idx] = values * (d / len(idx))
        return out

    def packed_bytes(self, d: int) -> int:
        return 4 * _k(self.fraction, d)

    def pack(self, payload: dict, i: int) -> bytes:
        return payload["values"][i].numpy().astype("<f4").tobytes()

    def unpack(self, blob: bytes, d: int, gen: torch.Generator) -> dict:
        """The coordinates are not sent: the server draws the round's shared ones itself."""
        return {"values": _floats(blob, 0, _k(self.fraction, d))[None], "idx": self.indices(d, gen)}


@dataclass(frozen=True)
class TopK:
    fraction: float
    name = "topk"
    unbiased = False

    def encode(self, x: Tensor, gen: torch.Generator) -> dict:
        idx = x.abs().topk(_k(self.fraction, x.shape[1]), dim=1).indices  # [C, k]
        return {"values": x.gather(1, idx).float(), "idx": idx.to(torch.int32)}

    def decode(self, payload: dict, d: int) -> Tensor:
        values = payload["values"].double()
        return values.new_zeros((values.shape[0], d)).scatter_(1, payload["idx"].long(), values)

    def packed_bytes(self, d: int) -> int:
        return 8 * _k(self.fraction, d)

    def pack(self, payload: dict, i: int) -> bytes:
        return payload["values"][i].numpy().astype("<f4").tobytes() + payload["idx"][i].numpy().astype("<i4").tobytes()

    def unpack(self, blob: bytes, d: int, gen: torch.Generator) -> dict:
        k = _k(self.fraction, d)
        idx = torch.from_numpy(np.frombuffer(blob, dtype="<i4", count=k, offset=4 * k).astype(np.int32))
        if bool((idx < 0).any() | (idx >= d).any()) or len(torch.unique(idx)) != k:
            raise ValueError(f"top-k indices must be {k} distinct coordinates in [0, {d})")
        return {"values": _floats(blob, 0, k)[None], "idx": idx[None]}


@dataclass(frozen=True)
class QSGD:
    levels: int
    name = "qsgd"
    unbiased = True

    @property
    def level_bits(self) -> int:
        return math.ceil(math.log2(self.levels + 1))

    def encode(self, x: Tensor, gen: torch.Generator, uniform: Tensor | None = None) -> dict:
        """``uniform`` [C, D]: the rounding draws, when each client has its own stream (drawn
        from ``gen`` otherwise)."""
        x = x.double()
        norm = x.norm(dim=1, keepdim=True)  # [C, 1]
        scaled = x.abs() / norm.clamp_min(1e-300) * self.levels  # in [0, S]
        lower = scaled.floor()
        if uniform is None:
            uniform = torch.rand(x.shape, generator=gen, dtype=torch.float64)
        level = lower + (uniform < scaled - lower).double()
        return {"norm": norm.squeeze(1).float(), "level": level.to(torch.int32), "negative": x < 0}

    def decode(self, payload: dict, d: int) -> Tensor:
        sign = 1.0 - 2.0 * payload["negative"].double()
        return sign * payload["level"].double() * payload["norm"].double()[:, None] / self.levels

    def packed_bytes(self, d: int) -> int:
        return 4 + math.ceil(d * (1 + self.level_bits) / 8)

    def pack(self, payload: dict, i: int) -> bytes:
        level = payload["level"][i].numpy().astype(np.uint32)
        bits = (level[:, None] >> np.arange(self.level_bits, dtype=np.uint32)) & 1  # [D, bits], little end first
        fields = np.concatenate([payload["negative"][i].numpy()[:, None], bits.astype(bool)], axis=1)
        return payload["norm"][i].numpy().astype("<f4").tobytes() + np.packbits(fields.reshape(-1)).tobytes()

    def unpack(self, blob: bytes, d: int, gen: torch.Generator) -> dict:
        norm = _floats(blob, 0, 1)
        if float(norm[0]) < 0:
            raise ValueError("QSGD norm must be non-negative")
        fields = _bits(blob, 4, d * (1 + self.level_bits)).reshape(d, 1 + self.level_bits)
        level = (fields[:, 1:].astype(np.uint32) << np.arange(self.level_bits, dtype=np.uint32)).sum(1)
        if int(level.max(initial=0)) > self.levels:
            raise ValueError(f"QSGD levels must lie in 0..{self.levels}")
        return {"norm": norm, "level": torch.from_numpy(level.astype(np.int32))[None],
                "negative": torch.from_numpy(fields[:, 0].astype(bool))[None]}


@dataclass(frozen=True)
class Uniform:
    bits: int
    name = "uniform"
    unbiased = False

    def encode(self, x: Tensor, gen: torch.Generator) -> dict:
        lo, hi = x.min(dim=1).values.float(), x.max(dim=1).values.float()  # sent as float32
        scale = ((hi - lo).double() / (2 ** self.bits - 1)).clamp_min(1e-300)[:, None]
        code = ((x.double() - lo.double()[:, None]) / scale).round().clamp(0, 2 ** self.bits - 1)
        return {"lo": lo, "hi": hi, "code": code.to(torch.int32)}

    def decode(self, payload: dict, d: int) -> Tensor:
        lo, hi = payload["lo"].double()[:, None], payload["hi"].double()[:, None]
        return lo + payload["code"].double() * (hi - lo) / (2 ** self.bits - 1)

    def packed_bytes(self, d: int) -> int:
        return 8 + math.ceil(d * self.bits / 8)

    def pack(self, payload: dict, i: int) -> bytes:
        code = payload["code"][i].numpy().astype(np.uint32)
        bits = ((code[:, None] >> np.arange(self.bits, dtype=np.uint32)) & 1).astype(bool)
        head = np.array([payload["lo"][i].item(), payload["hi"][i].item()], dtype="<f4").tobytes()
        return head + np.packbits(bits.reshape(-1)).tobytes()

    def unpack(self, blob: bytes, d: int, gen: torch.Generator) -> dict:
        lo_hi = _floats(blob, 0, 2)
        if float(lo_hi[0]) > float(lo_hi[1]):
            raise ValueError("quantization range: min above max")
        bits = _bits(blob, 8, d * self.bits).reshape(d, self.bits).astype(np.uint32)
        code = (bits << np.arange(self.bits, dtype=np.uint32)).sum(1)
        return {"lo": lo_hi[:1], "hi": lo_hi[1:], "code": torch.from_numpy(code.astype(np.int32))[None]}


def _floats(blob: bytes, offset: int, count: int) -> Tensor:
    """``count`` little-endian float32 at ``offset``, checked finite."""
    values = torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=count, offset=offset).astype(np.float32))
    if not bool(torch.isfinite(values).all()):
        raise ValueError("encoded values hold NaN or Inf")
    return values


def _bits(blob: bytes, offset: int, count: int) -> np.ndarray:
    """The first ``count`` bits after ``offset`` bytes (numpy's big-endian bit order, as packed)."""
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8, offset=offset))[:count]


def parse_compressor(spec: str):
    """``identity`` | ``randk:F`` | ``topk:F`` (0 < F <= 1) | ``qsgd:S`` (S >= 1) | ``q8`` | ``q4``;
    raises ValueError naming the problem."""
    name, _, arg = spec.partition(":")
    try:
        if name == "identity" and not arg:
            return Identity()
        if name in ("randk", "topk"):
            fraction = float(arg)
            if not 0 < fraction <= 1:
                raise ValueError
            return RandomK(fraction) if name == "randk" else TopK(fraction)
        if name == "qsgd":
            levels = int(arg)
            if levels < 1:
                raise ValueError
            return QSGD(levels)
        if name in ("q8", "q4") and not arg:
            return Uniform(int(name[1]))
    except ValueError:
        pass
    raise ValueError(f"--compress {spec!r}: expected identity, randk:F or topk:F (0 < F <= 1), qsgd:S (S >= 1), "
                     "q8 or q4")
