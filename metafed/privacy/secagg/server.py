"""The server side of secure aggregation: relays messages, checks every sender against the
identity roster, and unmasks the sum. It verifies each revealed share against the owner's
signed commitment, so a malicious client cannot corrupt the sum with a bad share, and each
rebuilt secret against the owner's advertised public key or seed commitment."""
from __future__ import annotations

import logging

import numpy as np

from metafed.privacy.secagg import crypto, shamir
from metafed.privacy.secagg.messages import (AdvertiseKeys, ListSignature, MaskedInput, ShareKeys, SharesForYou,
                                             SurvivorList, UnmaskRequest, UnmaskResponse, keyset_digest,
                                             share_commitment, valid_advert)
from metafed.privacy.secagg.protocol import SecAggAbort, SecAggConfig, pair_sign, share_point

log = logging.getLogger("metafed.secagg")


class SecAggServer:
    def __init__(self, config: SecAggConfig, length: int, roster: dict[int, bytes], session: bytes):
        config.check_cohort(len(roster))
        self.config, self.length, self.roster, self.session = config, length, dict(roster), session
        self.cohort = sorted(self.roster)

    def _require(self, count: int, stage: str) -> None:
        if count < self.config.threshold:
            raise SecAggAbort(f"secure aggregation aborted at {stage}: {count} clients left, "
                              f"threshold {self.config.threshold}")

    def _signed_by(self, client, signature: bytes, body: bytes) -> bool:
        return type(client) is int and client in self.roster and crypto.verify(self.roster[client], signature, body)

    def _reject(self, client, stage: str, why: str) -> None:
        log.warning("secure aggregation: rejected the %s message claiming client %r: %s", stage, client, why)

    def _signed_messages(self, messages: list, kind: type, allowed, stage: str) -> dict:
        """client -> its message: only messages of ``kind`` from an ``allowed`` client, one
        each, signed by that client's roster identity over this session."""
        accepted: dict = {}
        for m in messages:
            c = getattr(m, "client", None)
            if not isinstance(m, kind) or c not in allowed or c in accepted or \
                    not self._signed_by(c, m.signature, m.body(self.session)):
                self._reject(c, stage, "unsigned, unknown or repeated sender")
                continue
            accepted[c] = m
        return accepted

    def collect_keys(self, adverts: list[AdvertiseKeys]) -> list[AdvertiseKeys]:
        """Keep the adverts signed by roster identities; relay them to every client."""
        valid: dict[int, AdvertiseKeys] = {}
        for a in adverts:
            why = valid_advert(a, self.roster, self.session)
            if why is None and a.client in valid:
                why = "second advert"
            if why:
                self._reject(getattr(a, "client", None), "advertise", why)
                continue
            valid[a.client] = a
        self._require(len(valid), "key advertisement")
        self.adverts = valid
        self.keyset = keyset_digest(self.session, valid)
        members = sorted(valid)
        self.graph = {c: self.config.neighbourhood(c, members, self.keyset) for c in members}
        self.t_owner = self.config.neighbour_threshold(len(members))
        return [valid[c] for c in members]

    def route_shares(self, messages: list[ShareKeys]) -> dict[int, SharesForYou]:
        self.commitments: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (owner, holder) -> (key, seed)
        senders: dict[int, ShareKeys] = self._signed_messages(messages, ShareKeys, self.adverts, "share")
        inbox: dict[int, list] = {c: [] for c in senders}
        for c, m in senders.items():
            self.commitments[(c, c)] = (m.own_key_commitment, m.own_seed_commitment)
            for s in m.shares:
                if s.sender != c or s.recipient not in self.graph[c] or not self._signed_by(c, s.signature, s.body(self.session)):
                    self._reject(c, "share", f"share to {s.recipient!r} is not its own or not signed")
                    continue
                self.commitments[(c, s.recipient)] = (s.key_commitment, s.seed_commitment)
                if s.recipient in inbox:
                    inbox[s.recipient].append(s)
        self._require(len(senders), "key sharing")
        self.u2 = sorted(senders)
        return {c: SharesForYou(c, tuple(v)) for c, v in inbox.items()}

    def collect_masked(self, inputs: list[MaskedInput]) -> SurvivorList:
        self.masked: dict[int, np.ndarray] = {}
        self.paired: dict[int, set[int]] = {}
        for m in inputs:
            c = getattr(m, "client", None)
            if not isinstance(m, MaskedInput) or c not in self.u2 or c in self.masked:
                self._reject(c, "upload", "sender did not share keys, or sent twice")
            elif not (isinstance(m.vector, np.ndarray) and m.vector.dtype == np.uint64 and m.vector.shape == (self.length,)):
                self._reject(c, "upload", f"masked vector of shape {getattr(m.vector, 'shape', '?')}, "
                                          f"expected ({self.length},) uint64")
            elif not self._signed_by(c, m.signature, m.body(self.session)):
                self._reject(c, "upload", "identity signature does not verify")
            elif not set(m.paired) <= set(self.graph[c]) & set(self.u2):
                self._reject(c, "upload", "claims masks with peers it could not hold shares of")
            else:
                self.masked[c], self.paired[c] = m.vector, set(m.paired)
        survivors = set(self.masked)
        changed = True
        while changed:  # a pairwise mask cancels only if both ends added it: drop one-sided claims
            changed = False
            for u in sorted(survivors):
                if any(u not in self.paired[v] for v in self.paired[u] & survivors):
                    self._reject(u, "upload", "added a pairwise mask that its peer did not (a withheld or bad share)")
                    survivors.discard(u)
                    changed = True
        self._require(len(survivors), "masked input collection")
        return SurvivorList(self.session, self.keyset, tuple(sorted(survivors)),
                            tuple(c for c in self.u2 if c not in survivors))

    def unmask_request(self, lists: SurvivorList, signatures: list[ListSignature]) -> UnmaskRequest:
        digest = lists.digest()
        valid = {s.client: s.signature for s in signatures
                 if s.client in lists.survivors and self._signed_by(s.client, s.signature, digest)}
        self._require(len(valid), "consistency check")
        return UnmaskRequest(lists, valid)

    def finish(self, lists: SurvivorList, responses: list[UnmaskResponse]) -> np.ndarray:
        """The uint64 sum of the survivors' encoded inputs (mod 2^64)."""
        good: dict[int, UnmaskResponse] = self._signed_messages(responses, UnmaskResponse, lists.survivors, "unmask")
        self._require(len(good), "unmasking")
        total = np.zeros(self.length, dtype=np.uint64)
        for v in lists.survivors:
            total = total + self.masked[v]
        for v in lists.survivors:
            seed = self._reconstruct(v, good, "seed")
            if crypto.commit(b"self-seed", self.session, v, seed) != self.adverts[v].seed_commitment:
                raise SecAggAbort(f"secure aggregation aborted: rebuilt self-mask seed of client {v} fails its commitment")
            total = total - crypto.prg_uint64(seed, self.length)
        for v in lists.dropped:
            if not any(v in self.paired[u] for u in lists.survivors):
                continue  # nobody masked with it
            mask_sk = self._reconstruct(v, good, "key")
            if crypto.x25519_public(mask_sk) != self.adverts[v].mask_public:
                raise SecAggAbort(f"secure aggregation aborted: rebuilt mask key of client {v} fails its public key")
            for u in lists.survivors:
                if v in self.paired[u]:
                    pair = crypto.prg_uint64(crypto.agree(mask_sk, self.adverts[u].mask_public, b"mask"), self.length)
                    total = total - pair if pair_sign(u, v) > 0 else total + pair  # u added sign(u, v) * pair
        return total

    def _reconstruct(self, owner: int, responses: dict[int, UnmaskResponse], kind: str) -> bytes:
        """Rebuild ``owner``'s b (kind "seed") or s_sk ("key") from shares that match the
        owner's signed commitments; a share that does not is discarded and logged."""
        field = "self_mask_shares" if kind == "seed" else "mask_key_shares"
        slot = 1 if kind == "seed" else 0
        shares = {}
        for holder, r in responses.items():
            value = getattr(r, field).get(owner)
            if value is None:
                continue
            committed = self.commitments.get((owner, holder))
            if type(value) is not int or committed is None or \
                    share_commitment(kind.encode(), self.session, owner, holder, value) != committed[slot]:
                self._reject(holder, "unmask", f"its {kind} share of client {owner} fails the owner's commitment")
                continue
            shares[share_point(holder, self.cohort)] = value
        if len(shares) < self.t_owner:
            raise SecAggAbort(f"secure aggregation aborted: {len(shares)} valid shares for client {owner}, "
                              f"need {self.t_owner}")
        return shamir.combine(shares, self.t_owner)
