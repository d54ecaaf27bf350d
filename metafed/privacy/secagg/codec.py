"""Secure-aggregation protocol messages as JSON text, for transports between processes.

No pickle: every value is one of a few tagged forms (bytes as base64, uint64 vectors as
base64 of their little-endian bytes, dicts as key/value pairs so integer keys survive), and
decoding rebuilds only the message classes listed here, each field checked against its
declared type. A message that fails any check raises :class:`MalformedMessage`; the
receiver drops it (server) or aborts the round (client), never crashes."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json

import numpy as np

from metafed.privacy.secagg.messages import (AdvertiseKeys, EncryptedShare, ListSignature, MaskedInput, ShareKeys,
                                             SharesForYou, SurvivorList, UnmaskRequest, UnmaskResponse)
from metafed.privacy.secagg.protocol import SecAggConfig

MAX_MESSAGE_CHARS = 64 * 2 ** 20  # far above a 1000-client share bundle; a masked vector travels as an array


class MalformedMessage(ValueError):
    """A protocol message that does not decode to the expected, well-typed message."""


# field -> checker, per message class. "int" excludes bool; "ints" a tuple of ints; "shares" the share tuple.
_INT, _BYTES = "int", "bytes"
SCHEMA: dict[type, dict[str, object]] = {
    AdvertiseKeys: {"client": _INT, "enc_public": _BYTES, "mask_public": _BYTES, "seed_commitment": _BYTES,
                    "signature": _BYTES},
    EncryptedShare: {"sender": _INT, "recipient": _INT, "ciphertext": _BYTES, "key_commitment": _BYTES,
                     "seed_commitment": _BYTES, "signature": _BYTES},
    ShareKeys: {"client": _INT, "shares": (EncryptedShare,), "own_key_commitment": _BYTES,
                "own_seed_commitment": _BYTES, "signature": _BYTES},
    SharesForYou: {"recipient": _INT, "shares": (EncryptedShare,)},
    MaskedInput: {"client": _INT, "vector": "u64", "paired": (_INT,), "signature": _BYTES},
    SurvivorList: {"session": _BYTES, "keyset": _BYTES, "survivors": (_INT,), "dropped": (_INT,)},
    ListSignature: {"client": _INT, "signature": _BYTES},
    UnmaskRequest: {"lists": SurvivorList, "signatures": {_INT: _BYTES}},
    UnmaskResponse: {"client": _INT, "self_mask_shares": {_INT: _INT}, "mask_key_shares": {_INT: _INT},
                     "signature": _BYTES},
    SecAggConfig: {"threshold": _INT, "neighbours": (None, _INT)},
}
_BY_NAME = {cls.__name__: cls for cls in SCHEMA}


def to_plain(value):
    """Message (or a nest of them, bytes, ints, dicts, tuples, uint64 arrays) -> JSON-able."""
    if dataclasses.is_dataclass(value) and type(value) in SCHEMA:
        return {"_t": type(value).__name__, **{f.name: to_plain(getattr(value, f.name))
                                               for f in dataclasses.fields(value)}}
    if isinstance(value, bytes):
        return {"_b": base64.b64encode(value).decode()}
    if isinstance(value, np.ndarray):
        return {"_u64": base64.b64encode(np.ascontiguousarray(value, dtype="<u8").tobytes()).decode()}
    if isinstance(value, dict):
        return {"_d": [[to_plain(k), to_plain(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} in a secure-aggregation message")


def from_plain(value):
    """Inverse of :func:`to_plain`, for trusted state (the client's own saved state).
    Untrusted messages go through :func:`decode`, which also checks every field."""
    if isinstance(value, list):
        return tuple(from_plain(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "_b" in value:
        return _b64(value["_b"])
    if "_u64" in value:
        return np.frombuffer(_b64(value["_u64"]), dtype="<u8").astype(np.uint64)
    if "_d" in value:
        pairs = value["_d"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise MalformedMessage("malformed mapping")
        return {from_plain(k): from_plain(v) for k, v in pairs}
    cls = _BY_NAME.get(value.get("_t"))
    if cls is None:
        raise MalformedMessage(f"unknown message type {value.get('_t')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(value) - {"_t"} != names:
        raise MalformedMessage(f"{cls.__name__}: fields {sorted(set(value) - {'_t'})}, expected {sorted(names)}")
    fields = {k: from_plain(v) for k, v in value.items() if k != "_t"}
    for name, spec in SCHEMA[cls].items():
        if not _conforms(fields[name], spec):
            raise MalformedMessage(f"{cls.__name__}.{name} has the wrong type")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise MalformedMessage(f"{cls.__name__}: {e}") from None


def _b64(text) -> bytes:
    if not isinstance(text, str):
        raise MalformedMessage("malformed bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage("malformed base64") from None


def _conforms(value, spec) -> bool:
    if spec == _INT:
        return type(value) is int
    if spec == _BYTES:
        return type(value) is bytes
    if spec == "u64":
        return isinstance(value, np.ndarray) and value.dtype == np.uint64 and value.ndim == 1
    if isinstance(spec, type):
        return type(value) is spec
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] is None:
        return value is None or _conforms(value, spec[1])
    if isinstance(spec, tuple):
        return isinstance(value, tuple) and all(_conforms(v, spec[0]) for v in value)
    if isinstance(spec, dict):
        (k_spec, v_spec), = spec.items()
        return isinstance(value, dict) and all(_conforms(k, k_spec) and _conforms(v, v_spec) for k, v in value.items())
    return False


def encode(message) -> str:
    return json.dumps(to_plain(message), separators=(",", ":"))


def _untrusted(text):
    """JSON text from an untrusted party -> messages, or MalformedMessage (never a crash)."""
    if not isinstance(text, str) or len(text) > MAX_MESSAGE_CHARS:
        raise MalformedMessage("not a message of acceptable size")
    try:
        plain = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedMessage("not JSON") from None
    try:
        return from_plain(plain)
    except (RecursionError, TypeError):  # too deep, or an unhashable mapping key
        raise MalformedMessage("malformed nesting") from None


def decode(text, expected: type):
    """JSON text from an untrusted party -> a well-typed ``expected`` message, or MalformedMessage."""
    message = _untrusted(text)
    if type(message) is not expected:
        raise MalformedMessage(f"expected {expected.__name__}, got {type(message).__name__}")
    return message


def decode_list(text, expected: type) -> list:
    """A JSON list of ``expected`` messages (e.g. the relayed key adverts)."""
    out = _untrusted(text)
    if not isinstance(out, tuple):
        raise MalformedMessage("expected a list of messages")
    if not all(type(m) is expected for m in out):
        raise MalformedMessage(f"expected a list of {expected.__name__}")
    return out
