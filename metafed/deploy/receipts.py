"""A client's side of the ledger (``--contribution`` in deployment): each round the server
sends the client its signed entry (:mod:`metafed.incentive.ledger`); the node checks it and
keeps it in ``<state folder>/receipts.jsonl``. Those receipts are the client's proof of what
the server recorded: the server cannot later deny or change them without its signature
failing, and the client can compare them with the published ledger."""
from __future__ import annotations

import json
from pathlib import Path

from metafed.deploy.private_state import append_private
from metafed.incentive.ledger import check_receipt

RECEIPTS = "receipts.jsonl"


class ReceiptRefused(ValueError):
    """A receipt that does not verify, is not this client's, or is signed by another key."""


def keep_receipt(state_dir: Path, client: int, rnd: int, entry: dict, public_key: str,
                 pinned_key: str | None = None) -> None:
    """Check ``entry`` and append it to the node's receipts. The key is the node config's
    ``ledger-public-key`` when given, else the key of the first receipt kept (trust on first
    use): a later receipt under another key is refused."""
    state_dir = Path(state_dir)
    path = state_dir / f"client-{client}-{RECEIPTS}"
    kept = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    expected = pinned_key or (kept[0]["public_key"] if kept else public_key)
    if public_key != expected:
        raise ReceiptRefused("signed by another ledger key than this client's earlier receipts (or the pinned one)")
    if entry.get("client") != client or entry.get("round") != rnd:
        raise ReceiptRefused(f"the entry is for client {entry.get('client')} round {entry.get('round')}, not "
                             f"client {client} round {rnd}")
    if not check_receipt(entry, public_key):
        raise ReceiptRefused("the entry's hash or signature does not verify")
    append_private(path, json.dumps({**entry, "public_key": public_key}, sort_keys=True) + "\n")


def read_receipts(state_dir: Path, client: int) -> list[dict]:
    path = Path(state_dir) / f"client-{client}-{RECEIPTS}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
