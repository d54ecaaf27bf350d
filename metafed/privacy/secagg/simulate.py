"""Run the secure-aggregation protocol in memory: the simulator's transport.

The trusted set-up (:func:`setup`) gives every client a long-term Ed25519 identity and the
roster of identity public keys, which the server cannot change. Dropouts can be injected
before any stage; a client that aborts (it caught the server or a peer misbehaving) leaves
the round like a dropout, and the reason is kept in ``SecAggResult.aborted``. The optional
``tamper`` hook lets tests play a malicious server that rewrites the lists it sends."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from metafed.privacy.secagg import crypto
from metafed.privacy.secagg.client import SecAggClient
from metafed.privacy.secagg.messages import SurvivorList, session_id
from metafed.privacy.secagg.protocol import SecAggAbort, SecAggConfig
from metafed.privacy.secagg.quantize import FixedPoint, QuantizationRangeError
from metafed.privacy.secagg.server import SecAggServer

log = logging.getLogger("metafed.secagg")
STAGES = ("advertise", "share", "upload", "sign", "unmask")


@dataclass
class SecAggResult:
    total: np.ndarray  # float64 [D]: decoded sum of the survivors' inputs
    encoded_total: np.ndarray  # uint64 [D]: the unmasked fixed-point sum
    survivors: tuple[int, ...]
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # what the server saw
    aborted: dict[int, str] = field(default_factory=dict)  # client -> why it left the round
    rejected: tuple[int, ...] = ()  # clients whose input was refused before masking (out of range)


def identities(cohort, random_bytes: Callable[[int], bytes] = os.urandom) -> tuple[dict, dict[int, bytes]]:
    """Trusted set-up: (client -> identity signing key, roster client -> identity public key)."""
    keys = {c: crypto.identity_keypair(random_bytes(32)) for c in sorted(cohort)}
    return {c: k[0] for c, k in keys.items()}, {c: k[1] for c, k in keys.items()}


def setup(encoded: dict[int, np.ndarray], config: SecAggConfig, random_bytes: Callable[[int], bytes] = os.urandom,
          cohort=None, signing: dict | None = None, roster: dict | None = None,
          session: bytes | None = None) -> tuple[dict[int, SecAggClient], SecAggServer]:
    """Clients (for the ids in ``encoded``) and a server for one round over ``cohort``."""
    cohort = sorted(cohort if cohort is not None else encoded)
    if roster is None:
        signing, roster = identities(cohort, random_bytes)
    session = session or session_id(random_bytes(16), 0)
    length = len(next(iter(encoded.values())))
    clients = {c: SecAggClient(c, v, config, signing[c], roster, session, random_bytes) for c, v in encoded.items()}
    return clients, SecAggServer(config, length, roster, session)


_STAGE_CALL = {
    "advertise": lambda client, _: client.advertise(),
    "share": lambda client, adverts: client.share_keys(adverts),
    "upload": lambda client, mine: client.masked_input(mine),
    "sign": lambda client, lists: client.sign_survivors(lists),
    "unmask": lambda client, request: client.unmask(request),
}


def run_protocol(server: SecAggServer, ask: Callable[[str, dict], dict], participants: list[int],
                 tamper: Callable[[int, SurvivorList], SurvivorList] | None = None) -> tuple[SurvivorList, np.ndarray]:
    """The server's side of one round over any transport.

    ``ask(stage, {client: request})`` delivers each request and returns ``{client: reply}``
    for the clients that answered (a dropped or aborted client is simply absent). Returns
    the survivor list and the uint64 sum of the survivors' inputs."""
    adverts = server.collect_keys(list(ask("advertise", {c: None for c in participants}).values()))
    inbox = server.route_shares(list(ask("share", {a.client: adverts for a in adverts}).values()))
    lists = server.collect_masked(list(ask("upload", inbox).values()))
    signatures = ask("sign", {c: tamper(c, lists) if tamper else lists for c in lists.survivors})
    request = server.unmask_request(lists, list(signatures.values()))
    responses = ask("unmask", {c: request for c in signatures})
    return lists, server.finish(lists, list(responses.values()))


def secure_sum_encoded(encoded: dict[int, np.ndarray], config: SecAggConfig, dropouts: dict[str, set[int]] | None = None,
                       random_bytes: Callable[[int], bytes] = os.urandom,
                       tamper: Callable[[int, SurvivorList], SurvivorList] | None = None, **setup_args) -> SecAggResult:
    """Sum uint64 vectors of clients {id: [D]} through the full protocol.

    ``dropouts[stage]``: clients that vanish right before ``stage`` (see STAGES).
    ``tamper(client, lists)``: what the server sends that client instead of the true lists.
    """
    dropouts = dropouts or {}
    unknown = set(dropouts) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown dropout stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    clients, server = setup(encoded, config, random_bytes, **setup_args)
    alive = set(clients)
    aborted: dict[int, str] = {}

    def ask(stage: str, requests: dict) -> dict:
        """Ask every still-present client; a client that aborts leaves the round."""
        alive.difference_update(dropouts.get(stage, set()))
        out = {}
        for c in sorted(set(requests) & alive):
            try:
                out[c] = _STAGE_CALL[stage](clients[c], requests[c])
            except SecAggAbort as e:
                aborted[c] = str(e)
                alive.discard(c)
                log.warning("secure aggregation: %s", e)
        return out

    lists, total = run_protocol(server, ask, sorted(clients), tamper)
    return SecAggResult(np.zeros(0), total, lists.survivors, dict(server.masked), aborted)


def secure_sum(vectors: dict[int, np.ndarray], config: SecAggConfig, fixed: FixedPoint,
               dropouts: dict[str, set[int]] | None = None, random_bytes: Callable[[int], bytes] = os.urandom,
               **setup_args) -> SecAggResult:
    """Fixed-point encode, aggregate securely, decode: the sum over surviving clients.

    A client whose input lies outside the agreed range cannot be encoded: it is dropped from
    the round with a log line (it never advertises keys), and the round goes on without it."""
    fixed.check_capacity(len(vectors))
    encoded, rejected = {}, []
    for c, v in vectors.items():
        try:
            encoded[c] = fixed.encode(v)
        except QuantizationRangeError as e:
            log.warning("secure aggregation: dropped client %s from the round: %s", c, e)
            rejected.append(c)
    if not encoded:
        raise SecAggAbort("secure aggregation aborted: no client input lies in the fixed-point range")
    setup_args.setdefault("cohort", sorted(vectors))
    result = secure_sum_encoded(encoded, config, dropouts, random_bytes, **setup_args)
    result.total = fixed.decode_sum(result.encoded_total, len(result.survivors))
    result.rejected = tuple(rejected)
    return result
