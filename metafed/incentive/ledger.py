"""The run's ledger: an append-only, hash-chained, Ed25519-signed record of who contributed
what and was paid what (``RUN_DIR/ledger.jsonl``).

Each line is one entry: ``{"seq", "round", "client", "update_sha256", "contribution",
"reward", "flags", "prev", "hash", "sig"}``. ``hash`` is the SHA-256 of the entry's
canonical JSON without ``hash`` and ``sig`` (sorted keys, no spaces), which includes
``prev``, the previous entry's hash (64 zeros for the first entry), so the entries form a
chain: editing, removing, reordering or inserting any entry breaks every hash after it.
``sig`` is the server's Ed25519 signature over ``hash`` (non-repudiation: only the key's
holder could have written the entry; a client that kept its entry can prove what the server
recorded). The first line is a header naming the server's public key.

Why a signed hash chain and not a blockchain: the properties that matter here are tamper
evidence (any change is detected by :func:`verify`), non-repudiation by the server (its
signature) and client-checkable receipts (a client checks its own entries against the
public key). A consensus network adds availability and agreement among mutually
distrusting *servers* (no single party can rewrite history even with its own key); one
coordinator has nobody to agree with. What one key cannot prevent is the key holder
rewriting the whole chain consistently; publishing the chain head (``metafed ledger
show`` prints it) somewhere outside the server's control, e.g. to the clients each round
or to a public timestamping service, pins history up to that point, which is what a
blockchain anchor provides.

The server's key: ``RUN_DIR/ledger_key.pem`` by default (mode 0600), or ``--ledger-key``
to keep it outside the run folder (then whoever holds the run folder cannot re-sign it).
Key generation uses the OS's secure generator (``cryptography``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metafed.run_folder import open_nofollow

LEDGER_FILE = "ledger.jsonl"
KEY_FILE = "ledger_key.pem"
GENESIS = "0" * 64
FIELDS = ("seq", "round", "client", "update_sha256", "contribution", "reward", "flags", "prev")


class LedgerError(RuntimeError):
    """The ledger does not verify, or cannot be written."""


def canonical(entry: dict) -> bytes:
    return json.dumps({k: entry[k] for k in FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The server's signing key at ``path``, created (0600, OS randomness) if absent."""
    if path.is_symlink():
        raise LedgerError(f"ledger key {path} is a symbolic link: refused")
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise LedgerError(f"ledger key {path} is not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"ledger key {path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class Ledger:
    """Appends signed entries to ``RUN_DIR/ledger.jsonl`` (see the module docstring)."""

    def __init__(self, run_dir: Path, key: Ed25519PrivateKey):
        self.path, self.key = Path(run_dir) / LEDGER_FILE, key
        self.head, self.count = GENESIS, 0
        if not self.path.exists():
            with open_nofollow(self.path, "w") as f:
                f.write(json.dumps({"ledger": "metafed", "public_key": public_hex(key), "hash": "sha256",
                                    "signature": "ed25519"}) + "\n")

    @property
    def public_key(self) -> str:
        return public_hex(self.key)

    def summary(self) -> dict:
        """What to publish (summary.json): entries so far, the chain head, the signing key."""
        return {"entries": self.count, "head": self.head, "public_key": self.public_key}

    def append(self, rnd: int, records: list[dict]) -> list[dict]:
        """One entry per record ({"client", "update_sha256", "contribution", "reward",
        "flags"}), chained and signed; returns the entries (each client's receipt)."""
        entries = []
        for r in records:
            entry = {"seq": self.count, "round": rnd, "client": r["client"], "update_sha256": r["update_sha256"],
                     "contribution": float(r["contribution"]), "reward": float(r["reward"]),
                     "flags": list(r.get("flags", [])), "prev": self.head}
            entry["hash"] = entry_hash(entry)
            entry["sig"] = self.key.sign(bytes.fromhex(entry["hash"])).hex()
            entries.append(entry)
            self.head, self.count = entry["hash"], self.count + 1
        with open_nofollow(self.path, "a") as f:
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        return entries

    def resume(self, count: int, head: str) -> None:
        """Continue after a checkpoint that committed ``count`` entries ending in ``head``:
        entries written after it (a round that did not commit) are dropped."""
        header, entries = read(self.path)
        if len(entries) < count or (count and entries[count - 1].get("hash") != head):
            raise LedgerError(f"{self.path} does not hold the {count} entries the checkpoint committed "
                              f"(head {head[:12]}...): edited or truncated")
        if header.get("public_key") != public_hex(self.key):
            raise LedgerError(f"{self.path} was signed by another key than this run's ledger key")
        lines = self.path.read_text().splitlines(keepends=True)[: count + 1]
        tmp = self.path.with_suffix(".tmp")
        with open_nofollow(tmp, "w") as f:
            f.write("".join(lines))
        os.replace(tmp, self.path)
        self.head, self.count = (head if count else GENESIS), count


def read(path: Path) -> tuple[dict, list[dict]]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise LedgerError(f"{path} not found: this run kept no ledger (run with --contribution)") from None
    except UnicodeDecodeError:
        raise LedgerError(f"{path} is not text") from None
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise LedgerError(f"{path} line {number} is not JSON: edited or truncated") from None
    if not parsed or not isinstance(parsed[0], dict) or "public_key" not in parsed[0]:
        raise LedgerError(f"{path} has no header line with the server's public key")
    return parsed[0], parsed[1:]


@dataclass
class Verification:
    ok: bool
    entries: int
    head: str
    public_key: str
    problems: list[str]


def verify(path: Path, public_key: str | None = None) -> Verification:
    """Check every entry: its fields, its sequence number, its link to the previous entry,
    its hash and its signature, against ``public_key`` (hex; default: the header's, which
    proves consistency but not who signed: pin the key you were given to prove that)."""
    header, entries = read(path)
    key_hex = public_key or header["public_key"]
    problems: list[str] = []
    if public_key and header["public_key"] != public_key:
        problems.append(f"header names public key {header['public_key'][:16]}..., not the pinned {public_key[:16]}...")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
    except ValueError:
        raise LedgerError(f"{key_hex!r} is not an Ed25519 public key (64 hex digits)") from None
    prev = GENESIS
    for i, e in enumerate(entries):
        where = f"entry {i + 1}"
        if not isinstance(e, dict) or any(k not in e for k in (*FIELDS, "hash", "sig")):
            problems.append(f"{where}: missing fields")
            prev = e.get("hash", prev) if isinstance(e, dict) else prev
            continue
        if e["seq"] != i:
            problems.append(f"{where}: sequence number {e['seq']} (expected {i}): removed, inserted or reordered")
        if e["prev"] != prev:
            problems.append(f"{where}: does not link to the entry before it: removed, inserted or reordered")
        if entry_hash(e) != e["hash"]:
            problems.append(f"{where} (round {e['round']}, client {e['client']}): content does not match its hash: "
                            "edited")
        try:
            key.verify(bytes.fromhex(e["sig"]), bytes.fromhex(e["hash"]))
        except (InvalidSignature, ValueError):
            problems.append(f"{where}: signature does not match the server's key")
        prev = e["hash"]
    return Verification(not problems, len(entries), prev, key_hex, problems)


def balances(path: Path) -> dict[str, dict]:
    """Per client: total reward, total contribution, rounds, rounds flagged."""
    _, entries = read(path)
    out: dict[str, dict] = defaultdict(lambda: {"reward": 0.0, "contribution": 0.0, "rounds": 0, "flagged": 0})
    for e in entries:
        b = out[str(e["client"])]
        b["reward"] += e["reward"]
        b["contribution"] += e["contribution"]
        b["rounds"] += 1
        b["flagged"] += bool(e["flags"])
    return dict(out)


def check_receipt(receipt: dict, public_key: str) -> bool:
    """A client's check of its own entry: the hash covers the fields, the server signed it."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(receipt["sig"]), bytes.fromhex(receipt["hash"]))
    except (InvalidSignature, ValueError, KeyError):
        return False
    return entry_hash(receipt) == receipt["hash"]
