"""What a client's program returns, split by where each part goes.

A training program's ``final`` returns a dict: ``state`` (the client's persistent state,
which stays with the client: its node's disk in deployment, the client store in
simulation), ``metrics`` (reported beside the upload, never aggregated) and everything else,
which is the upload (``update``, Meta-SGD's rates, ...). Outputs may be one client's or
stacked [C, ...]."""
from __future__ import annotations

# the keys of a client's outputs that are not uploaded
LOCAL_KEYS = ("state", "metrics")


def upload_of(outputs: dict) -> dict:
    """The part of a client's outputs (one client's or stacked [C, ...]) it uploads."""
    return {k: v for k, v in outputs.items() if k not in LOCAL_KEYS}
