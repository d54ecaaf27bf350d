"""The simulation pool: every client is simulated in this process, on a backend (loop or
vectorized) over a ``FederatedDataset``. Simulated failures live here: ``dropout`` (sampled
clients that never reply) and ``stragglers`` (partial work, dropped or kept by policy)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram
from metafed.backends.base import Backend, ClientTask
from metafed.client_store import ClientStore
from metafed.config import RunConfig
from metafed.data.federated import FederatedDataset
from metafed.data.schedule import client_schedule, straggler_steps
from metafed.pools.base import RoundReplies, zero_rows


@dataclass
class SimulationPool:
    cfg: RunConfig
    dataset: FederatedDataset
    algorithm: FederatedAlgorithm
    backend: Backend
    clients: ClientStore = field(default_factory=ClientStore)

    @property
    def num_clients(self) -> int:
        return self.dataset.num_clients

    def train(self, rnd: int, cohort: np.ndarray, program: LocalProgram, broadcast: dict) -> RoundReplies:
        cfg = self.cfg
        n_gone = int(round(cfg.dropout * len(cohort)))
        gone = set(np.random.default_rng([cfg.seed, 8, rnd]).choice(cohort, n_gone, replace=False).tolist())
        rng = np.random.default_rng([cfg.seed, 4, rnd])
        n_slow = int(round(cfg.stragglers * len(cohort)))
        slow = set(rng.choice(cohort, n_slow, replace=False).tolist()) if n_slow else set()
        policy = cfg.straggler_policy or self.algorithm.straggler_policy
        ids, tasks = [], []
        for cid in cohort.tolist():
            if cid in gone or (cid in slow and policy == "drop"):
                continue
            task = self.task(cid, rnd, program.batches_per_step, broadcast)
            if cid in slow:
                epochs, steps = self.algorithm.local_work(rnd) or (cfg.local_epochs, cfg.local_steps)
                task = replace(task, active_steps=straggler_steps(len(task.schedule), epochs, steps is not None, rng))
            ids.append(cid)
            tasks.append(task)
        if not tasks:
            return RoundReplies.empty()
        outputs, losses = self.backend.run(program, broadcast, tasks)
        reported = torch.tensor([float(t.inputs["num_samples"]) for t in tasks], dtype=torch.float64)
        return RoundReplies(ids, outputs, losses, reported)

    def task(self, cid: int, rnd: int, batches_per_step: int, broadcast: dict) -> ClientTask:
        """Client ``cid``'s local work in round ``rnd``: its data, its seeded batch schedule
        (``default_rng([seed, 3, round, client])``) and its persistent state."""
        cfg = self.cfg
        epochs, steps = self.algorithm.local_work(rnd) or (cfg.local_epochs, cfg.local_steps)
        data = self.dataset.clients[cid]
        sched = client_schedule(data.num_train, batch_size=cfg.batch_size, epochs=epochs, steps=steps,
                                batches_per_step=batches_per_step, rng=np.random.default_rng([cfg.seed, 3, rnd, cid]))
        inputs = {"state": self.clients.get(cid, lambda: self.algorithm.client_init(broadcast)),
                  "num_samples": torch.tensor(float(data.num_train))}
        return ClientTask(data.train_x, data.train_y, sched, len(sched), inputs)

    def keep_states(self, ids: list[int], states: dict, accepted: Tensor) -> None:
        if not states:
            return
        for i, cid in enumerate(ids):
            if accepted[i]:
                self.clients.put(cid, tree.nested_index(states, i))

    def message_template(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        out, _ = self.backend.run(program, broadcast, [self.task(0, rnd, program.batches_per_step, broadcast)])
        return zero_rows(out)
