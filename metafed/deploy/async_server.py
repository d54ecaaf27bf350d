"""Asynchronous FL over real SuperNodes (``--mode async`` in deployment): the server logic
of :class:`metafed.asynchrony.AsyncServer` (FedAsync mixing, FedBuff buffering, staleness
weights, the same server step) driven by replies as they really arrive.

``--clients-per-round`` M jobs are in flight at any time. Each job is pushed to its node
without waiting (``Grid.push_messages``) with the model of the current version; replies are
pulled as they come (``Grid.pull_messages``), checked like synchronous replies, and
consumed in arrival order: FedAsync applies each one, FedBuff every ``--buffer-size``. Each
freed slot is refilled at once with an idle client, chosen as the simulation chooses
(``default_rng([seed, 17, event])``, or the round's FedAvg cohort when every slot is free),
so with M = 1 a deployment follows the simulation's trajectory exactly (tested). A job
whose node refuses, sends a malformed reply, or is silent past ``round-timeout`` is
dropped and its slot refilled.

Rows carry ``virtual_time``: here the seconds since the asynchronous server started (wall
clock). Checkpoints keep the version, the buffer and the sampling counter; jobs in flight
when the server stops are lost with that ServerApp (their replies answer a run that no
longer exists), and a resumed run dispatches fresh ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from metafed import tree
from metafed.aggregate import RoundSkipped
from metafed.asynchrony import AsyncServer, Job

log = logging.getLogger("metafed.deploy")


@dataclass
class DeployedAsyncServer(AsyncServer):
    in_flight: dict = field(default_factory=dict)  # message id -> Job, until its reply arrives
    ready: list = field(default_factory=list)  # arrived, not yet consumed (still busy, as in the simulation)
    started: float = field(default_factory=time.monotonic)

    def dispatch(self, clients: list[int], schedule_round: int) -> int:
        fed = self.fed
        broadcast = fed.algorithm.broadcast(fed.state, self.version + 1)
        self.models.setdefault(self.version, fed.algorithm.global_params(fed.state))
        self.events += 1
        for cid in clients:
            job = Job(cid, self.version, float("inf"), 0.0, schedule_round)
            self.in_flight[fed.pool.push_train(schedule_round, cid, broadcast)] = job
            self.jobs.append(job)
        return tree.nested_bytes(broadcast) * len(clients)

    def step(self, rnd: int) -> dict:
        """One server update, as :meth:`AsyncServer.step` but on real arrivals."""
        fed, cfg = self.fed, self.fed.cfg
        if not self.loaded:
            self.load(fed.state.extra)
            self.jobs = []  # in-flight jobs of an earlier ServerApp are gone with it
        m = min(cfg.clients_per_round, fed.pool.num_clients)
        bytes_down = self.refill(m - len(self.jobs)) if len(self.jobs) < m else 0
        need = 1 if cfg.async_rule == "fedasync" else (cfg.buffer_size or cfg.clients_per_round)
        consumed: list[Job] = []
        while len(self.buffer) < need:
            if not self.ready:
                if not self.in_flight:
                    raise RoundSkipped("no client could be given a job")
                arrived, refused = self._arrivals()
                bytes_down += self.refill(refused) if refused else 0
                if not arrived and not refused:  # every job outlived the timeout: start others
                    log.warning("async: no reply within %g s; dropping %d jobs", fed.pool.round_timeout,
                                len(self.in_flight))
                    self.jobs = [j for j in self.jobs if j not in self.in_flight.values()]
                    bytes_down += self.refill(len(self.in_flight))
                    self.in_flight.clear()
                self.ready += arrived
                continue
            take = self.ready[: need - len(self.buffer)]
            self.ready = self.ready[len(take):]
            self.jobs = [j for j in self.jobs if j not in take]
            self.buffer += take
            consumed += take
            if len(self.buffer) < need:
                bytes_down += self.refill(len(take))  # the buffer waits: refill the freed slots now
        self.clock = time.monotonic() - self.started
        staleness = [self.version - j.start_version for j in self.buffer]
        self.apply(self.buffer, staleness, rnd)
        self.buffer, self.version = [], self.version + 1
        self._forget_models()
        bytes_down += self.refill(m - len(self.jobs))
        self.save()
        return self.row(rnd, consumed, staleness, bytes_down)

    def _arrivals(self) -> tuple[list[Job], int]:
        """(the jobs whose replies arrived next, with their payloads, in client order; how
        many replies were refused: those jobs are dropped, their slots to refill)."""
        fed = self.fed
        program = fed.algorithm.client_program(self.version + 1)
        pending = {mid: (job.client, job.schedule_round) for mid, job in self.in_flight.items()}
        broadcast = fed.algorithm.broadcast(fed.state, self.version + 1)
        got, refused = [], 0
        for mid, cid, sent, loss, n in fed.pool.pull_train(pending, program, broadcast, fed.pool.round_timeout):
            job = self.in_flight.pop(mid)
            if sent is None or not tree.all_finite(sent.get("update", {})):
                self.jobs.remove(job)
                refused += 1
                continue
            delta = sent["update"]
            start = self.models[job.start_version]
            job.payload = {k: start[k] + delta[k] for k in start} if fed.cfg.async_rule == "fedasync" else delta
            job.loss, job.samples, job.finish = loss, n, time.monotonic() - self.started
            got.append(job)
        return sorted(got, key=lambda j: j.client), refused

    def _forget_models(self) -> None:
        """Keep the start model of each version a job in flight or waiting still needs."""
        needed = {j.start_version for j in [*self.jobs, *self.buffer]} | {self.version}
        self.models = {v: p for v, p in self.models.items() if v in needed}

    def save(self) -> None:
        flying, self.jobs = self.jobs, []  # in-flight jobs live on the nodes: not checkpointed
        try:
            super().save()
        finally:
            self.jobs = flying
