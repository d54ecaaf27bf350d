"""What travels between the ServerApp and the ClientApps: nested dicts of tensors as Flower
ArrayRecords (each leaf a numpy array serialised with ``np.save(allow_pickle=False)``), and
the checks every reply passes before the round loop sees it."""
from __future__ import annotations

import math

import numpy as np
import torch

from metafed import tree

MAX_REPLY_BYTES = 512 * 2 ** 20  # far above the FEMNIST CNN (26 MB); a bigger reply is refused


class BadReply(ValueError):
    """A client's reply fails validation; the message says why. The round goes on without it."""


def to_records(nested: dict):
    """Nested dict of tensors -> ArrayRecord with flat keys 'a/b/c'."""
    from flwr.app import Array, ArrayRecord

    flat = tree.nested_flatten(nested)
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in flat.items()})


def from_records(record, expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> dict:
    """ArrayRecord -> nested dict of tensors. With ``expected`` (flat key -> (shape, dtype)),
    every key, shape and dtype must match and every value must be finite."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise BadReply(f"expected an ArrayRecord, got {type(record).__name__}")
    items = dict(record.items())
    if expected is not None and set(items) != set(expected):
        missing, extra = sorted(set(expected) - set(items)), sorted(set(items) - set(expected))
        raise BadReply(f"arrays do not match the broadcast: missing {missing[:5]}, unexpected {extra[:5]}")
    size = 0
    flat = {}
    for key, array in items.items():
        size += len(getattr(array, "data", b""))
        if size > MAX_REPLY_BYTES:
            raise BadReply(f"reply larger than {MAX_REPLY_BYTES // 2 ** 20} MiB")
        try:
            value = array.numpy()
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad reply
            raise BadReply(f"array {key!r} does not decode: {type(e).__name__}") from None
        if value.dtype.kind not in "fiub" or value.dtype.hasobject:
            raise BadReply(f"array {key!r} has dtype {value.dtype}")
        tensor = torch.from_numpy(np.array(value))
        if expected is not None:
            shape, dtype = expected[key]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise BadReply(f"array {key!r}: expected {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BadReply(f"array {key!r} holds NaN or Inf")
        flat[key] = tensor
    return tree.nested_unflatten(flat)


def layout(nested: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """flat key -> (shape, dtype) of one client's message (no leading client axis)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tree.nested_flatten(nested).items()}


def finite_number(value, what: str, low: float = -math.inf) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise BadReply(f"{what} must be a finite number >= {low}, got {value!r}")
    return float(value)
