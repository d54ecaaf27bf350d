"""Cryptographic building blocks, all from the ``cryptography`` package: X25519 key
agreement, HKDF-SHA256, AES-256-GCM for share transport, Ed25519 for long-term identity
signatures, SHA-256 commitments, and AES-256-CTR as the pseudo-random generator that expands
a full 32-byte key into a mask vector.

Every function that parses bytes a peer sent returns ``None`` / ``False`` on malformed
input instead of raising, so a malicious peer can make itself dropped but cannot crash an
honest party with ``InvalidTag`` or ``ValueError``."""
from __future__ import annotations

import functools
import hashlib
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
PRIV_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                encryption_algorithm=serialization.NoEncryption())
# masks are defined as little-endian uint64 words of the keystream on every machine
MASK_DTYPE = np.dtype("<u8")
_PROBE = os.urandom(32)  # a throwaway X25519 key for the small-order check


def x25519_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte keys from 32 random bytes."""
    sk = X25519PrivateKey.from_private_bytes(seed)
    return sk.private_bytes(**PRIV_RAW), sk.public_key().public_bytes(**RAW)


def x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**RAW)


@functools.lru_cache(maxsize=1 << 12)
def _private_key(private: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(private)


@functools.lru_cache(maxsize=1 << 12)
def usable_public_key(public: bytes) -> bool:
    """A 32-byte X25519 key that is not of small order (any exchange with it succeeds)."""
    return agree(_PROBE, public, b"probe") is not None


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes | None:
    """32-byte key = HKDF-SHA256(X25519(private, peer_public), info=purpose), or None when the
    peer's key is malformed or of small order (X25519 then refuses the exchange)."""
    try:
        shared = _private_key(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except (ValueError, TypeError):
        return None
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"metafed-secagg/" + purpose).derive(shared)


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext or tag was forged or corrupted."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated)
    except (InvalidTag, ValueError, TypeError):
        return None


def prg_uint64(key: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 values: the AES-256-CTR keystream under the full key,
    read as little-endian words (the same masks on big- and little-endian machines)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(b"\x00" * (8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=MASK_DTYPE).astype(np.uint64)


def identity_keypair(seed: bytes) -> tuple[Ed25519PrivateKey, bytes]:
    """A long-term Ed25519 identity: (signing key, raw 32-byte public key)."""
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    return sk, sk.public_key().public_bytes(**RAW)


@functools.lru_cache(maxsize=1 << 16)
def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification. Deterministic, so it is memoised: in simulation every client
    checks the same relayed adverts."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except Exception:  # noqa: BLE001 - any failure (bad key, bad signature, wrong types) means "not valid"
        return False


def commit(*parts) -> bytes:
    """SHA-256 over length-prefixed parts (bytes, or ints as 8-byte signed / 66-byte field
    elements): a binding commitment and the canonical message encoding for signatures."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, int):
            p = p.to_bytes(66, "big", signed=True)
        elif isinstance(p, str):
            p = p.encode()
        h.update(struct.pack(">I", len(p)) + p)
    return h.digest()
