"""Cryptographic building blocks, all from the ``cryptography`` package: X25519 key
agreement, HKDF-SHA256, AES-256-GCM for share transport, Ed25519 signatures for the
consistency check, and AES-256-CTR as the pseudo-random generator that expands a full
32-byte key into a mask vector."""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
PRIV_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                encryption_algorithm=serialization.NoEncryption())


def x25519_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte keys from 32 random bytes."""
    sk = X25519PrivateKey.from_private_bytes(seed)
    return sk.private_bytes(**PRIV_RAW), sk.public_key().public_bytes(**RAW)


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """32-byte key = HKDF-SHA256(X25519(private, peer_public), info=purpose)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"metafed-secagg/" + purpose).derive(shared)


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    return AESGCM(key).decrypt(nonce, ciphertext, associated)


def prg_uint64(key: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 values: AES-256-CTR keystream under the full key."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(b"\x00" * (8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.uint64).copy()


def signing_keypair(seed: bytes) -> tuple[Ed25519PrivateKey, bytes]:
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    return sk, sk.public_key().public_bytes(**RAW)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not a valid signature"
        return False
