"""The simulation's asynchronous clients (``--mode async``): jobs on a virtual clock.

A client's job takes its local steps times its per-step time (:func:`metafed.asynchrony.
client_step_times`: ``--client-speed``, ``--slow-clients``). A job's result depends on its
start model and its client, not on time, so the jobs are trained when the first job started
from their model version arrives, all of them as one batch through the simulation pool
(vectorized); the driver sees each when it finishes. Jobs arriving at one instant arrive
together, in client order."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from metafed import tree
from metafed.aggregate import RoundSkipped
from metafed.asynchrony import Job, client_step_times
from metafed.client.task import LocalWork

if TYPE_CHECKING:
    from metafed.asynchrony import AsyncDriver
    from metafed.pools.simulation import SimulationPool


@dataclass
class VirtualClock:
    pool: "SimulationPool"
    persistent = True  # its jobs are checkpointed with the server state
    _now: float = 0.0
    _step_times: np.ndarray | None = field(default=None, repr=False)

    def step_time(self, cid: int) -> float:
        if self._step_times is None:
            cfg = self.pool.cfg
            self._step_times = client_step_times(self.pool.num_clients, cfg.client_speed, cfg.slow_clients, cfg.seed)
        return float(self._step_times[cid])

    def now(self) -> float:
        return self._now

    def submit(self, driver: "AsyncDriver", clients: list[int], schedule_round: int, broadcast: dict) -> list[Job]:
        """Jobs finishing at now + steps x the client's step time; trained later (see :meth:`poll`)."""
        self._now = driver.clock
        program = driver.algorithm.client_program(driver.version + 1)
        work = LocalWork.of_round(self.pool.cfg, driver.algorithm, schedule_round)
        jobs = []
        for cid in clients:
            steps = len(self.pool.task(cid, schedule_round, program, broadcast, work).schedule)
            jobs.append(Job(cid, driver.version, self._now + steps * self.step_time(cid),
                            float(self.pool.dataset.clients[cid].num_train), schedule_round))
        return jobs

    def poll(self, driver: "AsyncDriver") -> tuple[list[Job], list[Job]]:
        """The jobs that finish next (all at one instant), trained if they were not yet."""
        if not driver.jobs:
            raise RoundSkipped("no client could be given a job")
        t = min(j.finish for j in driver.jobs)
        arrived = sorted((j for j in driver.jobs if j.finish == t), key=lambda j: j.client)
        for version in sorted({j.start_version for j in arrived if not j.trained}):
            self._train(driver, version)
        self._now = driver.clock = t
        return arrived, []

    def _train(self, driver: "AsyncDriver", version: int) -> None:
        """Train every untrained job that starts from ``version``, one batch per batch seed."""
        params = driver.models[version]
        state = replace(driver.state, params=params)
        program = driver.algorithm.client_program(version + 1)
        broadcast = driver.algorithm.broadcast(state, version + 1)
        waiting = [j for j in [*driver.jobs, *driver.buffer] if j.start_version == version and not j.trained]
        for schedule_round in sorted({j.schedule_round for j in waiting}):
            group = sorted((j for j in waiting if j.schedule_round == schedule_round), key=lambda j: j.client)
            replies = self.pool.train(schedule_round, np.asarray([j.client for j in group]), program, broadcast)
            for i, job in enumerate(group):
                job.payload = driver.payload(job, tree.nested_index(replies.outputs["update"], i))
                job.loss = float(replies.losses[i])
