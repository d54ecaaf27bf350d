"""metafed's own secure aggregation (SecAgg / SecAgg+, ``metafed.privacy.secagg``) between
real ClientApps, relayed by the ServerApp. The server only ever holds masked vectors.

One round, after the ``train`` message (each client keeps its upload on its node):

  query.secagg stage=advertise  {round setup}         -> AdvertiseKeys
  query.secagg stage=share      {relayed adverts}     -> ShareKeys
  query.secagg stage=upload     {SharesForYou}        -> MaskedInput (vector as a uint64 array)
  query.secagg stage=sign       {SurvivorList}        -> ListSignature
  query.secagg stage=unmask     {UnmaskRequest}       -> UnmaskResponse

The client's protocol state (its secrets included) lives in the SuperNode's memory between
stages (``context.state``, handed to whichever process serves the next message: Flower's
process per message, or the warm worker of ``metafed node``), never on disk and never sent;
it is deleted when the round ends or aborts.

The round setup (cohort, threshold, SecAgg+ k, fixed-point range, the upload transform, the
weighting) and the run config are hashed into the session id every signature binds to: a
server that shows two clients different setups (say, a tiny clip or weight for all but one
client, to read that one out of the sum) gets two sessions whose messages do not verify for
each other, and the round aborts. Each client computes its weight itself
(:func:`~metafed.privacy.upload.own_weight`)."""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from metafed import tree
from metafed.privacy.secagg import codec
from metafed.privacy.secagg.messages import (AdvertiseKeys, ListSignature, MaskedInput, SharesForYou, ShareKeys,
                                             SurvivorList, UnmaskRequest, UnmaskResponse, session_id)

log = logging.getLogger("metafed.deploy")

REPLY_TYPE = {"advertise": AdvertiseKeys, "share": ShareKeys, "upload": MaskedInput, "sign": ListSignature,
              "unmask": UnmaskResponse}
REQUEST_TYPE = {"share": AdvertiseKeys, "upload": SharesForYou, "sign": SurvivorList, "unmask": UnmaskRequest}


def round_setup(cohort: list[int], threshold: int, neighbours: int | None, value_range: float, bits: int,
                transform: dict, weighting: str | None) -> dict:
    """What every client of the round must agree on (JSON-able, sent at the advertise stage)."""
    return {"cohort": [int(c) for c in cohort], "threshold": int(threshold),
            "neighbours": -1 if neighbours is None else int(neighbours), "range": float(value_range),
            "bits": int(bits), "transform": transform, "weighting": weighting or "none"}


def bound_session(run_id: bytes, rnd: int, config_json: str, setup: dict) -> bytes:
    """session_id over (run, round, hash of the run config and the round setup)."""
    digest = hashlib.sha256(json.dumps({"config": config_json, "setup": setup}, sort_keys=True).encode()).digest()
    return session_id(bytes(run_id) + digest, rnd)


def stage_request(stage: str, rnd: int, run_id: bytes, config_json: str, payload) -> dict:
    """Content of one stage message (Flower records)."""
    from flwr.app import ConfigRecord

    body = json.dumps(payload) if stage == "advertise" else codec.encode(payload)
    return {"config": ConfigRecord({"config": config_json, "round": rnd}),
            "secagg": ConfigRecord({"stage": stage, "run": bytes(run_id), "body": body})}


def masked_vector_reply(message: MaskedInput) -> dict:
    """A MaskedInput travels as JSON without its vector, plus the vector as a uint64 array."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    empty = MaskedInput(message.client, np.zeros(0, dtype=np.uint64), message.paired, message.signature)
    return {"secagg": ConfigRecord({"body": codec.encode(empty)}),
            "vector": ArrayRecord({"vector": Array(np.ascontiguousarray(message.vector, dtype=np.uint64))})}


def read_reply(reply, stage: str, length: int):
    """The protocol message in a client's reply, well typed, or MalformedMessage."""
    from flwr.app import ArrayRecord

    message = codec.decode(reply.content["secagg"]["body"], REPLY_TYPE[stage])
    if stage == "upload":
        record = reply.content["vector"]
        if not isinstance(record, ArrayRecord) or list(record.keys()) != ["vector"]:
            raise codec.MalformedMessage("masked vector missing")
        array = record["vector"]
        if array.dtype != "uint64" or tuple(array.shape) != (length,):
            raise codec.MalformedMessage(f"masked vector {array.dtype} {tuple(array.shape)}, expected uint64 "
                                         f"({length},)")
        message = MaskedInput(message.client, np.array(array.numpy(), dtype=np.uint64), message.paired,
                              message.signature)
    return message


def sum_layout(template_row: dict) -> tuple[list, int]:
    """(flat layout, vector length) of one client's finished upload."""
    from metafed.tree import flatten_messages

    x, layout = flatten_messages(tree.nested_map(lambda v: v.unsqueeze(0), template_row))
    return layout, int(x.shape[1])
