"""Secure-aggregation protocol messages and the exact bytes each signature covers.

Every message a client sends is signed with its long-term Ed25519 identity key over the
session id (run, round), so the server can neither forge nor replay one into another round,
and peers check each other against a roster of identity keys that the server cannot change
(the trusted set-up code builds it in simulation; the deployment's allow-list in production).
Messages are plain dataclasses of bytes, ints and uint64 arrays, so any transport can carry
them without pickling."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metafed.privacy.secagg import crypto

def session_id(run: bytes, rnd: int) -> bytes:
    """The 32-byte id every signature and commitment of one round is bound to."""
    return crypto.commit(b"metafed-secagg-session", run, rnd)


@dataclass(frozen=True)
class AdvertiseKeys:
    client: int
    enc_public: bytes
    mask_public: bytes
    seed_commitment: bytes  # commit(self-mask seed b): lets the server verify a rebuilt b
    signature: bytes = b""

    def body(self, session: bytes) -> bytes:
        return crypto.commit(b"advertise", session, self.client, self.enc_public, self.mask_public, self.seed_commitment)


def valid_advert(advert: AdvertiseKeys, roster: dict[int, bytes], session: bytes) -> str | None:
    """None if the advert is well formed and signed by the roster's identity key, else why not.
    Clients and server apply the same rule, so they agree on the key set."""
    if not isinstance(advert, AdvertiseKeys) or type(advert.client) is not int or advert.client not in roster:
        return "sender is not on the identity roster"
    if not all(isinstance(b, bytes) and len(b) == 32 for b in (advert.enc_public, advert.mask_public,
                                                               advert.seed_commitment)):
        return "malformed keys"
    if not crypto.verify(roster[advert.client], advert.signature, advert.body(session)):
        return "identity signature does not verify"
    if not (crypto.usable_public_key(advert.enc_public) and crypto.usable_public_key(advert.mask_public)):
        return "public key of small order"
    return None


def keyset_digest(session: bytes, adverts: dict[int, AdvertiseKeys]) -> bytes:
    """Hash of every accepted advert: seeds the SecAgg+ graph (no single party picks it) and is
    part of the signed survivor list (all signers saw the same keys)."""
    parts = []
    for c in sorted(adverts):
        a = adverts[c]
        parts += [c, a.enc_public, a.mask_public, a.seed_commitment]
    return crypto.commit(b"keyset", session, len(adverts), *parts)


def share_commitment(kind: bytes, session: bytes, owner: int, holder: int, value: int) -> bytes:
    return crypto.commit(b"share-commitment", kind, session, owner, holder, value)


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    recipient: int
    ciphertext: bytes
    key_commitment: bytes  # commits to the share of the sender's mask key s_sk
    seed_commitment: bytes  # commits to the share of the sender's self-mask seed b
    signature: bytes = b""

    def body(self, session: bytes) -> bytes:
        return crypto.commit(b"share", session, self.sender, self.recipient, self.ciphertext, self.key_commitment,
                             self.seed_commitment)


@dataclass(frozen=True)
class ShareKeys:
    client: int
    shares: tuple[EncryptedShare, ...]
    own_key_commitment: bytes  # commitments to the shares the client keeps of its own secrets
    own_seed_commitment: bytes
    signature: bytes = b""

    def body(self, session: bytes) -> bytes:
        return crypto.commit(b"share-keys", session, self.client, self.own_key_commitment, self.own_seed_commitment,
                             len(self.shares), *(s.signature for s in self.shares))


@dataclass(frozen=True)
class SharesForYou:
    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    client: int
    vector: np.ndarray  # uint64 [D]
    paired: tuple[int, ...]  # peers whose valid shares this client held, i.e. whose pairwise masks it added
    signature: bytes = b""

    def body(self, session: bytes) -> bytes:
        vec = np.ascontiguousarray(self.vector).astype(crypto.MASK_DTYPE).tobytes()
        return crypto.commit(b"masked", session, self.client, vec, len(self.paired), *self.paired)


@dataclass(frozen=True)
class SurvivorList:
    session: bytes
    keyset: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def digest(self) -> bytes:
        return crypto.commit(b"survivors", self.session, self.keyset, len(self.survivors), *self.survivors,
                             len(self.dropped), *self.dropped)


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
    self_mask_shares: dict[int, int]  # owner -> share of owner's b (owner survived)
    mask_key_shares: dict[int, int]  # owner -> share of owner's s_sk (owner dropped)
    signature: bytes = b""

    def body(self, session: bytes) -> bytes:
        b = [x for o in sorted(self.self_mask_shares) for x in (o, self.self_mask_shares[o])]
        s = [x for o in sorted(self.mask_key_shares) for x in (o, self.mask_key_shares[o])]
        return crypto.commit(b"unmask", session, self.client, len(b), *b, len(s), *s)
