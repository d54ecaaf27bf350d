"""The client side of secure aggregation on a SuperNode (see ``secagg_wire`` for the
message flow). Everything the client keeps between stages lives in the SuperNode's memory
(``context.state``): the upload it trained (until it is masked), its encoded input and the
protocol state machine with its secrets. A stage request that breaks the protocol, or that
does not decode, aborts the client for the round and wipes that state; a session is never
started twice, so a replayed round gets nothing."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np

from metafed import tree
from metafed.tree import flatten_messages
from metafed.deploy.secagg_wire import REQUEST_TYPE, bound_session, masked_vector_reply
from metafed.privacy.secagg import FixedPoint, QuantizationRangeError, SecAggAbort, SecAggClient, SecAggConfig, codec
from metafed.privacy.upload import UploadTransform, finish_upload, own_weight

log = logging.getLogger("metafed.deploy")

UPLOAD, UPLOAD_META = "metafed.upload", "metafed.upload-meta"
PROTOCOL, ENCODED = "metafed.secagg", "metafed.secagg-encoded"


class StageRefused(RuntimeError):
    """This client will not answer the stage request; the reason goes back as an error."""


# ---------------------------------------------------------------------------- held upload
def hold_upload(state, rnd: int, row: dict) -> None:
    """Keep this round's trained upload in node memory until the protocol masks it."""
    from flwr.app import ConfigRecord

    from metafed.deploy.wire import to_records

    state[UPLOAD] = to_records(row)
    state[UPLOAD_META] = ConfigRecord({"round": rnd})


def _take_upload(state, rnd: int) -> dict:
    from metafed.deploy.wire import from_records

    if UPLOAD not in state or int(state[UPLOAD_META]["round"]) != rnd:
        raise StageRefused(f"no upload trained for round {rnd} is held here")
    row = from_records(state[UPLOAD])
    del state[UPLOAD], state[UPLOAD_META]  # masked once, then gone
    return row


# ---------------------------------------------------------------------------- protocol state
def _save(state, client: SecAggClient, run_id: bytes, rnd: int) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    if client.next_stage in ("aborted", "finished"):
        _clear(state)
        return
    used = list(state[PROTOCOL]["used"]) if PROTOCOL in state else []
    state[PROTOCOL] = ConfigRecord({"snapshot": client.snapshot(), "run": run_id, "round": rnd, "used": used})
    state[ENCODED] = ArrayRecord({"encoded": Array(np.ascontiguousarray(client.encoded, dtype=np.uint64))})


def _clear(state) -> None:
    from flwr.app import ConfigRecord

    used = list(state[PROTOCOL]["used"]) if PROTOCOL in state else []
    state[PROTOCOL] = ConfigRecord({"used": used})  # sessions already started stay refused
    if ENCODED in state:
        del state[ENCODED]


def _mark_used(state, session: bytes) -> None:
    from flwr.app import ConfigRecord

    record = dict(state[PROTOCOL]) if PROTOCOL in state else {}
    used = list(record.get("used", []))
    if session.hex() in used:
        raise StageRefused("this secure-aggregation session was already started here (a replayed round)")
    record["used"] = (used + [session.hex()])[-1000:]
    state[PROTOCOL] = ConfigRecord(record)


# ---------------------------------------------------------------------------- stages
def handle_stage(content, state, node, identity, roster_all: dict[int, bytes]) -> dict:
    """Run one stage for ``node``; returns the reply content (a dict of Flower records)."""
    from flwr.app import ConfigRecord

    sec = content["secagg"]
    stage, run_id, body = str(sec["stage"]), bytes(sec["run"]), sec["body"]
    rnd, config_json = int(content["config"]["round"]), str(content["config"]["config"])
    if stage == "advertise":
        client = _start(state, node, identity, roster_all, rnd, run_id, config_json, body)
        reply = client.advertise()
    else:
        if stage not in REQUEST_TYPE:
            raise StageRefused(f"unknown secure-aggregation stage {stage!r}")
        if PROTOCOL not in state or "snapshot" not in state[PROTOCOL]:
            raise StageRefused(f"no secure-aggregation round in progress here (asked for {stage!r})")
        saved = state[PROTOCOL]
        client = SecAggClient.restore(str(saved["snapshot"]), state[ENCODED]["encoded"].numpy(), identity,
                                      roster_all)
        if bytes(saved["run"]) != run_id or int(saved["round"]) != rnd:
            client.abort("stage request for another run or round")
            _clear(state)
            raise StageRefused("stage request for another run or round than the one in progress")
        try:
            request = codec.decode_list(body, REQUEST_TYPE[stage]) if stage == "share" else \
                codec.decode(body, REQUEST_TYPE[stage])
        except codec.MalformedMessage as e:
            _clear(state)
            raise StageRefused(f"malformed {stage} request: {e}") from None
        try:
            reply = _CALL[stage](client, request)
        except SecAggAbort:
            _clear(state)
            raise
    _save(state, client, run_id, rnd)
    if stage == "upload":
        return masked_vector_reply(reply)
    return {"secagg": ConfigRecord({"body": codec.encode(reply)})}


_CALL = {"share": SecAggClient.share_keys, "upload": SecAggClient.masked_input, "sign": SecAggClient.sign_survivors,
         "unmask": SecAggClient.unmask}


def _start(state, node, identity, roster_all, rnd: int, run_id: bytes, config_json: str, body) -> SecAggClient:
    """The advertise stage: check the round setup, finish and encode the held upload, and
    start this client's state machine for the session."""
    try:
        setup = json.loads(body)
        cohort = [int(c) for c in setup["cohort"]]
        threshold, k = int(setup["threshold"]), int(setup["neighbours"])
        fixed = FixedPoint(float(setup["range"]), int(setup["bits"]))
        transform = UploadTransform.from_config(setup["transform"])
        weighting = str(setup["weighting"])
        config = SecAggConfig(threshold, None if k == -1 else k)
    except (ValueError, KeyError, TypeError) as e:
        raise StageRefused(f"malformed round setup: {e}") from None
    if sorted(set(cohort)) != sorted(cohort) or node.client_id not in cohort:
        raise StageRefused("the round's cohort repeats a client or leaves this client out")
    if roster_all.get(node.client_id) != identity.public_key().public_bytes_raw():
        raise StageRefused(f"this node's identity key is not client {node.client_id}'s key on the roster")
    strangers = [c for c in cohort if c not in roster_all]
    if strangers:
        raise StageRefused(f"cohort members {strangers[:5]} are not on this node's identity roster")
    session = bound_session(run_id, rnd, config_json, setup)
    _mark_used(state, session)
    row = _take_upload(state, rnd)
    if weighting != "none":
        cfg = json.loads(config_json)
        transform = replace(transform, weight=own_weight(float(node.data.num_train), weighting,
                                                         cfg.get("max_sample_weight")))
    finished = finish_upload(row, transform)
    x = flatten_messages(tree.nested_map(lambda v: v.unsqueeze(0), finished))[0][0].numpy()  # the server's layout
    try:
        fixed.check_capacity(len(cohort))
        encoded = fixed.encode(x)
    except (QuantizationRangeError, ValueError) as e:
        raise StageRefused(f"input cannot be encoded for secure aggregation: {e}") from None
    return SecAggClient(node.client_id, encoded, config, identity, {c: roster_all[c] for c in cohort}, session)
