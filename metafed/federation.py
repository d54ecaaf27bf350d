"""The ONE round loop: sample -> broadcast -> run clients -> validate -> aggregate ->
server update -> (evaluate). Tracking and checkpointing hang off it in ``run.py``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, ServerState
from metafed.backends.base import Backend, ClientTask
from metafed.client_store import ClientStore
from metafed.config import RunConfig
from metafed.data.federated import FederatedDataset
from metafed.data.schedule import client_schedule, sample_clients, straggler_steps
from metafed.eval import Evaluator

log = logging.getLogger("metafed")

HELDOUT_ADAPT_STEPS = (0, 1, 5, 10)


@dataclass
class Federation:
    cfg: RunConfig
    dataset: FederatedDataset
    algorithm: FederatedAlgorithm
    backend: Backend
    aggregator: object
    state: ServerState
    clients: ClientStore = field(default_factory=ClientStore)

    def __post_init__(self):
        if self.dataset.num_clients < 1:
            raise ValueError("the dataset has no training clients")
        self.evaluator = Evaluator(self.algorithm, self.backend, self.cfg.eval_batch_size,
                                   self.cfg.personalize_lr or self.cfg.lr, self.cfg.seed)

    # ------------------------------------------------------------------ one round
    def plan_round(self, rnd: int, batches_per_step: int, broadcast: dict) -> tuple[list[int], list[ClientTask], int]:
        """Which clients train this round and what each does: (client ids, tasks, #sampled)."""
        cfg = self.cfg
        sampled = sample_clients(self.dataset.num_clients, cfg.clients_per_round, rnd, cfg.seed)
        rng = np.random.default_rng([cfg.seed, 4, rnd])
        n_slow = int(round(cfg.stragglers * len(sampled)))
        slow = set(rng.choice(sampled, n_slow, replace=False).tolist()) if n_slow else set()
        policy = cfg.straggler_policy or self.algorithm.straggler_policy
        epochs, steps = self.algorithm.local_work(rnd) or (cfg.local_epochs, cfg.local_steps)
        ids, tasks = [], []
        for cid in sampled.tolist():
            if cid in slow and policy == "drop":
                continue
            data = self.dataset.clients[cid]
            sched = client_schedule(data.num_train, batch_size=cfg.batch_size, epochs=epochs,
                                    steps=steps, batches_per_step=batches_per_step,
                                    rng=np.random.default_rng([cfg.seed, 3, rnd, cid]))
            active = len(sched)
            if cid in slow:
                active = straggler_steps(len(sched), epochs, steps is not None, rng)
            inputs = {"state": self.clients.get(cid, lambda: self.algorithm.client_init(broadcast)),
                      "num_samples": torch.tensor(float(data.num_train))}
            ids.append(cid)
            tasks.append(ClientTask(data.train_x, data.train_y, sched, active, inputs))
        return ids, tasks, len(sampled)

    def run_round(self, rnd: int) -> dict:
        """Train one round; returns the round's training metrics."""
        alg = self.algorithm
        broadcast = alg.broadcast(self.state, rnd)
        program = alg.client_program(rnd)
        ids, tasks, n_sampled = self.plan_round(rnd, program.batches_per_step, broadcast)
        metrics = {"round": rnd, "clients_sampled": n_sampled, "bytes_down": tree.nested_bytes(broadcast) * n_sampled}
        if not tasks:
            log.warning("round %d: no client returned an update (all dropped); the model is unchanged", rnd)
            return {**metrics, "clients_used": 0, "bytes_up": 0, "train_loss": float("nan")}
        outputs, losses = self.backend.run(program, broadcast, tasks)
        weights = torch.tensor([float(t.inputs["num_samples"]) for t in tasks])
        ok = self._finite_rows(outputs["update"], ids)
        for i, cid in enumerate(ids if outputs["state"] else []):
            if ok[i]:
                self.clients.put(cid, tree.nested_index(outputs["state"], i))
        used = torch.nonzero(ok).flatten()
        metrics["clients_used"] = int(used.numel())
        if used.numel() == 0:
            return {**metrics, "bytes_up": 0, "train_loss": float("nan")}
        kept = {k: tree.nested_index(v, used) for k, v in outputs.items() if k not in ("state", "metrics")}
        # clients' loss for loss-scored aggregators: a reported validation loss, else the training loss
        client_loss = outputs.get("metrics", {}).get("val_loss", losses)[used]
        aggregate = self.aggregator(kept, weights[used], client_loss)
        self.state = alg.server_update(self.state, aggregate, rnd)
        w = weights[used]
        metrics["bytes_up"] = tree.nested_bytes(tree.nested_index(outputs["update"], used))
        metrics["train_loss"] = float((losses[used].double() * w).sum() / w.sum())
        return metrics

    @staticmethod
    def _finite_rows(update: dict, ids: list[int]) -> torch.Tensor:
        """Per client: are all update values finite? Non-finite updates are rejected and logged."""
        ok = torch.ones(len(ids), dtype=torch.bool)
        for v in tree.nested_leaves(update):
            ok &= torch.isfinite(v.reshape(len(ids), -1)).all(dim=1)
        for i in torch.nonzero(~ok).flatten().tolist():
            log.warning("rejected the update of client %d: it contains NaN or Inf", ids[i])
        return ok

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int) -> tuple[dict, dict]:
        broadcast = self.algorithm.broadcast(self.state, rnd)
        states = [self.clients.get(c, lambda: self.algorithm.client_init(broadcast))
                  for c in range(self.dataset.num_clients)]
        return self.evaluator.evaluate(self.state, rnd, self.dataset.clients, states, self.cfg.personalize_steps,
                                       self.dataset.heldout, HELDOUT_ADAPT_STEPS)
