"""The Flower pool: the round loop's clients are SuperNodes reached through the ServerApp's
``Grid``. The server never holds client data or personal state; it validates every reply
against what it broadcast (keys, shapes, dtypes, finite values, size, round, sender) and
drops a bad one with its reason, so a rogue ClientApp cannot crash the round loop."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import numpy as np
import torch

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram
from metafed.backends.base import ClientTask
from metafed.backends.loop import LoopBackend
from metafed.client_store import ClientStore
from metafed.config import RunConfig
from metafed.tree import flatten_messages, unflatten_like
from metafed.compression import make_compression
from metafed.compression.downlink import REPLICA_OUT_OF_SYNC
from metafed.deploy.secagg_wire import bound_session, read_reply, round_setup, stage_request, sum_layout
from metafed.deploy.wire import BadReply, finite_number, from_records, layout, to_records
from metafed.eval import (HELDOUT_ADAPT_STEPS, combine_client_evaluations, combine_new_client_evaluations,
                          evaluation_sample)
from metafed.pools.base import RoundReplies, zero_rows
from metafed.pools.simulation import secagg_config
from metafed.privacy.secagg.codec import MalformedMessage
from metafed.privacy.upload import UploadTransform, finish_upload

log = logging.getLogger("metafed.deploy")
PULL_INTERVAL_MIN, PULL_INTERVAL_MAX = 0.005, 0.05  # seconds between pulls of replies (backing off)


class FlowerPool:
    def __init__(self, grid, cfg: RunConfig, num_nodes: int, connect_timeout: float = 60.0,
                 round_timeout: float = 300.0, roster: dict[int, bytes] | None = None):
        self.grid, self.cfg, self.round_timeout = grid, cfg, round_timeout
        if cfg.secure_aggregation:
            missing = sorted(set(range(cfg.num_clients)) - set(roster or {}))
            if missing:
                raise ValueError(f"secure aggregation needs every client's identity on the roster; clients "
                                 f"{missing[:10]} have none (make the roster with metafed secagg-keys)")
        self.roster = dict(roster or {})
        self.config_json = cfg.model_dump_json()
        # replies that carry no exact loss or sample count (the nodes keep them): local DP, SecAgg
        self._private_replies = cfg.dp == "local" or cfg.secure_aggregation
        self.clients = ClientStore()  # stays empty: personal states live on the nodes' disks
        self.algorithm: FederatedAlgorithm | None = None  # set by the round loop's builder
        self.compression = make_compression(cfg.compress, cfg.error_feedback)  # uploads arrive encoded
        self._layouts: dict[LocalProgram, dict] = {}
        self._resync: set[int] = set()  # clients whose model replica was lost: send them the dense one
        self._register(num_nodes, connect_timeout)

    # ------------------------------------------------------------------ set-up
    def _config(self, rnd: int):
        from flwr.app import ConfigRecord

        return ConfigRecord({"config": self.config_json, "round": rnd})

    def _send(self, messages: list, timeout: float) -> list:
        """Push ``messages`` and pull their replies until all arrived or ``timeout`` s passed.
        Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls; this pulls every few ms,
        backing off to :data:`PULL_INTERVAL_MAX` while nothing arrives."""
        return self._pull(self.grid.push_messages(messages), time.monotonic() + timeout)

    def _pull(self, message_ids, deadline: float, wanted: int | None = None) -> list:
        """Replies to ``message_ids`` (all, or the first ``wanted``) that arrive by ``deadline``."""
        pending = dict.fromkeys(m for m in message_ids if m)  # ordered: asked in the order pushed
        replies: list = []
        wait = PULL_INTERVAL_MIN
        while pending and time.monotonic() < deadline and (wanted is None or len(replies) < wanted):
            got = list(self.grid.pull_messages(list(pending)))
            for r in got:
                pending.pop(r.metadata.reply_to_message_id, None)
            replies += got
            if got:
                wait = PULL_INTERVAL_MIN
            elif pending:
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(PULL_INTERVAL_MAX, wait * 2)
        return replies

    def _register(self, num_nodes: int, timeout: float) -> None:
        """Ask each SuperNode which client (data partition) it holds, until ``num_nodes``
        nodes have answered. Each node is asked once, as soon as it is connected, and waited
        for until ``timeout`` (a cold node may take long to answer; a second query would only
        queue behind the first); starting with fewer would silently train another federation
        than the one configured, so it is an error.

        With a roster (the operators' identities, ``metafed secagg-keys``), a training client's
        id is bound to its identity: the node signs the registration's fresh challenge and its
        id with its identity key, and a claim that does not verify is refused and logged, so
        no node can take another's id. Without one, ids are first come, first served, and a
        second claim is refused. A node whose data shape dissents from the majority is left
        out with a log line; it cannot stop the run."""
        from flwr.app import ConfigRecord, Message, RecordDict

        deadline = time.monotonic() + timeout
        self.node_of: dict[int, int] = {}  # training client -> node
        self.heldout_node_of: dict[int, int] = {}  # held-out client index -> node
        n_heldout = int(round(self.cfg.num_clients * self.cfg.heldout_fraction))
        self._num_clients = self.cfg.num_clients - n_heldout
        shapes: dict[int, tuple] = {}  # node -> its data's (input shape, classes, dtype)
        answered: set[int] = set()
        self._challenge = os.urandom(16)
        query = ConfigRecord({"config": self.config_json, "round": 0, "challenge": self._challenge.hex()})
        self._label_counts: dict[int, list[int]] = {}  # only when the run's attention score needs them
        asked: dict[str, int] = {}  # pending query -> its node: each node is asked once, and waited for
        next_look = 0.0
        while len(answered) < num_nodes and time.monotonic() < deadline:
            if time.monotonic() >= next_look:  # nodes that connected since: ask them
                new = [n for n in self.grid.get_node_ids() if n not in answered and n not in asked.values()]
                messages = [Message(RecordDict({"config": query}), n, "query") for n in new]
                asked.update(zip(self.grid.push_messages(messages), new))
                next_look = time.monotonic() + 0.5
            for r in self._pull(list(asked), min(deadline, next_look)):
                asked.pop(r.metadata.reply_to_message_id, None)
                answered.add(r.metadata.src_node_id)
                self._read_registration(r, n_heldout, shapes)
            if not asked:
                time.sleep(max(0.0, min(deadline, next_look) - time.monotonic()))
        if len(answered) < num_nodes:
            raise RuntimeError(f"only {len(answered)} of the {num_nodes} SuperNodes the run waits for (num-nodes) "
                               f"answered within {timeout:g} s (connect-timeout): check that they are running and "
                               "reach the SuperLink, or start the run with a smaller num-nodes")
        self._keep_majority_shape(shapes)
        if not self.node_of:
            raise RuntimeError(f"no usable SuperNodes registered ({len(answered)} answered)")
        log.info("registered %d SuperNodes: %d training clients, %d held-out clients", len(answered),
                 len(self.node_of), len(self.heldout_node_of))
        self.client_of = {n: c for c, n in self.node_of.items()}
        self.heldout_of = {n: c for c, n in self.heldout_node_of.items()}
        missing = sorted(set(range(self._num_clients)) - set(self.node_of))
        if missing:
            log.warning("clients %s have no SuperNode: they never reply", missing[:10])
        if len(self.heldout_node_of) < n_heldout:
            log.warning("%d of %d held-out clients have a SuperNode", len(self.heldout_node_of), n_heldout)

    def _keep_majority_shape(self, shapes: dict[int, tuple]) -> None:
        """The data shape most nodes registered with is the federation's; a node with another
        is left out (logged), so one dissenting node cannot stop the run."""
        if not shapes:
            return
        counts: dict[tuple, int] = {}
        for shape in shapes.values():
            counts[shape] = counts.get(shape, 0) + 1
        best = max(counts.values())
        chosen = sorted(shape for shape, n in counts.items() if n == best)[0]
        (self.input_shape, self.num_classes, self.input_dtype) = chosen
        for table in (self.node_of, self.heldout_node_of):
            for cid, node in list(table.items()):
                if shapes[node] != chosen:
                    log.warning("registration: leaving out node %s (client %d): its data %s differs from the "
                                "federation's %s", node, cid, shapes[node], chosen)
                    del table[cid]
        self._label_counts = {c: v for c, v in self._label_counts.items() if c in self.node_of}

    def _read_registration(self, r, n_heldout: int, shapes: dict) -> None:
        """Record one node's registration reply (its client id, role and data shape), or log
        why it is ignored."""
        try:
            if r.has_error():
                raise BadReply(f"error from the node: {r.error.reason}")
            info = r.content["info"]
            cid, role = int(info["client"]), str(info.get("role", "train"))
            table, size = (self.node_of, self._num_clients) if role == "train" else \
                (self.heldout_node_of, n_heldout) if role == "heldout" else (None, 0)
            if table is None or not 0 <= cid < size:
                raise BadReply(f"{role} client id {cid} is out of range")
            if cid in table:
                raise BadReply(f"{role} client id {cid} is claimed a second time (first by node {table[cid]}): refused")
            if self.roster and role == "train":
                self._check_claim(cid, info)
            dtype = str(info.get("input_dtype", "float32"))
            if dtype not in ("float32", "int64"):
                raise BadReply(f"input dtype {dtype!r}")
            shape = (tuple(int(d) for d in info["input_shape"]), int(info["num_classes"]), dtype)
            if "label_counts" in info and role == "train":
                counts = [int(c) for c in info["label_counts"]]
                if len(counts) != int(info["num_classes"]) or min(counts) < 0:
                    raise BadReply(f"label_counts must hold {info['num_classes']} non-negative counts")
                self._label_counts[cid] = counts
            table[cid] = r.metadata.src_node_id
            shapes[r.metadata.src_node_id] = shape
        except (BadReply, KeyError, TypeError, ValueError) as e:
            log.warning("registration: ignoring node %s: %s", r.metadata.src_node_id, e)

    def _check_claim(self, cid: int, info) -> None:
        """A training client's claim must be signed by that client's identity on the roster."""
        from metafed.deploy.identity import registration_message
        from metafed.privacy.secagg import crypto

        if cid not in self.roster:
            raise BadReply(f"client {cid} has no identity on the roster")
        try:
            proof = bytes.fromhex(str(info["proof"]))
        except (KeyError, ValueError):
            raise BadReply(f"client {cid}'s claim carries no signature (the node holds no identity key)") from None
        if not crypto.verify(self.roster[cid], proof, registration_message(self._challenge, cid)):
            raise BadReply(f"the claim of client {cid} is not signed by its identity on the roster: refused")

    @property
    def num_clients(self) -> int:
        """Training clients (held-out ones never train)."""
        return self._num_clients

    def label_counts(self, ids: list[int]) -> torch.Tensor:
        missing = [c for c in ids if c not in self._label_counts]
        if missing:
            raise RuntimeError(f"clients {missing[:10]} sent no label counts at registration")
        return torch.tensor([self._label_counts[c] for c in ids])

    # ------------------------------------------------------------------ rounds
    def message_template(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        """Zero-row outputs with the shapes a client uploads: one dry step on zero data."""
        dtype = torch.long if self.input_dtype == "int64" else torch.float32
        n = self.cfg.batch_size * program.batches_per_step  # one step's samples
        x = torch.zeros((n, *self.input_shape), dtype=dtype)
        y = torch.zeros(n, dtype=torch.long)
        sched = np.arange(n).reshape(1, program.batches_per_step, -1)
        inputs = {"state": self.algorithm.client_init(broadcast), "num_samples": torch.tensor(1.0)}
        out, _ = LoopBackend().run(program, broadcast, [ClientTask(x, y, sched, 1, inputs)])
        return zero_rows(out)

    def _expected_upload(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        """flat key -> (shape, dtype) of one client's upload; one dry run per distinct program
        (programs are frozen dataclasses: equal hyperparameters, equal program)."""
        if program not in self._layouts:
            template = self.message_template(rnd, program, broadcast)
            self._layouts[program] = {k: (shape[1:], dtype) for k, (shape, dtype) in layout(template).items()}
        return self._layouts[program]

    def train(self, rnd: int, cohort: np.ndarray, program: LocalProgram, broadcast: dict,
              upload: UploadTransform | None = None, downlink=None) -> RoundReplies:
        """Ask the cohort to train. With ``upload`` (local DP) each client clips and noises
        before replying. Under secure aggregation each client keeps its upload until
        :meth:`secure_sum` masks it: the replies carry metadata only. With ``downlink``
        (``--compress-down``) each client gets the payloads it missed, or the dense replica,
        instead of the params."""
        from flwr.app import Message, RecordDict

        expected = self._expected_upload(rnd, program, broadcast)
        self._round_upload = expected
        hold = self.cfg.secure_aggregation
        shared = {k: v for k, v in broadcast.items() if k != "params"} if downlink is not None else broadcast
        content = self._train_content(rnd, shared, upload)
        asked = [int(c) for c in cohort if int(c) in self.node_of]

        def content_for(cid: int) -> RecordDict:
            if downlink is None:
                return RecordDict(content)
            return RecordDict({**content, **self._downlink_records(downlink, cid, broadcast["params"])})

        replies = self._send([Message(content_for(c), self.node_of[c], "train") for c in asked], self.round_timeout)
        for r in replies:  # a node that lost its replica says so: it gets the dense one next time
            if r.has_error() and REPLICA_OUT_OF_SYNC in r.error.reason and _src(r) in self.client_of:
                self._resync.add(self.client_of[_src(r)])
        got: dict[int, tuple[dict, float, float, dict]] = {}
        for r in replies:
            try:
                cid, sent, loss, n, metrics = self._check_train_reply(r, rnd, None if hold else expected)
                if cid not in asked or cid in got:
                    raise BadReply(f"client {cid} was not asked this round, or replied twice")
                got[cid] = (sent, loss, n, metrics)
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("round %d: rejected a reply from node %s: %s", rnd, _src(r), e)
        ids = [c for c in asked if c in got]  # cohort order, as the simulation
        if len(ids) < len(asked):
            log.warning("round %d: %d of %d clients replied in time; without a valid reply: %s", rnd, len(ids),
                        len(asked), [c for c in asked if c not in got][:10])
        if not ids:
            return RoundReplies.empty()
        outputs = {} if hold else tree.nested_stack([got[c][0] for c in ids])
        metric_keys = set.intersection(*(set(got[c][3]) for c in ids))
        if metric_keys:
            outputs["metrics"] = {k: torch.tensor([got[c][3][k] for c in ids]) for k in sorted(metric_keys)}
        return RoundReplies(ids, outputs, torch.tensor([got[c][1] for c in ids]),
                            torch.tensor([got[c][2] for c in ids], dtype=torch.float64))

    def _train_content(self, rnd: int, broadcast: dict, upload: UploadTransform | None = None) -> dict:
        from flwr.app import ConfigRecord

        content = {"config": ConfigRecord({"config": self.config_json, "round": rnd,
                                           "hold": self.cfg.secure_aggregation}),
                   "broadcast": to_records(broadcast)}
        if upload is not None:
            content["upload"] = ConfigRecord(upload.to_config())
        return content

    # ------------------------------------------------------------------ asynchronous jobs (--mode async)
    def push_train(self, rnd: int, cid: int, broadcast: dict) -> str:
        """Send client ``cid`` one training job (``rnd`` seeds its batch order and is echoed
        back) without waiting; returns the message id its reply will answer."""
        from flwr.app import Message, RecordDict

        if cid not in self.node_of:
            raise KeyError(f"client {cid} has no SuperNode")
        msg = Message(RecordDict(self._train_content(rnd, broadcast)), self.node_of[cid], "train")
        (mid,) = self.grid.push_messages([msg])
        return mid

    def pull_train(self, pending: dict, program: LocalProgram, broadcast: dict, timeout: float) -> list:
        """Wait up to ``timeout`` s for replies to ``pending`` (message id -> (client, round));
        returns [(message id, client, upload or None, loss, samples)] for those that arrived,
        None where a reply was refused (logged with why)."""
        out = []
        for r in self._pull(list(pending), time.monotonic() + timeout, wanted=1):
            mid = r.metadata.reply_to_message_id
            if mid not in pending:
                continue
            cid, rnd = pending[mid]
            try:
                got, sent, loss, n, _ = self._check_train_reply(r, rnd, self._expected_upload(rnd, program, broadcast))
                if got != cid:
                    raise BadReply(f"client {got} answered a job sent to client {cid}")
                out.append((mid, cid, sent, loss, n))
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("async job of client %d: rejected the reply of node %s: %s", cid, _src(r), e)
                out.append((mid, cid, None, float("nan"), 0.0))
        return out

    def _downlink_records(self, downlink, cid: int, params: dict) -> dict:
        """One client's compressed broadcast: {"down": base round, "down_data": the packed
        payloads of rounds base+1..t as uint8 arrays p0, p1, ...}, or base 0 and the dense
        replica [D] (float32) when it never synced, lags too far or lost its replica."""
        from flwr.app import Array, ArrayRecord, ConfigRecord

        changes = None if cid in self._resync else downlink.changes_for(cid)
        self._resync.discard(cid)
        if changes is None:
            flat, _ = flatten_messages({k: v[None] for k, v in params.items()})
            data = {"replica": Array(flat[0].float().numpy())}
            base = 0
        else:
            base, blobs = changes
            data = {f"p{i}": Array(np.frombuffer(b, dtype=np.uint8).copy()) for i, b in enumerate(blobs)}
        return {"down": ConfigRecord({"base": base}), "down_data": ArrayRecord(data)}

    def _check_train_reply(self, r, rnd: int, expected: dict):
        if r.has_error():
            raise BadReply(f"error from the node: {r.error.reason}")
        meta = r.content["meta"]
        if int(meta["round"]) != rnd:
            raise BadReply(f"reply for round {meta['round']}, expected {rnd}")
        cid = int(meta["client"])
        if self.client_of.get(_src(r)) != cid:
            raise BadReply(f"node {_src(r)} answers for client {cid}, which it did not register as")
        if "loss" in meta or not self._private_replies:
            loss = finite_number(meta["loss"], "loss")
            n = finite_number(meta["num_samples"], "num_samples", 1.0)
        else:  # local DP or secure aggregation: the node keeps its exact loss and count to itself
            loss, n = float("nan"), 1.0
        if expected is None:
            upload = {}
        elif self.compression is not None:
            upload, encoded_bytes = self._decode(r.content["encoded"], expected, rnd)
        else:
            upload = from_records(r.content["upload"], expected)
        metrics = {k.removeprefix("metric/"): finite_number(v, k) for k, v in meta.items() if k.startswith("metric/")}
        if expected is not None and self.compression is not None:
            metrics["upload_bytes"] = float(encoded_bytes)  # what travelled: bytes_up counts it
        return cid, upload, loss, n, metrics

    def _decode(self, record, expected: dict, rnd: int) -> tuple[dict, int]:
        """A compressed reply: exactly the encoder's byte count, decoded to the upload's
        layout (``expected``, flat key -> (shape, dtype)). Returns (upload, bytes received)."""
        from flwr.app import ArrayRecord

        items = dict(record.items()) if isinstance(record, ArrayRecord) else {}
        if set(items) != {"bytes"}:
            raise BadReply("a compressed reply carries one array, 'bytes'")
        blob = items["bytes"].numpy()
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise BadReply(f"encoded upload must be a uint8 vector, got {blob.dtype} {blob.shape}")
        order = [(k, torch.Size(expected[k][0])) for k in sorted(expected)]  # flatten_messages' layout
        try:
            x = self.compression.decode_one(blob.tobytes(), sum(s.numel() for _, s in order), self.cfg.seed, rnd)
        except ValueError as e:
            raise BadReply(f"encoded upload: {e}") from None
        dtypes = tree.nested_unflatten({k: torch.empty(0, dtype=dtype) for k, (_, dtype) in expected.items()})
        return unflatten_like(x, order, dtypes), len(blob)

    # ------------------------------------------------------------------ secure aggregation
    def secure_sum(self, rnd: int, run_id: bytes, cohort: list[int], ids: list[int], rows, transform: UploadTransform,
                   weighting: str | None) -> tuple[dict, list[int]]:
        """metafed's SecAgg(+) between the ClientApps, relayed here: the clients finish,
        encode and mask the uploads they hold; this server sees masked vectors and the sum.
        A node that stops answering at any stage is a dropout; a reply that does not decode
        or comes from the wrong node is dropped with its reason. Returns (sum, survivors)."""
        from flwr.app import Message, RecordDict

        from metafed.privacy.secagg import FixedPoint, SecAggServer
        from metafed.privacy.secagg.simulate import run_protocol

        cfg = self.cfg
        config = secagg_config(cfg, len(cohort))
        fixed = FixedPoint(cfg.secagg_range, cfg.secagg_bits)
        fixed.check_capacity(len(cohort))
        template = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in self._round_upload.items()}
        template = finish_upload(tree.nested_unflatten(template), replace(transform, weight=1.0)
                                 if weighting else transform)
        layout, length = sum_layout(template)
        setup = round_setup(cohort, config.threshold, config.neighbours, fixed.value_range, fixed.bits,
                            transform.to_config(), weighting)
        server = SecAggServer(config, length, {c: self.roster[c] for c in cohort},
                              bound_session(run_id, rnd, self.config_json, setup))

        def ask(stage: str, requests: dict) -> dict:
            targets = [c for c in sorted(requests) if c in self.node_of]
            messages = [Message(RecordDict(stage_request(stage, rnd, run_id, self.config_json,
                                                         setup if stage == "advertise" else requests[c])),
                                self.node_of[c], "query.secagg") for c in targets]
            out = {}
            for r in self._send(messages, self.round_timeout):
                try:
                    if r.has_error():
                        raise BadReply(f"refused: {r.error.reason}")
                    cid = self.client_of.get(_src(r))
                    message = read_reply(r, stage, length)
                    if cid not in requests or getattr(message, "client", None) != cid or cid in out:
                        raise BadReply("a reply from a node that was not asked, for another client, or twice")
                    out[cid] = message
                except (BadReply, MalformedMessage, KeyError, TypeError, ValueError) as e:
                    log.warning("round %d secure aggregation %s: dropped node %s: %s", rnd, stage, _src(r), e)
            log.info("round %d secure aggregation %s: %d of %d clients answered", rnd, stage, len(out), len(targets))
            return out

        lists, total = run_protocol(server, ask, list(ids))
        decoded = fixed.decode_sum(total, len(lists.survivors))
        return unflatten_like(torch.from_numpy(decoded), layout, template), list(lists.survivors)

    def async_clients(self):
        """``--mode async``: jobs pushed to the SuperNodes, replies consumed as they arrive."""
        from metafed.deploy.async_arrivals import RealArrivals

        return RealArrivals(self)

    def _expected_scores(self) -> set[str]:
        """The keys a training client's evaluation reply carries: the global and personalized
        counts and (with eval_train_loss) the train pass; model groups bring no train pass,
        and no global model for FedMD and FD."""
        if self.algorithm.combines_groups:
            return _KEYS - _TRAIN_KEYS - (set() if self.algorithm.has_global_model else _GLOBAL_KEYS)
        return _KEYS if self.cfg.eval_train_loss else _KEYS - _TRAIN_KEYS

    def keep_states(self, ids: list[int], states: dict, accepted) -> None:
        """Nodes keep their own personal state."""

    def deliver_receipts(self, rnd: int, entries: list[dict], public_key: str) -> None:
        """Send each client its signed ledger entry of round ``rnd`` (metafed.incentive.ledger);
        the node checks the signature and keeps it. A node that does not acknowledge is logged:
        the ledger itself is already committed on the server."""
        import json

        from flwr.app import ConfigRecord, Message, RecordDict

        messages = []
        for entry in entries:
            if entry["client"] in self.node_of:
                record = ConfigRecord({"config": self.config_json, "round": rnd, "entry": json.dumps(entry),
                                       "public_key": public_key})
                messages.append(Message(RecordDict({"config": record}), self.node_of[entry["client"]],
                                        "query.receipt"))
        acked = 0
        for r in self._send(messages, self.round_timeout):
            if r.has_error():
                log.warning("round %d: node %s refused its ledger receipt: %s", rnd, _src(r), r.error.reason)
            else:
                acked += 1
        if acked < len(messages):
            log.warning("round %d: %d of %d clients acknowledged their ledger receipts", rnd, acked, len(messages))

    # ------------------------------------------------------------------ federated evaluation
    def evaluate(self, rnd: int, state) -> tuple[dict, dict]:
        """Federated evaluation: training clients score the global and their personalized
        model on their own test data; held-out clients score new-client accuracy after k
        adaptation steps. All reply counts; the server combines them. Returns (metrics, the
        per-client accuracies of clients.csv and the per-client plots, as the simulation's)."""
        params, broadcast = self.algorithm.global_params(state), self.algorithm.broadcast(state, rnd)
        from flwr.app import ConfigRecord, Message, RecordDict

        config = ConfigRecord({"config": self.config_json, "round": rnd, "heldout-steps": list(HELDOUT_ADAPT_STEPS)})
        content = RecordDict({"config": config, "params": to_records(params), "broadcast": to_records(broadcast)})
        sample = evaluation_sample(self._num_clients, self.cfg.eval_clients, self.cfg.seed)
        groups = self.algorithm.combines_groups  # distillation: per-group models (no train loss pass)
        no_newcomers = groups and not self.algorithm.has_global_model  # FedMD, FD: no model for a newcomer
        nodes = [self.node_of[c] for c in sample if c in self.node_of] + \
            ([] if no_newcomers else list(self.heldout_node_of.values()))
        replies = self._send([Message(content, n, "evaluate") for n in nodes], self.round_timeout)
        rows, new = {}, {}
        for r in replies:
            try:
                if r.has_error():
                    raise BadReply(f"error from the node: {r.error.reason}")
                scores = dict(r.content["scores"])
                cid, heldout = int(scores.pop("client")), _src(r) in self.heldout_of
                table, known = (new, self.heldout_of) if heldout else (rows, self.client_of)
                if known.get(_src(r)) != cid or int(scores.pop("round")) != rnd or cid in table:
                    raise BadReply("scores from the wrong node or round, or sent twice")
                row = {k: finite_number(v, k, 0.0) for k, v in scores.items()}
                expected = _NEW_KEYS if heldout else self._expected_scores()
                if set(row) != expected or row["test_count"] < 1 or \
                        any(row[k] > row["test_count"] for k in row if k.endswith("_correct")):
                    raise BadReply("scores with missing or extra keys, no test samples, or more correct than total")
                table[cid] = row
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("evaluation round %d: rejected scores from node %s: %s", rnd, _src(r), e)
        if not rows:
            return {}, {}
        metrics = {**combine_client_evaluations([rows[c] for c in sorted(rows)]), "clients_evaluated": len(rows)}
        if new:
            metrics.update(combine_new_client_evaluations([new[c] for c in sorted(new)], HELDOUT_ADAPT_STEPS))
        return metrics, per_client_scores(rows, new)


def per_client_scores(rows: dict[int, dict], new: dict[int, dict]) -> dict[str, list]:
    """Each evaluated client's accuracies from its reply's counts, named by client id (the
    layout of the simulation's per-client lists: ``clients.csv`` and the per-client plots)."""
    ids = sorted(rows)
    out: dict[str, list] = {}
    for prefix in ("global", "personalized"):
        if all(f"{prefix}_correct" in rows[c] for c in ids):
            out[prefix] = [rows[c][f"{prefix}_correct"] / rows[c]["test_count"] for c in ids]
    if "personalized" in out:
        out["client"] = [str(c) for c in ids]
    if new:
        out["new_client"] = [f"new-{j}" for j in sorted(new)]
        for k in HELDOUT_ADAPT_STEPS:
            out[f"new_client_k{k}"] = [new[j][f"new_k{k}_correct"] / new[j]["test_count"] for j in sorted(new)]
    return out


_GLOBAL_KEYS = {"global_correct", "global_loss_sum"}
_KEYS = {"global_correct", "global_loss_sum", "test_count", "train_loss_sum", "train_count", "personalized_correct",
         "personalized_loss_sum"}
_TRAIN_KEYS = {"train_loss_sum", "train_count"}
_NEW_KEYS = {"test_count", *(f"new_k{k}_correct" for k in HELDOUT_ADAPT_STEPS)}


def _src(message) -> int | None:
    try:
        return message.metadata.src_node_id
    except AttributeError:
        return None
