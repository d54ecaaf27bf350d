"""metafed's Flower ClientApp: runs on each SuperNode, on that node's data only.

Messages (``message_type`` / content):
- ``query`` {"config"}: reply who this node is (client id, sample count, data shape).
- ``train`` {"config", "broadcast"}: rebuild the run's algorithm, run this round's
  ``LocalProgram`` with the loop backend exactly as the simulation would (same seeded
  schedule), keep the personal state on the node's disk, reply the uploaded arrays.
  With ``upload`` (local DP) the client clips and noises before replying; with ``hold``
  (secure aggregation) it keeps the upload in node memory and replies only its metadata;
  under ``--compress`` it replies the encoded bytes (``encoded``), its error-feedback
  residual kept on the node's disk. Under ``--compress-down`` the params come as ``down``
  (base round) and ``down_data`` (the payloads it missed, or the dense replica), applied to
  the replica the node keeps on its disk.
- ``query.secagg`` {"config", "secagg"}: one stage of secure aggregation (``secagg_wire``).
- ``evaluate`` {"config", "broadcast"}: score the global and personalized model on the
  node's test split; reply counts only.
- ``query.receipt`` {"config"}: this client's signed ledger entry of the round
  (``--contribution``): checked and kept in the node's ``receipts.jsonl``.

Node data: :func:`builtin_node` (node config), or your own loader through
:func:`metafed.deploy.flower_apps`. The config record carries the run config as JSON plus
the round. Tensors travel as
ArrayRecords (numpy, never pickle). Errors are replied as Flower errors, never crashes."""
from __future__ import annotations

import functools
import json
import logging
import types
from typing import Callable

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from metafed import tree
from metafed.client.reply import upload_of
from metafed.client.runner import run_clients
from metafed.deploy.identity import load_identity, load_roster, registration_message
from metafed.deploy.node import Node, NodeConfigError, file_node, load_node, parse_node_config
from metafed.deploy.policy import NodePolicy, NodePolicyError, PolicyRefusal, cached_policy
from metafed.deploy.private_state import StateFolderError, default_state_root
from metafed.deploy.receipts import ReceiptRefused, keep_receipt
from metafed.deploy.secagg_node import StageRefused, handle_stage, hold_upload
from metafed.deploy.wire import from_records, to_records
from metafed.eval import evaluate_new_client, evaluate_one_client
from metafed.privacy.secagg import SecAggAbort
from metafed.privacy.upload import UploadTransform

log = logging.getLogger("metafed.deploy")
REFUSED = 4100  # metafed's error code: the client refuses the request (the reason says why)


def builtin_node(config_json: str, context: Context, model_fn=None) -> Node:
    """The node's data from its ``--node-config``: a partition of a built-in dataset
    (``dataset=NAME partition-id=K num-partitions=N``) or the party's own file
    (``data-file=PATH client-id=K num-classes=C``, see :func:`load_node_file`)."""
    node_config = dict(context.node_config)
    if "data-file" in node_config:
        return _cached_file_node(config_json, tuple(sorted((k, str(v)) for k, v in node_config.items())), model_fn)
    dataset, pid, parts = parse_node_config(node_config)
    state_dir = str(node_config.get("state-dir", default_state_root() / f"partition-{pid}"))
    return load_node(config_json, dataset, pid, parts, state_dir, model_fn)


@functools.lru_cache(maxsize=4)
def _cached_file_node(config_json: str, node_config: tuple, model_fn) -> Node:
    return file_node(config_json, dict(node_config), model_fn)


