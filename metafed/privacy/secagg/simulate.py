"""Run the secure-aggregation protocol in memory: the simulator's transport. Dropouts can
be injected before any stage; an optional ``tamper`` hook lets tests play a malicious server
that rewrites the lists it sends."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from metafed.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer, SurvivorList
from metafed.privacy.secagg.quantize import FixedPoint

STAGES = ("advertise", "share", "upload", "sign", "unmask")


@dataclass
class SecAggResult:
    total: np.ndarray  # float64 [D]: decoded sum of the survivors' inputs
    encoded_total: np.ndarray  # uint64 [D]: the unmasked fixed-point sum
    survivors: tuple[int, ...]
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # what the server saw


def secure_sum_encoded(encoded: dict[int, np.ndarray], config: SecAggConfig, dropouts: dict[str, set[int]] | None = None,
                       random_bytes: Callable[[int], bytes] = os.urandom,
                       tamper: Callable[[int, SurvivorList], SurvivorList] | None = None) -> SecAggResult:
    """Sum uint64 vectors of clients {id: [D]} through the full protocol.

    ``dropouts[stage]``: clients that vanish right before ``stage`` (see STAGES).
    ``tamper(client, lists)``: what the server sends that client instead of the true lists.
    """
    dropouts = dropouts or {}
    unknown = set(dropouts) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown dropout stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    length = len(next(iter(encoded.values())))
    clients = {c: SecAggClient(c, v, config, random_bytes) for c, v in encoded.items()}
    server = SecAggServer(config, length)
    alive = set(clients)

    def stage(name: str) -> list[int]:
        alive.difference_update(dropouts.get(name, set()))
        return sorted(alive)

    roster = server.collect_keys([clients[c].advertise() for c in stage("advertise")])
    inbox = server.route_shares([clients[c].share_keys(roster) for c in stage("share")])
    lists = server.collect_masked([clients[c].masked_input(inbox[c]) for c in stage("upload") if c in inbox])
    sent = {c: tamper(c, lists) if tamper else lists for c in stage("sign") if c in lists.survivors}
    signatures = [clients[c].sign_survivors(sent[c]) for c in sent]
    request = server.unmask_request(lists, signatures)
    responses = [clients[c].unmask(request) for c in stage("unmask") if c in sent]
    total = server.finish(lists, responses)
    return SecAggResult(np.zeros(0), total, lists.survivors, dict(server.masked))


def secure_sum(vectors: dict[int, np.ndarray], config: SecAggConfig, fixed: FixedPoint,
               dropouts: dict[str, set[int]] | None = None, random_bytes: Callable[[int], bytes] = os.urandom) -> SecAggResult:
    """Fixed-point encode, aggregate securely, decode: the sum over surviving clients."""
    fixed.check_capacity(len(vectors))
    encoded = {c: fixed.encode(v) for c, v in vectors.items()}
    result = secure_sum_encoded(encoded, config, dropouts, random_bytes)
    result.total = fixed.decode_sum(result.encoded_total, len(result.survivors))
    return result
