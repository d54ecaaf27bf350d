"""Secure-aggregation identities for a deployment: each client's long-term Ed25519 signing
key (a file only that client's node reads) and the roster of every client's public key
(a file every node and the server read).

The roster is the trusted set-up of Bonawitz et al.'s malicious-server variant: it is made
and distributed by the federation's operators out of band (``metafed secagg-keys``), never
by the server at run time, so the server cannot slip its own key in for a client. The
server binds each roster entry to the SuperNode that registered as that client; peers
check every protocol message against the roster."""
from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from metafed.privacy.secagg import crypto


class IdentityError(ValueError):
    """A key or roster file is missing, unreadable or malformed."""


def make_identities(folder: Path, num_clients: int) -> tuple[Path, list[Path]]:
    """Write ``roster.json`` and ``client-<i>.key`` (PEM, mode 0600) for clients 0..n-1."""
    folder.mkdir(parents=True, exist_ok=True)
    roster, keys = {}, []
    for c in range(num_clients):
        signing, public = crypto.identity_keypair(os.urandom(32))
        path = folder / f"client-{c}.key"
        # a fresh file only: nothing planted at that name (a link, another key) is followed or reused
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        roster[str(c)] = base64.b64encode(public).decode()
        keys.append(path)
    roster_path = folder / "roster.json"
    roster_path.write_text(json.dumps({"format": "metafed-secagg-roster-1", "clients": roster}, indent=1))
    return roster_path, keys


def load_roster(path) -> dict[int, bytes]:
    """client id -> raw Ed25519 public key."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "metafed-secagg-roster-1":
            raise IdentityError(f"{path}: not a metafed secure-aggregation roster")
        roster = {int(c): base64.b64decode(k, validate=True) for c, k in doc["clients"].items()}
    except IdentityError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise IdentityError(f"cannot read the secure-aggregation roster {path}: {type(e).__name__}: {e}") from None
    bad = [c for c, k in roster.items() if len(k) != 32 or c < 0]
    if bad:
        raise IdentityError(f"{path}: malformed entries for clients {bad[:5]}")
    return roster


def registration_message(challenge: bytes, client: int) -> bytes:
    """What a node signs to claim ``client`` at registration: the server's fresh challenge
    and the id, so a signature is good for one registration of one id only."""
    return b"metafed-register-1" + challenge + int(client).to_bytes(8, "big", signed=True)


def load_identity(path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise IdentityError(f"cannot read the secure-aggregation identity key {path}: {type(e).__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 private key")
    return key