class MetafedClient:
    """The ClientApp's handlers over a node loader ``(run config JSON, Context) -> Node``."""

    def __init__(self, load: Callable[[str, Context], Node]):
        self.load = load

    def _node(self, msg: Message, context: Context) -> tuple[Node, int]:
        """The node this message is for, after its policy accepted the run (PolicyRefusal)."""
        config = msg.content["config"]
        node = self.load(_with_node_data_dir(str(config["config"]), context), context)
        policy_of(context).check_run(node.cfg)
        return node, int(config["round"])

    def query(self, msg: Message, context: Context) -> Message:
        node, _ = self._node(msg, context)
        wants_labels = node.cfg.aggregator == "attention" and node.cfg.attention_score == "labels"
        if wants_labels and not policy_of(context).share_label_counts:
            raise PolicyRefusal("the run scores clients by their label counts: this node does not share them "
                                "(share-label-counts)")
        info = ConfigRecord({"client": node.client_id, "role": node.role,
                             "input_shape": list(node.input_shape), "num_classes": node.num_classes,
                             "input_dtype": str(node.data.train_x.dtype).removeprefix("torch.")})
        challenge = msg.content["config"].get("challenge")
        key_path = identity_key_path(context)
        if challenge is not None and key_path and node.role == "train":  # bind this id to this node's identity
            message = registration_message(bytes.fromhex(str(challenge)), node.client_id)
            info["proof"] = node_signing_key(key_path).sign(message).hex()
        if wants_labels:  # the run asks for them and this node's policy shares them
            info["label_counts"] = torch.bincount(node.data.train_y, minlength=node.num_classes).tolist()
        return Message(RecordDict({"info": info}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        node, rnd = self._node(msg, context)
        if node.role != "train":
            return Message(Error(code=REFUSED, reason="a held-out client never trains"), reply_to=msg)
        broadcast = from_records(msg.content["broadcast"])
        if "down" in msg.content:  # --compress-down: rebuild the params from this node's replica
            try:
                broadcast["params"] = _replica_params(node, msg, rnd)
            except ValueError as e:
                log.warning("compressed broadcast: client %d: %s", node.client_id, e)
                return Message(Error(code=REFUSED, reason=str(e)), reply_to=msg)
        program = node.algorithm.program_group(rnd, node.group)  # its group's (the one program, usually)
        policy = policy_of(context)
        # local DP: clipped and noised here, with this client's own randomness (the one client runner),
        # at least as the node's own policy says; secure aggregation: never in the clear if required
        requested = UploadTransform.from_config(dict(msg.content["upload"])) if "upload" in msg.content else None
        upload = policy.upload_stage(requested)
        policy.check_hold(bool(msg.content["config"].get("hold", False)), "secagg-key" in context.node_config)
        seed = node.cfg.seed if node.cfg.insecure_reproducible_privacy else None
        outputs, losses = run_clients(node.backend, program, broadcast, [node.task(rnd, program, broadcast)],
                                      [node.client_id], rnd, upload, seed)
        row = tree.nested_index(outputs, 0)
        node.save_state(row.get("state", {}))
        sent = upload_of(row)
        metrics = {"round": rnd, "client": node.client_id}
        hold = bool(msg.content["config"].get("hold", False))
        if not hold and not (upload is not None and upload.noise_std > 0):
            # in the clear only without local DP or secure aggregation: under local DP the exact loss,
            # count and program metrics are outside the noise; under SecAgg the protocol needs none of them
            metrics.update(loss=float(losses[0]), num_samples=float(node.data.num_train))
            metrics.update({f"metric/{k}": float(v) for k, v in row.get("metrics", {}).items()})
        if hold:  # secure aggregation: masked later, sent only masked
            hold_upload(context.state, rnd, sent)
            return Message(RecordDict({"meta": MetricRecord(metrics)}), reply_to=msg)
        if node.cfg.compress is not None:  # encode here; only the encoded bytes travel
            return Message(RecordDict({"encoded": _encode(node, sent, rnd), "meta": MetricRecord(metrics)}),
                           reply_to=msg)
        return Message(RecordDict({"upload": to_records(sent), "meta": MetricRecord(metrics)}), reply_to=msg)

    def secagg(self, msg: Message, context: Context) -> Message:
        """One stage of metafed's secure aggregation (``secagg_wire`` lists them)."""
        node, _ = self._node(msg, context)
        identity, roster = node_identity(str(context.node_config.get("secagg-key", "")),
                                         str(context.node_config.get("secagg-roster", "")))
        try:
            content = handle_stage(msg.content, context.state, node, identity, roster)
        except (StageRefused, SecAggAbort) as e:
            log.warning("secure aggregation: client %d: %s", node.client_id, e)
            return Message(Error(code=REFUSED, reason=str(e)), reply_to=msg)
        return Message(RecordDict(content), reply_to=msg)

    def receipt(self, msg: Message, context: Context) -> Message:
        """The server's signed ledger entry for this client: checked (signature, hash, that it
        is this client's, and the same server key as every earlier receipt: the first one
        pins it unless the node config names ``ledger-public-key``), then appended to
        ``receipts.jsonl`` in the node's state folder."""
        node, rnd = self._node(msg, context)
        try:
            entry = json.loads(str(msg.content["config"]["entry"]))
            key = str(msg.content["config"]["public_key"])
            keep_receipt(node.state_dir, node.client_id, rnd, entry, key,
                         str(context.node_config.get("ledger-public-key", "")) or None)
        except (ReceiptRefused, ValueError, KeyError, TypeError) as e:
            log.warning("ledger receipt: client %d: %s", node.client_id, e)
            return Message(Error(code=REFUSED, reason=f"receipt refused: {e}"), reply_to=msg)
        return Message(RecordDict({"ack": ConfigRecord({"round": rnd, "client": node.client_id})}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        node, rnd = self._node(msg, context)
        params = from_records(msg.content["params"])
        broadcast = from_records(msg.content["broadcast"])
        heldout_steps = tuple(int(k) for k in msg.content["config"].get("heldout-steps", ()))
        policy_of(context).check_evaluation(node.cfg.personalize_steps, heldout_steps if node.role == "heldout" else ())
        if node.algorithm.combines_groups:  # model groups (distillation): each client with its group's models
            scores = _score_groups(node, params, rnd, heldout_steps, msg)
        elif node.role == "heldout":
            steps = heldout_steps
            scores = evaluate_new_client(node.evaluator, params, broadcast, rnd, node.client_id, node.data, steps)
        else:
            steps = node.cfg.personalize_steps
            scores = evaluate_one_client(node.evaluator, params, broadcast, rnd, node.client_id, node.data,
                                         node.load_state(broadcast), steps, node.cfg.eval_train_loss)
        return Message(RecordDict({"scores": MetricRecord({"round": rnd, "client": node.client_id, **scores})}),
                       reply_to=msg)


def _replica_params(node: Node, msg: Message, rnd: int) -> dict:
    """The round's params from a compressed broadcast (:func:`metafed.compression.downlink.node_replica`),
    the replica kept on the node's disk for the next round."""
    from metafed.tree import flatten_messages, unflatten_like
    from metafed.compression.downlink import make_broadcast_compression, node_replica

    reference = node.algorithm.model.init_params()
    arrays = {k: torch.from_numpy(v.numpy().copy()) for k, v in msg.content["down_data"].items()}
    comp = make_broadcast_compression(node.cfg.compress_down)
    replica = node_replica(comp, reference, int(msg.content["down"]["base"]), arrays, node.load_replica(),
                           node.cfg.seed)
    node.save_replica(rnd, replica)
    _, order = flatten_messages({k: v[None] for k, v in reference.items()})
    return unflatten_like(replica.double(), order, reference)


def _encode(node: Node, sent: dict, rnd: int):
    """The client's compressed upload (``--compress``), with its error-feedback residual kept
    on the node's disk: one uint8 array holding exactly the encoder's packed bytes."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from metafed.tree import flatten_messages
    from metafed.compression import make_compression

    comp = make_compression(node.cfg.compress, node.cfg.error_feedback)
    x, _ = flatten_messages(tree.nested_map(lambda v: v[None], sent))  # [1, D] float64
    residual = node.load_residual() if comp.error_feedback else None
    blob, new_residual = comp.encode_one(x[0], residual, node.cfg.seed, rnd, node.client_id)
    if new_residual is not None:
        node.save_residual(new_residual)
    return ArrayRecord({"bytes": Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def _score_groups(node: Node, params: dict, rnd: int, heldout_steps: tuple[int, ...], msg: Message) -> dict:
    from metafed.pools.group_evaluation import score_group_client, score_group_new_client

    run = types.SimpleNamespace(algorithm=node.algorithm, backend=node.backend, cfg=node.cfg)
    if node.role == "heldout":
        num_heldout = int(round(node.cfg.num_clients * node.cfg.heldout_fraction))
        return score_group_new_client(run, params, rnd, node.client_id, num_heldout, node.data, heldout_steps)
    state = node.load_state({"group": torch.tensor(node.group)})
    return score_group_client(run, params, rnd, node.client_id, node.data, state)


def policy_of(context: Context) -> NodePolicy:
    """This node's policy, from its own node config (never from a message)."""
    return cached_policy(tuple(sorted((str(k), str(v)) for k, v in context.node_config.items())))


def _with_node_data_dir(config_json: str, context: Context) -> str:
    """The run config with this node's own data location (node config ``data-dir``, else
    $METAFED_DATA): the server does not choose where a node reads its data from."""
    values = json.loads(config_json)
    data = values.get("data") if isinstance(values, dict) else None
    own = context.node_config.get("data-dir")
    if isinstance(data, dict) and data.get("data_dir") != (None if own is None else str(own)):
        values["data"] = {**data, "data_dir": None if own is None else str(own)}
        return json.dumps(values)
    return config_json


def refusing(handler):
    """A handler whose policy refusals (and malformed node policies) are logged on the node
    and replied with their reason, never crashes."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (PolicyRefusal, NodePolicyError, StateFolderError) as e:
            log.warning("node policy: refused a %s request: %s", msg.metadata.message_type, e)
            return Message(Error(code=REFUSED, reason=f"node policy: {e}"), reply_to=msg)
    return wrapped


def make_client_app(load: Callable[[str, Context], Node] = builtin_node) -> ClientApp:
    """A Flower ClientApp running metafed's client side on the nodes ``load`` describes."""
    client = MetafedClient(load)
    app = ClientApp()
    app.query()(refusing(client.query))
    app.train()(refusing(client.train))
    app.evaluate()(refusing(client.evaluate))
    app.query("secagg")(refusing(client.secagg))
    app.query("receipt")(refusing(client.receipt))
    return app


def identity_key_path(context: Context) -> str:
    """This node's identity key: node config ``identity-key`` (binds its client id to it at
    registration), or ``secagg-key`` (the same, and secure aggregation is then required)."""
    return str(context.node_config.get("secagg-key") or context.node_config.get("identity-key") or "")


@functools.lru_cache(maxsize=2)
def node_signing_key(key_path: str):
    """This node's identity signing key (node config ``secagg-key``)."""
    return load_identity(key_path)


@functools.lru_cache(maxsize=2)
def node_identity(key_path: str, roster_path: str):
    """This node's identity signing key and the federation's roster (node config
    ``secagg-key`` and ``secagg-roster``, made by ``metafed secagg-keys``)."""
    if not key_path or not roster_path:
        raise NodeConfigError("secure aggregation needs the node config keys secagg-key and secagg-roster")
    return load_identity(key_path), load_roster(roster_path)


app = make_client_app()
_builtin = MetafedClient(builtin_node)
query, train, evaluate, secagg = (refusing(_builtin.query), refusing(_builtin.train), refusing(_builtin.evaluate),
                                  refusing(_builtin.secagg))
receipt = _builtin.receipt
