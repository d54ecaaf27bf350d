"""Compressed uploads: a client's message is flattened, encoded where the client runs
(:mod:`metafed.compression.encoders`), and decoded at the server before aggregation;
``bytes_up`` counts the encoded size. With error feedback each client adds what it did not
send last time (its residual, kept as client state and checkpointed) before encoding, and
keeps the new difference: over rounds, everything a client computed is eventually sent.

In deployment the ClientApp encodes (:meth:`UploadCompression.encode_one`, the residual on
the node's disk) and the reply carries the encoded bytes; the server checks and decodes
them (:meth:`UploadCompression.decode_one`). Compression is refused with DP and secure
aggregation, whose guarantees are stated for the dense message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metafed.tree import flatten_messages, unflatten_message
from metafed.compression.encoders import QSGD, Identity, RandomK, TopK, Uniform, parse_compressor

RESIDUAL = "ef_residual"  # the client-state key of the error-feedback residual [D] (float64)


@dataclass(frozen=True)
class UploadCompression:
    encoder: object
    error_feedback: bool = False

    def round_generator(self, seed: int, rnd: int) -> torch.Generator:
        """Seeded per round (stream 15): random-k's coordinates, shared by every client."""
        return _generator(np.random.default_rng([seed, 15, rnd]))

    def client_generator(self, seed: int, rnd: int, client: int) -> torch.Generator:
        """The randomness an encoder draws for one client's message: the round's shared
        stream for random-k, the client's own (stream 16) for QSGD's stochastic rounding,
        so that a client encodes the same bits in simulation and on its own node."""
        if isinstance(self.encoder, QSGD):
            return _generator(np.random.default_rng([seed, 16, rnd, client]))
        return self.round_generator(seed, rnd)

    def apply(self, sent: dict, residuals: Tensor | None, seed: int, rnd: int,
              clients: list[int]) -> tuple[dict, Tensor | None, int]:
        """Stacked uploads [C, ...] of ``clients`` -> (what the server decodes [C, ...], the
        new residuals [C, D] with error feedback, the encoded bytes of one client's message).
        Encoding and decoding run batched over the C rows."""
        x, layout = flatten_messages(sent)  # [C, D] float64
        d = x.shape[1]
        target = x + residuals if residuals is not None else x
        gen = self.round_generator(seed, rnd)
        if isinstance(self.encoder, QSGD):  # each client's own rounding stream; encoding stays batched
            uniform = torch.stack([torch.rand(d, generator=self.client_generator(seed, rnd, c), dtype=torch.float64)
                                   for c in clients])  # [C, D]
            payload = self.encoder.encode(target, gen, uniform)
        else:
            payload = self.encoder.encode(target, gen)
        decoded = self.encoder.decode(payload, d)  # [C, D]
        new_residuals = target - decoded if self.error_feedback else None
        return unflatten_message(decoded, layout), new_residuals, self.encoder.packed_bytes(d)

    def encode_one(self, x: Tensor, residual: Tensor | None, seed: int, rnd: int,
                   client: int) -> tuple[bytes, Tensor | None]:
        """Where a client runs (deployment): its flat upload x [D] (float64) -> (the bytes it
        sends, its new residual [D] under error feedback). Same bits as :meth:`apply`'s row."""
        target = (x + residual if residual is not None else x)[None]  # [1, D]
        payload = self.encoder.encode(target, self.client_generator(seed, rnd, client))
        decoded = self.encoder.decode(payload, x.shape[0])[0]
        return self.encoder.pack(payload, 0), (target[0] - decoded if self.error_feedback else None)

    def decode_one(self, blob: bytes, d: int, seed: int, rnd: int) -> Tensor:
        """At the server: one client's bytes -> its decoded upload [D] (float64). Raises
        ValueError on a message of the wrong size or with out-of-range content."""
        if len(blob) != self.encoder.packed_bytes(d):
            raise ValueError(f"encoded upload of {len(blob)} bytes, expected {self.encoder.packed_bytes(d)}")
        return self.encoder.decode(self.encoder.unpack(blob, d, self.round_generator(seed, rnd)), d)[0]


def _generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def make_compression(spec: str | None, error_feedback: bool) -> UploadCompression | None:
    if spec is None:
        return None
    return UploadCompression(parse_compressor(spec), error_feedback)


__all__ = ["UploadCompression", "make_compression", "parse_compressor", "RESIDUAL", "Identity", "RandomK", "TopK",
           "QSGD", "Uniform"]
