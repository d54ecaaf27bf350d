"""Compressed uploads: a client's message is flattened, encoded where the client runs
(:mod:`metafed.compression.encoders`), and decoded at the server before aggregation;
``bytes_up`` counts the encoded size. With error feedback each client adds what it did not
send last time (its residual, kept as client state and checkpointed) before encoding, and
keeps the new difference: over rounds, everything a client computed is eventually sent.

Simulation only for now: in deployment the Flower messages still carry dense float32 (the
config refuses the combination), and compression is refused with DP and secure
aggregation, whose guarantees are stated for the dense message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metafed.aggregate.robust import flatten_messages, unflatten_message
from metafed.compression.encoders import QSGD, Identity, RandomK, TopK, Uniform, parse_compressor

RESIDUAL = "ef_residual"  # the client-state key of the error-feedback residual [D] (float64)


@dataclass(frozen=True)
class UploadCompression:
    encoder: object
    error_feedback: bool = False

    def round_generator(self, seed: int, rnd: int) -> torch.Generator:
        """Seeded per round (stream 15): random-k's shared coordinates, QSGD's rounding."""
        return torch.Generator().manual_seed(int(np.random.default_rng([seed, 15, rnd]).integers(2 ** 62)))

    def apply(self, sent: dict, residuals: Tensor | None, gen: torch.Generator) -> tuple[dict, Tensor | None, int]:
        """Stacked uploads [C, ...] -> (what the server decodes [C, ...], the new residuals
        [C, D] with error feedback, the encoded bytes of one client's message)."""
        x, layout = flatten_messages(sent)  # [C, D] float64
        target = x + residuals if residuals is not None else x
        decoded = self.encoder.decode(self.encoder.encode(target, gen), x.shape[1])  # [C, D]
        new_residuals = target - decoded if self.error_feedback else None
        return unflatten_message(decoded, layout), new_residuals, self.encoder.packed_bytes(x.shape[1])


def make_compression(spec: str | None, error_feedback: bool) -> UploadCompression | None:
    if spec is None:
        return None
    return UploadCompression(parse_compressor(spec), error_feedback)


__all__ = ["UploadCompression", "make_compression", "parse_compressor", "RESIDUAL", "Identity", "RandomK", "TopK",
           "QSGD", "Uniform"]
