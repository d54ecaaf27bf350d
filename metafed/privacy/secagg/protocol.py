"""Secure aggregation as explicit protocol messages between clients and a server.

- SecAgg: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning", CCS 2017 (semi-honest server, with its consistency check).
- SecAgg+: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
  Overhead", CCS 2020: each client shares keys and masks only with its k neighbours in a
  Harary graph over a public random permutation of the clients.

Rounds: (0) advertise keys -> (1) share keys (Shamir shares of the mask key s_sk and the
self-mask seed b, AES-GCM-encrypted per recipient) -> (2) masked input
y_u = x_u + PRG(b_u) + sum_v +-PRG(KA(s_sk_u, s_pk_v)) mod 2^64 -> (3) consistency check:
clients sign the survivor list -> (4) unmasking: for each neighbour v a client reveals the
share of b_v if v survived or of s_sk_v if v dropped, never both, after checking the
server's lists. Any check that fails raises SecAggAbort; the server aborts when fewer than
the threshold remain at any stage. Messages are plain dataclasses of bytes, ints and
uint64 arrays so a transport (the in-memory simulator now, gRPC later) can carry them.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from metafed.privacy.secagg import crypto, shamir


class SecAggAbort(RuntimeError):
    """The protocol cannot continue safely (too few clients, inconsistent server lists, ...)."""


@dataclass(frozen=True)
class SecAggConfig:
    """threshold: minimum surviving clients; neighbours: k for SecAgg+ (None = everyone, SecAgg)."""

    threshold: int
    neighbours: int | None = None
    graph_seed: bytes = b"metafed-secagg-graph"

    def neighbour_threshold(self, degree: int) -> int:
        if self.neighbours is None:
            return self.threshold
        return degree // 2 + 1

    def neighbourhood(self, client: int, roster: list[int]) -> list[int]:
        """Clients that ``client`` shares secrets and pairwise masks with."""
        others = [c for c in roster if c != client]
        if self.neighbours is None or self.neighbours >= len(others):
            return others
        order = sorted(roster, key=lambda c: hashlib.sha256(self.graph_seed + struct.pack(">q", c)).digest())
        pos = order.index(client)
        half = max(1, self.neighbours // 2)
        picks = {order[(pos + j) % len(order)] for j in range(-half, half + 1) if j}
        return sorted(picks)


# ---------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class AdvertiseKeys:
    client: int
    enc_public: bytes
    mask_public: bytes
    sign_public: bytes


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    recipient: int
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    client: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class SharesForYou:
    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    client: int
    vector: np.ndarray  # uint64 [D]


@dataclass(frozen=True)
class SurvivorList:
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def digest(self) -> bytes:
        return b"metafed-secagg-survivors:" + ",".join(map(str, self.survivors)).encode() + b"|" + \
            ",".join(map(str, self.dropped)).encode()


@dataclass(frozen=True)
class ListSignature:
    client: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    lists: SurvivorList
    signatures: dict[int, bytes]


@dataclass(frozen=True)
class UnmaskResponse:
    client: int
    self_mask_shares: dict[int, int]  # owner -> share of owner's b
    mask_key_shares: dict[int, int]  # owner -> share of owner's s_sk


def _nonce(sender: int, recipient: int) -> bytes:
    return struct.pack(">qI", sender, recipient & 0xFFFFFFFF)


def _pair_sign(u: int, v: int) -> int:
    return 1 if u < v else -1


# ---------------------------------------------------------------------------- client
@dataclass
class SecAggClient:
    client: int
    encoded: np.ndarray  # uint64 [D], already fixed-point encoded
    config: SecAggConfig
    random_bytes: Callable[[int], bytes] = os.urandom
    _state: dict = field(default_factory=dict)

    def advertise(self) -> AdvertiseKeys:
        self._enc_sk, enc_pk = crypto.x25519_keypair(self.random_bytes(32))
        self._mask_sk, mask_pk = crypto.x25519_keypair(self.random_bytes(32))
        self._sign_sk, sign_pk = crypto.signing_keypair(self.random_bytes(32))
        return AdvertiseKeys(self.client, enc_pk, mask_pk, sign_pk)

    def share_keys(self, roster: dict[int, AdvertiseKeys]) -> ShareKeys:
        if len(roster) < self.config.threshold or self.client not in roster:
            raise SecAggAbort(f"client {self.client}: key roster has {len(roster)} clients, "
                              f"below the threshold {self.config.threshold} (or omits this client)")
        self._roster = roster
        self._neighbours = self.config.neighbourhood(self.client, sorted(roster))
        t = self.config.neighbour_threshold(len(self._neighbours))
        if len(self._neighbours) < t:
            raise SecAggAbort(f"client {self.client}: {len(self._neighbours)} neighbours, threshold {t}")
        self._self_seed = self.random_bytes(32)
        xs = [v + 1 for v in self._neighbours] + [self.client + 1]  # a client holds a share of its own secrets too
        key_shares = shamir.split(self._mask_sk, xs, t, self.random_bytes)
        seed_shares = shamir.split(self._self_seed, xs, t, self.random_bytes)
        self._own_seed_share = seed_shares[self.client + 1]
        out = []
        for v in self._neighbours:
            key = crypto.agree(self._enc_sk, roster[v].enc_public, b"share")
            plain = struct.pack(">qq", self.client, v) + key_shares[v + 1].to_bytes(66, "big") + \
                seed_shares[v + 1].to_bytes(66, "big")
            out.append(EncryptedShare(self.client, v, crypto.encrypt(key, _nonce(self.client, v), plain, b"share")))
        return ShareKeys(self.client, tuple(out))

    def masked_input(self, mine: SharesForYou) -> MaskedInput:
        senders = {s.sender for s in mine.shares}
        if not senders <= set(self._neighbours):
            raise SecAggAbort(f"client {self.client}: shares from non-neighbours {sorted(senders - set(self._neighbours))}")
        self._held = {s.sender: s for s in mine.shares}
        self._u2 = senders | {self.client}
        y = self.encoded.astype(np.uint64) + crypto.prg_uint64(self._self_seed, len(self.encoded))
        for v in sorted(senders):
            pair = crypto.prg_uint64(crypto.agree(self._mask_sk, self._roster[v].mask_public, b"mask"), len(y))
            y = y + pair if _pair_sign(self.client, v) > 0 else y - pair
        return MaskedInput(self.client, y)

    def _check_lists(self, lists: SurvivorList) -> None:
        alive, gone = set(lists.survivors), set(lists.dropped)
        if alive & gone:
            raise SecAggAbort(f"client {self.client}: clients {sorted(alive & gone)} listed as both alive and dropped")
        if self.client not in alive:
            raise SecAggAbort(f"client {self.client}: server lists this (live) client as not surviving")
        if len(alive) < self.config.threshold:
            raise SecAggAbort(f"client {self.client}: {len(alive)} survivors, below the threshold {self.config.threshold}")
        mine = self._u2 - {self.client}
        if not mine <= alive | gone:
            raise SecAggAbort(f"client {self.client}: neighbours {sorted(mine - alive - gone)} missing from both lists")
        if (alive | gone) & set(self._neighbours) - self._u2:
            raise SecAggAbort(f"client {self.client}: lists name neighbours that never shared keys")

    def sign_survivors(self, lists: SurvivorList) -> ListSignature:
        self._check_lists(lists)
        self._signed = lists
        return ListSignature(self.client, self._sign_sk.sign(lists.digest()))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        lists = request.lists
        if lists != getattr(self, "_signed", None):
            raise SecAggAbort(f"client {self.client}: unmasking lists differ from the ones it signed")
        self._check_lists(lists)
        valid = {c for c, sig in request.signatures.items()
                 if c in lists.survivors and c in self._roster
                 and crypto.verify(self._roster[c].sign_public, sig, lists.digest())}
        if len(valid) < self.config.threshold:
            raise SecAggAbort(f"client {self.client}: only {len(valid)} valid signatures on the survivor list "
                              f"(threshold {self.config.threshold}): the server may be equivocating")
        self_mask, mask_key = {self.client: self._own_seed_share}, {}  # it is alive: its own b share is safe to give
        alive, gone = set(lists.survivors), set(lists.dropped)
        for v, enc in self._held.items():
            key = crypto.agree(self._enc_sk, self._roster[v].enc_public, b"share")
            plain = crypto.decrypt(key, _nonce(v, self.client), enc.ciphertext, b"share")
            sender, recipient = struct.unpack(">qq", plain[:16])
            if (sender, recipient) != (v, self.client):
                raise SecAggAbort(f"client {self.client}: share addressed to ({sender}, {recipient})")
            key_share, seed_share = int.from_bytes(plain[16:82], "big"), int.from_bytes(plain[82:148], "big")
            if v in alive:
                self_mask[v] = seed_share
            elif v in gone:
                mask_key[v] = key_share
        return UnmaskResponse(self.client, self_mask, mask_key)


# ---------------------------------------------------------------------------- server
@dataclass
class SecAggServer:
    config: SecAggConfig
    length: int

    def _require(self, count: int, stage: str) -> None:
        if count < self.config.threshold:
            raise SecAggAbort(f"secure aggregation aborted at {stage}: {count} clients left, "
                              f"threshold {self.config.threshold}")

    def collect_keys(self, adverts: list[AdvertiseKeys]) -> dict[int, AdvertiseKeys]:
        self._require(len(adverts), "key advertisement")
        self.roster = {a.client: a for a in adverts}
        return self.roster

    def route_shares(self, messages: list[ShareKeys]) -> dict[int, SharesForYou]:
        self._require(len(messages), "key sharing")
        self.u2 = sorted(m.client for m in messages)
        inbox: dict[int, list[EncryptedShare]] = {c: [] for c in self.u2}
        for m in messages:
            for s in m.shares:
                if s.recipient in inbox:
                    inbox[s.recipient].append(s)
        return {c: SharesForYou(c, tuple(v)) for c, v in inbox.items()}

    def collect_masked(self, inputs: list[MaskedInput]) -> SurvivorList:
        self._require(len(inputs), "masked input collection")
        for m in inputs:
            if m.vector.dtype != np.uint64 or m.vector.shape != (self.length,):
                raise SecAggAbort(f"client {m.client} sent a masked vector of shape {m.vector.shape} {m.vector.dtype}, "
                                  f"expected ({self.length},) uint64")
        self.masked = {m.client: m.vector for m in inputs}
        survivors = tuple(sorted(self.masked))
        return SurvivorList(survivors, tuple(c for c in self.u2 if c not in self.masked))

    def unmask_request(self, lists: SurvivorList, signatures: list[ListSignature]) -> UnmaskRequest:
        self._require(len(signatures), "consistency check")
        return UnmaskRequest(lists, {s.client: s.signature for s in signatures})

    def finish(self, lists: SurvivorList, responses: list[UnmaskResponse]) -> np.ndarray:
        """The uint64 sum of the survivors' encoded inputs (mod 2^64)."""
        self._require(len(responses), "unmasking")
        total = np.zeros(self.length, dtype=np.uint64)
        for v in lists.survivors:
            total = total + self.masked[v]
        roster = sorted(self.roster)
        for v in lists.survivors:
            seed = self._reconstruct(v, roster, responses, "self_mask_shares")
            total = total - crypto.prg_uint64(seed, self.length)
        for v in lists.dropped:
            mask_sk = self._reconstruct(v, roster, responses, "mask_key_shares")
            for u in self.config.neighbourhood(v, roster):
                if u in self.masked:
                    pair = crypto.prg_uint64(crypto.agree(mask_sk, self.roster[u].mask_public, b"mask"), self.length)
                    # u added sign(u, v) * pair; remove it
                    total = total - pair if _pair_sign(u, v) > 0 else total + pair
        return total

    def _reconstruct(self, owner: int, roster: list[int], responses: list[UnmaskResponse], kind: str) -> bytes:
        shares = {r.client + 1: getattr(r, kind)[owner] for r in responses if owner in getattr(r, kind)}
        t = self.config.neighbour_threshold(len(self.config.neighbourhood(owner, roster)))
        if len(shares) < t:
            raise SecAggAbort(f"secure aggregation aborted: {len(shares)} shares for client {owner}, need {t}")
        return shamir.combine(shares, t)
