"""The client side of secure aggregation: a per-round state machine.

Every stage runs once, in order: advertise -> share -> upload -> sign -> unmask. A second
request for any stage, or one out of order, aborts the client for the round; so does any
server behaviour the protocol forbids (a list that differs from the signed one, too few
signatures, too few shares). An aborted client answers nothing more. Peers that send
forged or malformed material are dropped with a log line instead of crashing the client.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from metafed.privacy.secagg import crypto, shamir
from metafed.privacy.secagg.messages import (AdvertiseKeys, EncryptedShare, ListSignature, MaskedInput, ShareKeys,
                                             SharesForYou, SurvivorList, UnmaskRequest, UnmaskResponse,
                                             keyset_digest, share_commitment, valid_advert)
from metafed.privacy.secagg.protocol import SecAggAbort, SecAggConfig, pair_sign, share_point

log = logging.getLogger("metafed.secagg")

STAGE_ORDER = ("advertise", "share", "upload", "sign", "unmask")
_HEADER = struct.Struct(">qq")
_PLAIN_LEN = _HEADER.size + 2 * 66


def _nonce(sender: int, recipient: int) -> bytes:
    # the share key is fresh each round and the (sender, recipient) order differs per direction
    return struct.pack(">qI", sender, recipient & 0xFFFFFFFF)


class SecAggClient:
    """One client's protocol state for one round.

    ``roster``: client id -> Ed25519 identity public key of every member of the round's
    cohort, set up by trusted code; ``identity``: this client's identity signing key;
    ``session``: :func:`messages.session_id` of (run, round)."""

    def __init__(self, client: int, encoded: np.ndarray, config: SecAggConfig, identity: Ed25519PrivateKey,
                 roster: dict[int, bytes], session: bytes, random_bytes: Callable[[int], bytes] = os.urandom):
        self.client, self.config, self.session = client, config, session
        self.encoded = np.asarray(encoded, dtype=np.uint64)
        self._identity, self._roster, self._random = identity, dict(roster), random_bytes
        self._cohort = sorted(self._roster)
        self._stage, self._aborted = 0, False
        self._revealed: dict[int, str] = {}  # owner -> "seed" | "key": never both for one owner

    # ------------------------------------------------------------------ state between processes
    _NOT_SAVED = ("_identity", "_roster", "_random", "encoded")

    def snapshot(self) -> str:
        """This client's round state as JSON, its secrets included. A deployed node keeps it
        in its own memory between protocol messages (Flower runs each message in a fresh
        ClientApp process); it is never sent. The identity key, roster and input are
        re-supplied by :meth:`restore`."""
        import json

        from metafed.privacy.secagg import codec

        return json.dumps(codec.to_plain({k: v for k, v in self.__dict__.items() if k not in self._NOT_SAVED}))

    @classmethod
    def restore(cls, snapshot: str, encoded: np.ndarray, identity: Ed25519PrivateKey, roster: dict[int, bytes],
                random_bytes: Callable[[int], bytes] = os.urandom) -> "SecAggClient":
        import json

        from metafed.privacy.secagg import codec

        client = cls.__new__(cls)
        client.__dict__.update(codec.from_plain(json.loads(snapshot)))
        client._cohort = sorted(client._cohort)
        client.encoded = np.asarray(encoded, dtype=np.uint64)
        # the roster of the round's cohort only (a node passes its whole federation's roster)
        client._identity, client._random = identity, random_bytes
        client._roster = {c: roster[c] for c in client._cohort}
        client._neighbours = list(getattr(client, "_neighbours", []))
        return client

    def abort(self, why: str) -> None:
        """Leave the round (the transport saw a malformed request): nothing more is answered."""
        try:
            self._abort(why)
        except SecAggAbort:
            pass

    @property
    def next_stage(self) -> str:
        return "aborted" if self._aborted else (STAGE_ORDER[self._stage] if self._stage < len(STAGE_ORDER)
                                                else "finished")

    # ------------------------------------------------------------------ state machine
    def _enter(self, stage: str) -> None:
        if self._aborted:
            raise SecAggAbort(f"client {self.client}: aborted earlier this round; it answers nothing more")
        expected = STAGE_ORDER[self._stage] if self._stage < len(STAGE_ORDER) else "nothing (round finished)"
        if stage != expected:
            self._abort(f"asked for stage {stage!r} while expecting {expected!r}: every stage runs once, in order")
        self._stage += 1

    def _abort(self, why: str):
        self._aborted = True
        raise SecAggAbort(f"client {self.client}: {why}")

    def _sign(self, body: bytes) -> bytes:
        return self._identity.sign(body)

    # ------------------------------------------------------------------ stages
    def advertise(self) -> AdvertiseKeys:
        self._enter("advertise")
        if self.client not in self._roster:
            self._abort("not on the round's identity roster")
        try:
            self.config.check_cohort(len(self._cohort))
        except SecAggAbort as e:
            self._abort(str(e))
        self._enc_sk, enc_pk = crypto.x25519_keypair(self._random(32))
        self._mask_sk, mask_pk = crypto.x25519_keypair(self._random(32))
        self._self_seed = self._random(32)
        advert = AdvertiseKeys(self.client, enc_pk, mask_pk,
                               crypto.commit(b"self-seed", self.session, self.client, self._self_seed))
        self._advert = AdvertiseKeys(**{**advert.__dict__, "signature": self._sign(advert.body(self.session))})
        return self._advert

    def share_keys(self, adverts) -> ShareKeys:
        """``adverts``: the AdvertiseKeys the server relays (a list, or a dict by client)."""
        self._enter("share")
        received = list(adverts.values()) if isinstance(adverts, dict) else list(adverts)
        valid: dict[int, AdvertiseKeys] = {}
        for a in received:
            why = valid_advert(a, self._roster, self.session)
            if why is None and a.client in valid and valid[a.client] != a:
                why = "two different adverts for one client"
            if why is not None:
                log.warning("client %d: ignoring the key advert of %r: %s", self.client, getattr(a, "client", "?"), why)
                valid.pop(getattr(a, "client", None), None)
                continue
            valid[a.client] = a
        if valid.get(self.client) != self._advert:
            self._abort("the relayed key set omits or alters this client's own keys")
        if len(valid) < self.config.threshold:
            self._abort(f"only {len(valid)} valid key adverts, below the threshold {self.config.threshold}")
        self._adverts = valid
        self._keyset = keyset_digest(self.session, valid)
        self._neighbours = self.config.neighbourhood(self.client, sorted(valid), self._keyset)
        self._t = self.config.neighbour_threshold(len(valid))
        holders = self._neighbours + [self.client]  # a client holds a share of its own secrets too
        if len(holders) < self._t:
            self._abort(f"{len(holders)} share holders counting itself, threshold {self._t}")
        xs = [share_point(v, self._cohort) for v in holders]
        key_split = shamir.split(self._mask_sk, xs, self._t, self._random)  # {x: f(x)}
        seed_split = shamir.split(self._self_seed, xs, self._t, self._random)
        key_shares = {v: key_split[x] for v, x in zip(holders, xs)}
        seed_shares = {v: seed_split[x] for v, x in zip(holders, xs)}
        self._own = (key_shares[self.client], seed_shares[self.client])
        out = []
        for v in self._neighbours:
            key = crypto.agree(self._enc_sk, valid[v].enc_public, b"share")
            plain = _HEADER.pack(self.client, v) + key_shares[v].to_bytes(66, "big") + seed_shares[v].to_bytes(66, "big")
            share = EncryptedShare(self.client, v, crypto.encrypt(key, _nonce(self.client, v), plain, self.session),
                                   share_commitment(b"key", self.session, self.client, v, key_shares[v]),
                                   share_commitment(b"seed", self.session, self.client, v, seed_shares[v]))
            out.append(EncryptedShare(**{**share.__dict__, "signature": self._sign(share.body(self.session))}))
        msg = ShareKeys(self.client, tuple(out),
                        share_commitment(b"key", self.session, self.client, self.client, self._own[0]),
                        share_commitment(b"seed", self.session, self.client, self.client, self._own[1]))
        return ShareKeys(**{**msg.__dict__, "signature": self._sign(msg.body(self.session))})

    def _open_share(self, s: EncryptedShare) -> tuple[int, int] | str:
        """(key share, seed share) of a peer's secrets, or the reason the share is rejected."""
        v = s.sender
        if s.recipient != self.client or type(v) is not int or v not in self._neighbours:
            return "not addressed to this client by one of its neighbours"
        if not crypto.verify(self._roster[v], s.signature, s.body(self.session)):
            return "sender's identity signature does not verify (forged sender?)"
        plain = crypto.decrypt(crypto.agree(self._enc_sk, self._adverts[v].enc_public, b"share"),
                               _nonce(v, self.client), s.ciphertext, self.session)
        if plain is None or len(plain) != _PLAIN_LEN or _HEADER.unpack(plain[:16]) != (v, self.client):
            return "does not decrypt to a share for this client"
        key_share, seed_share = int.from_bytes(plain[16:82], "big"), int.from_bytes(plain[82:], "big")
        if key_share >= shamir.PRIME or seed_share >= shamir.PRIME or \
                share_commitment(b"key", self.session, v, self.client, key_share) != s.key_commitment or \
                share_commitment(b"seed", self.session, v, self.client, seed_share) != s.seed_commitment:
            return "share does not match its signed commitment"
        return key_share, seed_share

    def masked_input(self, mine: SharesForYou) -> MaskedInput:
        self._enter("upload")
        opened: dict[int, tuple[int, int]] = {}
        bad: set[int] = set()
        for s in mine.shares:
            result = self._open_share(s) if isinstance(s, EncryptedShare) else "not a share"
            sender = getattr(s, "sender", None)
            if isinstance(result, str) or sender in opened:
                log.warning("client %d: dropping peer %r: %s", self.client, sender,
                            result if isinstance(result, str) else "sent two shares")
                bad.add(sender)
                continue
            opened[sender] = result
        self._held = {v: sh for v, sh in opened.items() if v not in bad}
        if len(self._held) + 1 < self._t:
            self._abort(f"holds {len(self._held) + 1} valid shares counting its own, below the threshold {self._t}: "
                        "refusing to mask (its input would be protected by the self-mask alone)")
        y = self.encoded + crypto.prg_uint64(self._self_seed, len(self.encoded))
        for v in sorted(self._held):
            pair = crypto.prg_uint64(crypto.agree(self._mask_sk, self._adverts[v].mask_public, b"mask"), len(y))
            y = y + pair if pair_sign(self.client, v) > 0 else y - pair
        msg = MaskedInput(self.client, y, tuple(sorted(self._held)))
        return MaskedInput(**{**msg.__dict__, "signature": self._sign(msg.body(self.session))})

    def _check_lists(self, lists: SurvivorList) -> None:
        if not isinstance(lists, SurvivorList) or lists.session != self.session or lists.keyset != self._keyset:
            self._abort("survivor list is for another session or key set")
        alive, gone = set(lists.survivors), set(lists.dropped)
        if len(alive) != len(lists.survivors) or len(gone) != len(lists.dropped):
            self._abort("survivor list repeats a client")
        if alive & gone:
            self._abort(f"clients {sorted(alive & gone)} listed as both alive and dropped")
        if self.client not in alive:
            self._abort("server lists this (live) client as not surviving")
        if len(alive) < self.config.threshold:
            self._abort(f"{len(alive)} survivors, below the threshold {self.config.threshold}")
        if not (alive | gone) <= set(self._adverts):
            self._abort("lists name clients without valid key adverts")
        missing = set(self._held) - alive - gone
        if missing:
            self._abort(f"peers {sorted(missing)} missing from both lists")

    def sign_survivors(self, lists: SurvivorList) -> ListSignature:
        self._enter("sign")
        self._check_lists(lists)
        self._signed = lists
        return ListSignature(self.client, self._sign(lists.digest()))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._enter("unmask")
        lists = request.lists
        if lists != self._signed:
            self._abort("unmasking lists differ from the ones it signed")
        digest = lists.digest()
        valid = {c for c, sig in dict(request.signatures).items()
                 if c in lists.survivors and c in self._roster and crypto.verify(self._roster[c], sig, digest)}
        if len(valid) < self.config.threshold:
            self._abort(f"only {len(valid)} valid signatures on the survivor list (threshold "
                        f"{self.config.threshold}): the server may be equivocating")
        alive, gone = set(lists.survivors), set(lists.dropped)
        seed, key = {self.client: self._own[1]}, {}  # it is alive: its own b share is safe to give
        self._reveal(self.client, "seed")
        for v, (key_share, seed_share) in self._held.items():
            if v in alive:
                self._reveal(v, "seed")
                seed[v] = seed_share
            elif v in gone:
                self._reveal(v, "key")
                key[v] = key_share
        msg = UnmaskResponse(self.client, seed, key)
        return UnmaskResponse(**{**msg.__dict__, "signature": self._sign(msg.body(self.session))})

    def _reveal(self, owner: int, kind: str) -> None:
        if self._revealed.setdefault(owner, kind) != kind:
            self._abort(f"refusing to reveal both shares of client {owner}")
