"""The Flower pool: the round loop's clients are SuperNodes reached through the ServerApp's
``Grid``. The server never holds client data or personal state; it validates every reply
against what it broadcast (keys, shapes, dtypes, finite values, size, round, sender) and
drops a bad one with its reason, so a rogue ClientApp cannot crash the round loop."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram
from metafed.backends.base import ClientTask
from metafed.backends.loop import LoopBackend
from metafed.client_store import ClientStore
from metafed.config import RunConfig
from metafed.deploy.wire import BadReply, finite_number, from_records, layout, to_records
from metafed.eval import combine_client_evaluations
from metafed.pools.base import RoundReplies, zero_rows

log = logging.getLogger("metafed.deploy")


class FlowerPool:
    def __init__(self, grid, cfg: RunConfig, num_nodes: int, connect_timeout: float = 60.0,
                 round_timeout: float = 300.0):
        self.grid, self.cfg, self.round_timeout = grid, cfg, round_timeout
        self.config_json = cfg.model_dump_json()
        self.clients = ClientStore()  # stays empty: personal states live on the nodes' disks
        self.algorithm: FederatedAlgorithm | None = None  # set by the round loop's builder
        self._layouts: dict[LocalProgram, dict] = {}
        self._register(num_nodes, connect_timeout)

    # ------------------------------------------------------------------ set-up
    def _config(self, rnd: int):
        from flwr.app import ConfigRecord

        return ConfigRecord({"config": self.config_json, "round": rnd})

    def _send(self, messages: list, timeout: float) -> list:
        return list(self.grid.send_and_receive(messages, timeout=timeout))

    def _register(self, num_nodes: int, timeout: float) -> None:
        """Wait for the SuperNodes, then ask each which client (data partition) it holds."""
        from flwr.app import Message, RecordDict

        deadline = time.monotonic() + timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < num_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        replies = self._send([Message(RecordDict({"config": self._config(0)}), n, "query") for n in nodes], timeout)
        self.node_of: dict[int, int] = {}
        shapes = set()
        for r in replies:
            try:
                if r.has_error():
                    raise BadReply(f"error from the node: {r.error.reason}")
                info = r.content["info"]
                cid = int(info["client"])
                if not 0 <= cid < self.cfg.num_clients or cid in self.node_of:
                    raise BadReply(f"client id {cid} is out of range or claimed twice")
                self.node_of[cid] = r.metadata.src_node_id
                shapes.add((tuple(int(d) for d in info["input_shape"]), int(info["num_classes"])))
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("registration: ignoring node %s: %s", r.metadata.src_node_id, e)
        if not self.node_of or len(shapes) != 1:
            raise RuntimeError(f"no usable SuperNodes registered ({len(nodes)} connected, data shapes {shapes})")
        self.client_of = {n: c for c, n in self.node_of.items()}
        (self.input_shape, self.num_classes), = shapes
        missing = sorted(set(range(self.cfg.num_clients)) - set(self.node_of))
        if missing:
            log.warning("clients %s have no SuperNode: they never reply", missing[:10])

    @property
    def num_clients(self) -> int:
        return self.cfg.num_clients

    # ------------------------------------------------------------------ rounds
    def message_template(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        """Zero-row outputs with the shapes a client uploads: one dry step on zero data."""
        dtype = torch.long if self.cfg.dataset == "shakespeare" else torch.float32
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

    def train(self, rnd: int, cohort: np.ndarray, program: LocalProgram, broadcast: dict) -> RoundReplies:
        from flwr.app import Message, RecordDict

        expected = self._expected_upload(rnd, program, broadcast)
        content = {"config": self._config(rnd), "broadcast": to_records(broadcast)}
        asked = [int(c) for c in cohort if int(c) in self.node_of]
        replies = self._send([Message(RecordDict(content), self.node_of[c], "train") for c in asked], self.round_timeout)
        got: dict[int, tuple[dict, float, float, dict]] = {}
        for r in replies:
            try:
                cid, upload, loss, n, metrics = self._check_train_reply(r, rnd, expected)
                if cid not in asked or cid in got:
                    raise BadReply(f"client {cid} was not asked this round, or replied twice")
                got[cid] = (upload, loss, n, metrics)
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("round %d: rejected a reply from node %s: %s", rnd, _src(r), e)
        ids = [c for c in asked if c in got]  # cohort order, as the simulation
        if not ids:
            return RoundReplies.empty()
        outputs = tree.nested_stack([got[c][0] for c in ids])
        metric_keys = set.intersection(*(set(got[c][3]) for c in ids))
        if metric_keys:
            outputs["metrics"] = {k: torch.tensor([got[c][3][k] for c in ids]) for k in sorted(metric_keys)}
        return RoundReplies(ids, outputs, torch.tensor([got[c][1] for c in ids]),
                            torch.tensor([got[c][2] for c in ids], dtype=torch.float64))

    def _check_train_reply(self, r, rnd: int, expected: dict):
        if r.has_error():
            raise BadReply(f"error from the node: {r.error.reason}")
        meta = r.content["meta"]
        if int(meta["round"]) != rnd:
            raise BadReply(f"reply for round {meta['round']}, expected {rnd}")
        cid = int(meta["client"])
        if self.client_of.get(_src(r)) != cid:
            raise BadReply(f"node {_src(r)} answers for client {cid}, which it did not register as")
        loss = finite_number(meta["loss"], "loss")
        n = finite_number(meta["num_samples"], "num_samples", 1.0)
        upload = from_records(r.content["upload"], expected)
        metrics = {k.removeprefix("metric/"): finite_number(v, k) for k, v in meta.items() if k.startswith("metric/")}
        return cid, upload, loss, n, metrics

    def keep_states(self, ids: list[int], states: dict, accepted) -> None:
        """Nodes keep their own personal state."""

    # ------------------------------------------------------------------ federated evaluation
    def evaluate(self, rnd: int, params: dict, broadcast: dict) -> dict:
        from flwr.app import Message, RecordDict

        content = {"config": self._config(rnd), "params": to_records(params), "broadcast": to_records(broadcast)}
        replies = self._send([Message(RecordDict(content), n, "evaluate") for n in self.node_of.values()],
                             self.round_timeout)
        rows = {}
        for r in replies:
            try:
                if r.has_error():
                    raise BadReply(f"error from the node: {r.error.reason}")
                scores = dict(r.content["scores"])
                cid = int(scores.pop("client"))
                if self.client_of.get(_src(r)) != cid or int(scores.pop("round")) != rnd or cid in rows:
                    raise BadReply("scores from the wrong node or round, or sent twice")
                row = {k: finite_number(v, k, 0.0) for k, v in scores.items()}
                if row["test_count"] < 1:
                    raise BadReply("no test samples")
                rows[cid] = row
            except (BadReply, KeyError, TypeError, ValueError) as e:
                log.warning("evaluation round %d: rejected scores from node %s: %s", rnd, _src(r), e)
        if not rows:
            return {}
        return {**combine_client_evaluations([rows[c] for c in sorted(rows)]), "clients_evaluated": len(rows)}


def _src(message) -> int | None:
    try:
        return message.metadata.src_node_id
    except AttributeError:
        return None
