"""Asynchronous clients over real SuperNodes (``--mode async`` in deployment): each job is
pushed to its node without waiting (``Grid.push_messages``) with the model of the current
version; replies are pulled as they come (``Grid.pull_messages``), checked like synchronous
replies and handed to :class:`metafed.asynchrony.AsyncDriver` (the same server logic as the
simulation's) in arrival order. A job whose node refuses, sends a malformed reply, or is
silent past ``round-timeout`` is gone and its slot refilled.

Rows carry ``virtual_time``: here the seconds since the asynchronous server started (wall
clock). Jobs in flight when the server stops are lost with that ServerApp (their replies
answer a run that no longer exists), and a resumed run dispatches fresh ones."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from metafed import tree
from metafed.aggregate import RoundSkipped
from metafed.asynchrony import Job

if TYPE_CHECKING:
    from metafed.asynchrony import AsyncDriver
    from metafed.deploy.pool import FlowerPool

log = logging.getLogger("metafed.deploy")


@dataclass
class RealArrivals:
    pool: "FlowerPool"
    persistent = False  # jobs live on the nodes
    in_flight: dict = field(default_factory=dict)  # message id -> Job, until its reply arrives
    started: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.started

    def submit(self, driver: "AsyncDriver", clients: list[int], schedule_round: int, broadcast: dict) -> list[Job]:
        jobs = []
        for cid in clients:
            job = Job(cid, driver.version, float("inf"), 0.0, schedule_round)
            self.in_flight[self.pool.push_train(schedule_round, cid, broadcast)] = job
            jobs.append(job)
        return jobs

    def poll(self, driver: "AsyncDriver") -> tuple[list[Job], list[Job]]:
        """The replies that arrive next (within ``round-timeout``), checked; when none comes,
        every job in flight is given up."""
        self.in_flight = {mid: j for mid, j in self.in_flight.items() if j in driver.jobs}
        if not self.in_flight:
            raise RoundSkipped("no client could be given a job")
        program = driver.algorithm.client_program(driver.version + 1)
        broadcast = driver.algorithm.broadcast(driver.state, driver.version + 1)
        pending = {mid: (job.client, job.schedule_round) for mid, job in self.in_flight.items()}
        got, gone = [], []
        for mid, cid, sent, loss, n in self.pool.pull_train(pending, program, broadcast, self.pool.round_timeout):
            job = self.in_flight.pop(mid)
            if sent is None or not tree.all_finite(sent.get("update", {})):
                gone.append(job)
                continue
            job.payload = driver.payload(job, sent["update"])
            job.loss, job.samples, job.finish = loss, n, self.now()
            got.append(job)
        if not got and not gone:  # every job outlived the timeout: start others
            log.warning("async: no reply within %g s; dropping %d jobs", self.pool.round_timeout, len(self.in_flight))
            gone, self.in_flight = list(self.in_flight.values()), {}
        return sorted(got, key=lambda j: j.client), gone
