"""Compressed broadcasts (``--compress-down``): the server sends each round an encoded
*change* of the model, and every client trains from a replica rebuilt from those changes.

The server keeps the replica w^ that clients hold (flat [D], in its state) and, each
round, encodes ``w_t - w^_{t-1}`` with any upload encoder (:mod:`metafed.compression.encoders`)
and adds the decoded change to the replica: ``w^_t = w^_{t-1} + decode(encode(w_t - w^_{t-1}))``.
What an encoder leaves out stays in ``w_t - w^_t`` and is sent in later rounds: the
server-side error feedback of error-compensated double compression (Tang et al.,
"DoubleSqueeze", ICML 2019, arXiv:1905.05957). Clients train from ``w^_t``; the server
applies their aggregated change to its own ``w_t``, which is what global evaluation scores.

Exact bytes down: a sampled client that synced in round s downloads the payloads of rounds
s+1..t (each the encoder's packed size), or the dense replica (4 D bytes) when that is
smaller or it has never synced. The last round each client synced is server state too,
so checkpoints resume the count exactly. Random draws (random-k's coordinates, QSGD's
rounding) come from ``default_rng([seed, 29, round])``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from metafed.aggregate.robust import flatten_messages, unflatten_message
from metafed.compression.encoders import parse_compressor

REPLICA, SYNCED = "down.replica", "down.synced"
DOWN_STREAM = 29


@dataclass(frozen=True)
class BroadcastCompression:
    encoder: object

    def apply(self, state, broadcast: dict, cohort: np.ndarray, num_clients: int, seed: int, rnd: int):
        """(new server state holding the replica, the broadcast with the replica as ``params``,
        bytes down of the cohort's ``params``)."""
        flat, layout = flatten_messages({k: v[None] for k, v in broadcast["params"].items()})  # [1, D] float64
        d = flat.shape[1]
        replica = state.extra.get(REPLICA)
        synced = state.extra.get(SYNCED)
        if replica is None:  # round 1: every client starts from the same initial model
            replica, synced = flat[0].float(), torch.zeros(num_clients, dtype=torch.int64)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, DOWN_STREAM, rnd]).integers(2 ** 62)))
        change = self.encoder.decode(self.encoder.encode(flat - replica.double()[None], gen), d)[0]  # [D]
        replica = (replica.double() + change).float()
        dense, payload = 4 * d, self.encoder.packed_bytes(d)
        behind = rnd - synced[torch.as_tensor(cohort, dtype=torch.int64)]  # [C] rounds each client missed
        fresh = synced[torch.as_tensor(cohort, dtype=torch.int64)] == 0
        per_client = torch.where(fresh, torch.full_like(behind, dense), torch.clamp(behind * payload, max=dense))
        synced = synced.clone()
        synced[torch.as_tensor(cohort, dtype=torch.int64)] = rnd
        params = unflatten_message(replica.double(), layout)
        params = {k: params[k].to(v.dtype) for k, v in broadcast["params"].items()}
        new_state = replace(state, extra={**state.extra, REPLICA: replica, SYNCED: synced})
        return new_state, {**broadcast, "params": params}, int(per_client.sum())


def make_broadcast_compression(spec: str | None) -> BroadcastCompression | None:
    return None if spec is None else BroadcastCompression(parse_compressor(spec))
