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
from torch import Tensor

from metafed.tree import flatten_messages, unflatten_message
from metafed.compression.encoders import parse_compressor

REPLICA, SYNCED, PAYLOAD = "down.replica", "down.synced", "down.payload."
DOWN_STREAM = 29
REPLICA_OUT_OF_SYNC = "replica out of sync"  # a node's refusal; the server then sends it the dense replica


def round_generator(seed: int, rnd: int) -> torch.Generator:
    """Round ``rnd``'s draws (random-k's coordinates, QSGD's rounding): the server encodes
    with it and a deployed node rebuilds random-k's coordinates from it."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, DOWN_STREAM, rnd]).integers(2 ** 62)))


def advance(replica: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The replica after one decoded change: the same float operations at server and node."""
    return (replica.double() + change).float()


@dataclass(frozen=True)
class DownlinkRound:
    """What a deployment must send each client in one round: the payloads it missed since
    it last synced (``synced`` before this round), or the dense replica."""

    rnd: int
    synced: torch.Tensor  # [N] last round each client synced before this one (0: never)
    payloads: dict  # round -> packed payload bytes, the rounds a client may still catch up on
    payload_bytes: int
    dense_bytes: int

    def changes_for(self, client: int) -> tuple[int, list[bytes]] | None:
        """(base round, payloads of rounds base+1..rnd) or None: send the dense replica."""
        base = int(self.synced[client])
        behind = self.rnd - base
        if base == 0 or behind * self.payload_bytes >= self.dense_bytes or any(
                r not in self.payloads for r in range(base + 1, self.rnd + 1)):
            return None
        return base, [self.payloads[r] for r in range(base + 1, self.rnd + 1)]


@dataclass(frozen=True)
class BroadcastCompression:
    encoder: object

    def apply(self, state, broadcast: dict, cohort: np.ndarray, num_clients: int, seed: int, rnd: int):
        """(new server state holding the replica, the broadcast with the replica as ``params``,
        bytes down of the cohort's ``params``, the round's :class:`DownlinkRound`)."""
        flat, layout = flatten_messages({k: v[None] for k, v in broadcast["params"].items()})  # [1, D] float64
        d = flat.shape[1]
        replica = state.extra.get(REPLICA)
        synced = state.extra.get(SYNCED)
        if replica is None:  # round 1: every client starts from the same initial model
            replica, synced = flat[0].float(), torch.zeros(num_clients, dtype=torch.int64)
        encoded = self.encoder.encode(flat - replica.double()[None], round_generator(seed, rnd))
        replica = advance(replica, self.encoder.decode(encoded, d)[0])  # [D]
        dense, payload = 4 * d, self.encoder.packed_bytes(d)
        # payloads a lagging client may still catch up on (older ones cost more than the dense model)
        window = max(1, dense // max(payload, 1))
        kept = {k: v for k, v in state.extra.items()
                if not (k.startswith(PAYLOAD) and int(k[len(PAYLOAD):]) <= rnd - window)}
        blob = self.encoder.pack(encoded, 0)
        kept[f"{PAYLOAD}{rnd}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        payloads = {int(k[len(PAYLOAD):]): bytes(v.numpy().tobytes()) for k, v in kept.items() if k.startswith(PAYLOAD)}
        down = DownlinkRound(rnd, synced, payloads, payload, dense)
        idx = torch.as_tensor(cohort, dtype=torch.int64)
        behind = rnd - synced[idx]  # [C] rounds each client missed
        per_client = torch.where(synced[idx] == 0, torch.full_like(behind, dense),
                                 torch.clamp(behind * payload, max=dense))
        synced = synced.clone()
        synced[idx] = rnd
        params = unflatten_message(replica.double(), layout)
        params = {k: params[k].to(v.dtype) for k, v in broadcast["params"].items()}
        new_state = replace(state, extra={**kept, REPLICA: replica, SYNCED: synced})
        return new_state, {**broadcast, "params": params}, int(per_client.sum()), down

    def catch_up(self, replica: torch.Tensor, payloads: list[bytes], first_round: int, seed: int) -> torch.Tensor:
        """Where a client runs: its replica [D] after the payloads of rounds first_round, ...
        (the server's exact arithmetic). Raises ValueError on a malformed payload."""
        d = replica.shape[0]
        for i, blob in enumerate(payloads):
            if len(blob) != self.encoder.packed_bytes(d):
                raise ValueError(f"broadcast payload of {len(blob)} bytes, expected {self.encoder.packed_bytes(d)}")
            gen = round_generator(seed, first_round + i)
            replica = advance(replica, self.encoder.decode(self.encoder.unpack(blob, d, gen), d)[0])
        return replica


def node_replica(comp: BroadcastCompression, reference: dict, base: int, arrays: dict, stored, seed: int) -> Tensor:
    """Where a client runs: its replica [D] for this round from what the server sent: the
    dense replica (``base`` 0, array ``replica``) or payloads ``p0, p1, ...`` of rounds
    base+1.. applied to the ``stored`` (round, replica) it kept. ``reference``: the model's
    params (layout and size). Raises ValueError naming the problem."""
    d = sum(v.numel() for v in reference.values())
    if base == 0:
        replica = arrays.get("replica")
        if replica is None or set(arrays) != {"replica"} or replica.dtype != torch.float32 or replica.shape != (d,):
            raise ValueError(f"a dense broadcast is one float32 array 'replica' of {d} values")
        if not torch.isfinite(replica).all():
            raise ValueError("the dense replica holds NaN or Inf")
        return replica
    if stored is None or stored[0] != base:
        have = "none" if stored is None else f"round {stored[0]}"
        raise ValueError(f"{REPLICA_OUT_OF_SYNC}: the payloads start after round {base}, this node holds {have}")
    names = [f"p{i}" for i in range(len(arrays))]
    if sorted(arrays) != sorted(names) or any(arrays[n].dtype != torch.uint8 for n in names):
        raise ValueError("broadcast payloads are uint8 arrays p0, p1, ...")
    return comp.catch_up(stored[1], [arrays[n].numpy().tobytes() for n in names], base + 1, seed)


def make_broadcast_compression(spec: str | None) -> BroadcastCompression | None:
    return None if spec is None else BroadcastCompression(parse_compressor(spec))
