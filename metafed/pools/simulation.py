"""The simulation pool: every client is simulated in this process, on a backend (loop or
vectorized) over a ``FederatedDataset``. Simulated failures live here: ``dropout`` (sampled
clients that never reply) and ``stragglers`` (partial work, dropped or kept by policy)."""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram, ServerState
from metafed.backends.base import Backend, ClientTask
from metafed.client.reply import upload_of
from metafed.client.runner import run_clients
from metafed.client.task import LocalWork, make_task
from metafed.client_store import ClientStore
from metafed.compression import RESIDUAL, UploadCompression
from metafed.data.federated import FederatedDataset
from metafed.data.schedule import straggler_steps
from metafed.eval import HELDOUT_ADAPT_STEPS, Evaluator, evaluation_sample
from metafed.pools.base import RoundReplies, zero_rows
from metafed.pools.group_evaluation import evaluate_groups
from metafed.pools.virtual_clock import VirtualClock
from metafed.privacy.upload import UploadTransform, finish_upload, own_weight

if TYPE_CHECKING:
    from metafed.config import RunConfig


def secagg_config(cfg: RunConfig, cohort_size: int):
    """SecAgg(+) parameters of a round: threshold t (default: a majority of the cohort) and k."""
    from metafed.privacy.secagg import SecAggConfig

    return SecAggConfig(cfg.secagg_threshold or cohort_size // 2 + 1, cfg.secagg_neighbours)


@dataclass
class SimulationPool:
    cfg: RunConfig
    dataset: FederatedDataset
    algorithm: FederatedAlgorithm
    backend: Backend
    clients: ClientStore = field(default_factory=ClientStore)
    compression: UploadCompression | None = None
    _identities: dict = field(default_factory=dict, repr=False)  # client -> (signing key, public key)
    _pending_residuals: dict = field(default_factory=dict, repr=False)  # client -> residual, kept if accepted

    @property
    def num_clients(self) -> int:
        return self.dataset.num_clients

    def train(self, rnd: int, cohort: np.ndarray, program: LocalProgram, broadcast: dict,
              upload: UploadTransform | None = None, downlink=None) -> RoundReplies:
        """``downlink`` (``--compress-down``): simulated clients train from the replica in
        ``broadcast`` directly, the same numbers a deployed node rebuilds from the payloads."""
        cfg = self.cfg
        n_gone = int(round(cfg.dropout * len(cohort)))
        gone = set(np.random.default_rng([cfg.seed, 8, rnd]).choice(cohort, n_gone, replace=False).tolist())
        rng = np.random.default_rng([cfg.seed, 4, rnd])
        n_slow = int(round(cfg.stragglers * len(cohort)))
        slow = set(rng.choice(cohort, n_slow, replace=False).tolist()) if n_slow else set()
        policy = cfg.straggler_policy or self.algorithm.straggler_policy
        work = LocalWork.of_round(cfg, self.algorithm, rnd)  # once per round, not per client
        ids, tasks = [], []
        for cid in cohort.tolist():
            if cid in gone or (cid in slow and policy == "drop"):
                continue
            task = self.task(cid, rnd, program, broadcast, work)
            if cid in slow:
                task = replace(task, active_steps=straggler_steps(len(task.schedule), work.epochs,
                                                                  work.steps is not None, rng))
            ids.append(cid)
            tasks.append(task)
        if not tasks:
            return RoundReplies.empty()
        seed = cfg.seed if cfg.insecure_reproducible_privacy else None
        outputs, losses = run_clients(self.backend, program, broadcast, tasks, ids, rnd, upload, seed)
        if self.compression is not None:  # refused with local DP (config): the two never meet
            outputs = self._compress(outputs, ids, rnd)
        reported = torch.tensor([float(t.inputs["num_samples"]) for t in tasks], dtype=torch.float64)
        return RoundReplies(ids, outputs, losses, reported)

    def _compress(self, outputs: dict, ids: list[int], rnd: int) -> dict:
        """Each client encodes its upload (with its residual under error feedback); the server
        gets the decoded rows and, per client, the encoded size (``metrics.upload_bytes``)."""
        comp = self.compression
        sent = upload_of(outputs)
        residuals = None
        if comp.error_feedback:
            d = sum(v[0].numel() for v in tree.nested_leaves(sent))
            zero = torch.zeros(d, dtype=torch.float64)
            residuals = torch.stack([self.clients.private(c, RESIDUAL) if self.clients.private(c, RESIDUAL)
                                     is not None else zero for c in ids])
        decoded, new_residuals, size = comp.apply(sent, residuals, self.cfg.seed, rnd, ids)
        if new_residuals is not None:
            self._pending_residuals = {c: new_residuals[i] for i, c in enumerate(ids)}
        metrics = {**outputs.get("metrics", {}), "upload_bytes": torch.full((len(ids),), float(size))}
        return {**outputs, **decoded, "metrics": metrics}

    def task(self, cid: int, rnd: int, program: LocalProgram, broadcast: dict,
             work: LocalWork | None = None) -> ClientTask:
        """Client ``cid``'s task in round ``rnd`` (:func:`metafed.client.task.make_task`): its
        data, its seeded batch schedule and its persistent state from the client store.
        ``work``: the round's local work, when the caller resolved it once for the cohort."""
        state = self.clients.get(cid, lambda: self.algorithm.client_init(broadcast))
        work = work if work is not None else LocalWork.of_round(self.cfg, self.algorithm, rnd)
        return make_task(self.dataset.clients[cid], cid, rnd, program, state, work)

    def label_counts(self, ids: list[int]) -> Tensor:
        k = self.dataset.num_classes
        return torch.stack([torch.bincount(self.dataset.clients[c].train_y, minlength=k) for c in ids])

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator.from_config(self.algorithm, self.backend, self.cfg)

    def evaluate(self, rnd: int, state: ServerState) -> tuple[dict, dict]:
        """Each sampled client scores the global model and its personalized one on its own test
        split; held-out clients score new-client accuracy after k adaptation steps. Returns
        (metrics, per-client lists named by client)."""
        cfg, algorithm = self.cfg, self.algorithm
        if algorithm.combines_groups:  # each client with its own group's models (distillation)
            view = types.SimpleNamespace(algorithm=algorithm, cfg=cfg, dataset=self.dataset, state=state,
                                         clients=self.clients, backend=self.backend)
            return evaluate_groups(view, rnd)
        broadcast = algorithm.broadcast(state, rnd)
        ids = evaluation_sample(self.dataset.num_clients, cfg.eval_clients, cfg.seed)
        states = [self.clients.get(c, lambda: algorithm.client_init(broadcast)) for c in ids]
        metrics, per_client = self.evaluator.evaluate(state, rnd, [self.dataset.clients[c] for c in ids], states,
                                                      cfg.personalize_steps, self.dataset.heldout,
                                                      HELDOUT_ADAPT_STEPS, ids, cfg.eval_train_loss)
        # who each per-client score belongs to (LEAF user ids; the client index otherwise)
        per_client["client"] = [self.dataset.clients[c].name or str(c) for c in ids]
        if self.dataset.heldout:
            per_client["new_client"] = [c.name or f"new-{j}" for j, c in enumerate(self.dataset.heldout)]
        return metrics, per_client

    def deliver_receipts(self, rnd: int, entries: list[dict], public_key: str) -> None:
        """Simulated clients read their ledger entries in the run folder: nothing to send."""

    def async_clients(self) -> VirtualClock:
        """``--mode async``: the clients as jobs on the virtual clock."""
        return VirtualClock(self)

    def keep_states(self, ids: list[int], states: dict, accepted: Tensor) -> None:
        pending, self._pending_residuals = self._pending_residuals, {}
        for i, cid in enumerate(ids):  # a rejected update changes nothing, its residual included
            if accepted[i] and cid in pending:
                self.clients.put_private(cid, RESIDUAL, pending[cid])
        if not states:
            return
        for i, cid in enumerate(ids):
            if accepted[i]:
                self.clients.put(cid, tree.nested_index(states, i))

    # ------------------------------------------------------------------ secure aggregation
    def secagg_roster(self, cohort: list[int]) -> tuple[dict, dict[int, bytes]]:
        """Trusted set-up of long-term Ed25519 identities (OS randomness, kept in memory for
        the run, never stored): (client -> signing key, roster client -> public key)."""
        from metafed.privacy.secagg import identities

        missing = [c for c in cohort if c not in self._identities]
        if missing:
            signing, public = identities(missing)
            self._identities.update({c: (signing[c], public[c]) for c in missing})
        return {c: self._identities[c][0] for c in cohort}, {c: self._identities[c][1] for c in cohort}

    def secure_sum(self, rnd: int, run_id: bytes, cohort: list[int], ids: list[int], rows: dict,
                   transform: UploadTransform, weighting: str | None) -> tuple[dict, list[int]]:
        """The in-memory protocol: each client finishes its upload (``transform``, with its own
        weight under ``weighting``, see :func:`own_weight`), encodes
        it in fixed point and runs SecAgg(+) with the others. ``secagg_dropout`` of the clients
        vanish after key sharing; a client whose input lies outside the fixed-point range is
        dropped with a log line. Returns (the survivors' sum, the survivors)."""
        from metafed.tree import flatten_messages, unflatten_like
        from metafed.privacy.secagg import FixedPoint, secure_sum
        from metafed.privacy.secagg.messages import session_id

        cfg = self.cfg
        finished = [finish_upload(tree.nested_index(rows, i), self._with_own_weight(transform, weighting, c))
                    for i, c in enumerate(ids)]
        x, layout = flatten_messages(tree.nested_stack(finished))  # [C, D] float64
        n_gone = int(round(cfg.secagg_dropout * len(ids)))
        gone = set(np.random.default_rng([cfg.seed, 13, rnd]).choice(ids, n_gone, replace=False).tolist())
        signing, roster = self.secagg_roster(cohort)
        result = secure_sum({cid: x[i].numpy() for i, cid in enumerate(ids)}, secagg_config(cfg, len(cohort)),
                            FixedPoint(cfg.secagg_range, cfg.secagg_bits), {"upload": gone}, cohort=cohort,
                            signing=signing, roster=roster, session=session_id(run_id, rnd))
        return unflatten_like(torch.from_numpy(result.total), layout, finished[0]), list(result.survivors)

    def _with_own_weight(self, transform: UploadTransform, weighting: str | None, cid: int) -> UploadTransform:
        if weighting is None:
            return transform
        n = float(self.dataset.clients[cid].num_train)
        return replace(transform, weight=own_weight(n, weighting, self.cfg.max_sample_weight))

    def message_template(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        out, _ = self.backend.run(program, broadcast, [self.task(0, rnd, program, broadcast)])
        return zero_rows(out)
