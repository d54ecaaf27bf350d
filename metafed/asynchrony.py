"""Asynchronous FL on a virtual clock (``--mode async``): FedAsync and FedBuff.

- FedAsync (Xie, Koyejo, Gupta 2019, arXiv:1903.03934): every arriving client model x_i,
  trained from a model ``tau`` versions old, is mixed in at once:
  x <- (1 - a s(tau)) x + a s(tau) x_i, with a = ``--async-alpha``.
- FedBuff (Nguyen et al., AISTATS 2022, arXiv:2106.06639): arriving updates Delta_i wait in
  a buffer; every K = ``--buffer-size`` of them the server applies their sample-weighted
  mean of s(tau_i) Delta_i with its server optimizer (``--server-lr`` is eta_g).
- Staleness weights s (``--staleness``): ``constant`` (1), ``poly:A`` = (1 + tau)^-A (A = 1
  is the seed documents' 1/(1 + staleness)), ``hinge:A,B`` = 1 if tau <= B else
  1 / (A (tau - B) + 1).

One driver, :class:`AsyncDriver`, runs the server side over any pool's asynchronous clients
(:class:`AsyncClients`: ``submit`` jobs, ``poll`` the next arrivals): the simulation's
virtual clock (:class:`metafed.pools.virtual_clock.VirtualClock`) or real arrivals from
SuperNodes (:class:`metafed.deploy.async_arrivals.RealArrivals`).

The virtual clock: ``--clients-per-round`` M clients train at once. A client's job takes its local
steps times its per-step time: exp(sigma z_c) with z_c ~ N(0, 1) fixed per client
(``--client-speed lognormal:SIGMA``, or ``constant``), times 10 for a seeded
``--slow-clients`` fraction. A job's result depends on its start model and its client, not
on time, so it is computed when the first job started from the same model version arrives,
for all of them as one vectorized batch; the server sees each when it finishes. Arrivals at
one instant are handled together; freed slots are refilled after the server update, with
clients sampled among the idle ones. One "round" of the run loop is one server update: rows carry ``virtual_time``, the staleness of what was
applied, and the number of updates consumed. In-flight jobs, the buffer and the clock live
in the server state and are checkpointed, so a resumed run continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Optional, Protocol

import numpy as np
import torch
from pydantic import Field

from metafed import tree
from metafed.aggregate import RoundSkipped, cap_sample_weights
from metafed.data.schedule import sample_clients
from metafed.section import Section

if TYPE_CHECKING:
    from metafed.algorithms.base import FederatedAlgorithm, ServerState
    from metafed.config import RunConfig
    from metafed.pools.base import ClientPool


class ScheduleSection(Section):
    """Synchronous rounds or asynchronous FedAsync / FedBuff."""

    TITLE: ClassVar[str] = "Asynchrony"

    mode: Literal["sync", "async"] = Field("sync", description="sync rounds, or async: clients train on a virtual "
                                           "clock and the server applies updates as they arrive")
    async_rule: Literal["fedasync", "fedbuff"] = Field("fedbuff", description="async: FedAsync (mix in each arrival) "
                                                       "or FedBuff (apply the mean of every K arrivals)")
    async_alpha: float = Field(0.6, gt=0, le=1, description="FedAsync: mixing weight a of an arriving model")
    staleness: str = Field("poly:0.5", description="async: staleness weight s(tau): constant, poly:A ((1+tau)^-A), "
                           "hinge:A,B")
    buffer_size: Optional[int] = Field(None, ge=1, description="FedBuff: K arrivals per server update (default: "
                                       "clients-per-round)")


SLOW_FACTOR = 10.0
FIELDS = ("client", "start_version", "finish", "samples", "loss", "schedule_round", "trained")  # a job's record


def staleness_weight(spec: str) -> Callable[[int], float]:
    """``constant`` | ``poly:A`` | ``hinge:A,B`` -> s(tau); raises ValueError naming the problem."""
    name, _, arg = spec.partition(":")
    try:
        if name == "constant" and not arg:
            return lambda tau: 1.0
        if name == "poly":
            a = float(arg)
            if a >= 0:
                return lambda tau: (1.0 + tau) ** -a
        if name == "hinge":
            a, b = (float(v) for v in arg.split(","))
            if a >= 0 and b >= 0:
                return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    except ValueError:
        pass
    raise ValueError(f"--staleness {spec!r}: expected constant, poly:A or hinge:A,B (A, B >= 0)")


def parse_speed(spec: str) -> float:
    """``constant`` -> 0, ``lognormal:SIGMA`` -> sigma."""
    name, _, arg = spec.partition(":")
    try:
        if name == "constant" and not arg:
            return 0.0
        if name == "lognormal" and float(arg) >= 0:
            return float(arg)
    except ValueError:
        pass
    raise ValueError(f"--client-speed {spec!r}: expected constant or lognormal:SIGMA (SIGMA >= 0)")


def client_step_times(num_clients: int, speed: str, slow_fraction: float, seed: int) -> np.ndarray:
    """Each client's time per local step [N]: exp(sigma z_c), z_c ~ N(0, 1) seeded per client,
    times 10 for a seeded ``slow_fraction`` of the clients."""
    sigma = parse_speed(speed)
    z = np.array([np.random.default_rng([seed, 18, c]).standard_normal() for c in range(num_clients)])
    slow = np.random.default_rng([seed, 19]).random(num_clients) < slow_fraction
    return np.exp(sigma * z) * np.where(slow, SLOW_FACTOR, 1.0)


@dataclass(eq=False)  # jobs are compared by identity (their payloads are tensors)
class Job:
    client: int
    start_version: int
    finish: float
    samples: float
    schedule_round: int  # seeds the client's batch order (pool.task)
    loss: float = float("nan")
    payload: dict | None = None  # once trained. FedAsync: the client's model; FedBuff: its update Delta

    @property
    def trained(self) -> bool:
        return self.payload is not None

    def record(self) -> list[float]:
        return [float(getattr(self, f)) for f in FIELDS]


class AsyncClients(Protocol):
    """A pool's clients seen asynchronously: jobs go out one by one and come back when they
    come back. ``persistent``: whether jobs in flight survive a restart of the server (they
    do on the virtual clock, whose jobs are checkpointed; a deployment's live on the nodes)."""

    persistent: bool

    def submit(self, driver: "AsyncDriver", clients: list[int], schedule_round: int, broadcast: dict) -> list[Job]:
        """Start ``clients`` on the driver's current model version; returns their jobs."""
        ...

    def poll(self, driver: "AsyncDriver") -> tuple[list[Job], list[Job]]:
        """Wait for the next arrivals: (jobs that arrived, with their payloads, in client order;
        jobs that are gone: refused, malformed or silent past the timeout). Raises RoundSkipped
        when no job is in flight."""
        ...

    def now(self) -> float:
        """The clock rows report as ``virtual_time`` (virtual, or seconds since the start)."""
        ...


@dataclass
class AsyncDriver:
    """FedAsync / FedBuff's server: keeps M jobs in flight, consumes arrivals into the buffer,
    applies the buffer with staleness weights, refills freed slots. ``clients`` is the pool's
    :class:`AsyncClients`. A round driver: :meth:`step` takes the server state in and gives it
    out with the update's row; ``state`` is the state of the update in progress."""

    cfg: "RunConfig"
    algorithm: "FederatedAlgorithm"
    pool: "ClientPool"
    aggregator: object
    clients: AsyncClients
    state: "ServerState | None" = None
    clock: float = 0.0
    version: int = 0
    events: int = 0  # dispatch events so far (seeds replacement sampling)
    jobs: list[Job] = field(default_factory=list)  # in flight, or arrived and not yet consumed (still busy)
    ready: list[Job] = field(default_factory=list)  # arrived, not yet consumed
    buffer: list[Job] = field(default_factory=list)
    models: dict[int, dict] = field(default_factory=dict)  # version -> params, while a job started from it needs them
    loaded: bool = False

    # ------------------------------------------------------------------ jobs
    def dispatch(self, clients: list[int], schedule_round: int) -> int:
        """Start ``clients`` on the current model (its params kept while a job needs them)."""
        broadcast = self.algorithm.broadcast(self.state, self.version + 1)
        self.models.setdefault(self.version, self.algorithm.global_params(self.state))
        self.events += 1
        self.jobs += self.clients.submit(self, clients, schedule_round, broadcast)
        return tree.nested_bytes(broadcast) * len(clients)

    def payload(self, job: Job, delta: dict) -> dict:
        """What a job brings the server: FedAsync the client's model, FedBuff its update."""
        if self.cfg.async_rule != "fedasync":
            return delta
        start = self.models[job.start_version]
        return {k: start[k] + delta[k] for k in start}

    def refill(self, free: int) -> int:
        """Start ``free`` idle clients; when every slot is free, the cohort synchronous FedAvg
        would sample this round (so FedBuff with K = M and equal speeds is FedAvg)."""
        cfg, n = self.cfg, self.pool.num_clients
        m = min(cfg.clients_per_round, n)
        busy = {j.client for j in self.jobs}
        if free == m and not busy:
            clients, schedule_round = sample_clients(n, m, self.version + 1, cfg.seed).tolist(), self.version + 1
        else:
            idle = [c for c in range(n) if c not in busy]
            rng = np.random.default_rng([cfg.seed, 17, self.events])
            clients = rng.choice(idle, min(free, len(idle)), replace=False).tolist()
            schedule_round = 10 ** 6 + self.version  # one batch seed per version: its jobs train together
        return self.dispatch(sorted(clients), schedule_round) if clients else 0

    # ------------------------------------------------------------------ one server update
    def step(self, state: "ServerState", rnd: int) -> tuple["ServerState", dict]:
        """One server update: (the new server state, its metrics row)."""
        cfg, self.state = self.cfg, state
        if not self.loaded:
            self.load(state.extra)
        m = min(cfg.clients_per_round, self.pool.num_clients)
        bytes_down = self.refill(m - len(self.jobs)) if len(self.jobs) < m else 0
        need = 1 if cfg.async_rule == "fedasync" else (cfg.buffer_size or cfg.clients_per_round)
        consumed: list[Job] = []
        while len(self.buffer) < need:
            if not self.ready:
                if not self.jobs:
                    raise RoundSkipped("no client could be given a job")
                arrived, gone = self.clients.poll(self)
                if gone:  # refused, malformed or silent: their slots go to other clients
                    self.jobs = [j for j in self.jobs if j not in gone]
                    bytes_down += self.refill(len(gone))
                self.ready += arrived
                continue
            take = self.ready[: need - len(self.buffer)]
            self.ready = self.ready[len(take):]
            self.jobs = [j for j in self.jobs if j not in take]
            self.buffer += take
            consumed += take
            if len(self.buffer) < need:
                bytes_down += self.refill(len(take))  # the buffer waits: refill the freed slots now
        self.clock = self.clients.now()
        staleness = [self.version - j.start_version for j in self.buffer]
        self.apply(self.buffer, staleness, rnd)
        self.buffer, self.version = [], self.version + 1
        self._forget_models()
        bytes_down += self.refill(m - len(self.jobs))
        self.save()
        return self.state, self.row(rnd, consumed, staleness, bytes_down)

    def _forget_models(self) -> None:
        """Keep the start model of each version a job in flight or waiting still needs."""
        needed = {j.start_version for j in [*self.jobs, *self.buffer]} | {self.version}
        self.models = {v: p for v, p in self.models.items() if v in needed}

    def row(self, rnd: int, consumed: list[Job], staleness: list[int], bytes_down: int) -> dict:
        """The metrics row of one server update."""
        return {"round": rnd, "clients_sampled": len(consumed), "clients_used": len(consumed),
                "bytes_up": sum(tree.nested_bytes(j.payload) for j in consumed), "bytes_down": bytes_down,
                "train_loss": float(np.mean([j.loss for j in consumed])), "virtual_time": self.clock,
                "staleness_mean": float(np.mean(staleness)), "staleness_max": int(max(staleness)),
                "updates": self.version}

    def apply(self, jobs: list[Job], staleness: list[int], rnd: int) -> None:
        cfg = self.cfg
        s = staleness_weight(cfg.staleness)
        state = self.state
        if cfg.async_rule == "fedasync":
            (job,), w = jobs, cfg.async_alpha * s(staleness[0])
            params = {k: (1 - w) * v + w * job.payload[k] for k, v in state.params.items()}
            self.state = replace(state, params=params)
            return
        weights = cap_sample_weights(torch.tensor([j.samples for j in jobs], dtype=torch.float64),
                                     cfg.sample_weight_cap, cfg.max_sample_weight)
        if cfg.weighting == "uniform":
            weights = torch.ones_like(weights)
        scaled = [{k: v * s(tau) for k, v in j.payload.items()} for j, tau in zip(jobs, staleness)]
        aggregate = self.aggregator({"update": tree.nested_stack(scaled)}, weights, None)
        self.state = replace(self.algorithm.server_update(state, aggregate, rnd), stages=state.stages)

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        """The clock, the buffer and (on a virtual clock) the jobs in flight into the server
        state (checkpointed). A deployment's jobs live on the nodes: a resumed server starts
        fresh ones."""
        jobs = self.jobs if self.clients.persistent else []
        extra = {k: v for k, v in self.state.extra.items() if not k.startswith("async/")}
        extra["async/clock"] = torch.tensor([self.clock, self.version, self.events], dtype=torch.float64)
        params = self.state.params
        for name, saved in (("jobs", jobs), ("buffer", self.buffer)):
            extra[f"async/{name}"] = torch.tensor([j.record() for j in saved], dtype=torch.float64).reshape(-1, 7)
            for k, v in params.items():  # untrained jobs: zeros, their "trained" field says so
                extra[f"async/{name}/{k}"] = torch.stack([j.payload[k] if j.trained else torch.zeros_like(v)
                                                          for j in saved]) if saved else v.new_zeros((0, *v.shape))
        for version, model in self.models.items():
            extra.update({f"async/models/{version}/{k}": v.clone() for k, v in model.items()})  # own storage
        self.state = replace(self.state, extra=extra)

    def load(self, extra: dict) -> None:
        self.loaded = True
        if "async/clock" not in extra:
            return
        clock, version, events = extra["async/clock"].tolist()
        self.clock, self.version, self.events = clock, int(version), int(events)
        for name in ("jobs", "buffer"):
            rows = extra[f"async/{name}"].tolist()
            jobs = [Job(int(r[0]), int(r[1]), r[2], r[3], int(r[5]), r[4],
                        {k: extra[f"async/{name}/{k}"][i] for k in self.state.params} if r[6] else None)
                    for i, r in enumerate(rows)]
            setattr(self, name, jobs)
        if not self.clients.persistent:
            self.jobs = []  # a deployment's jobs in flight were lost with the earlier server
        versions = {int(k.split("/")[2]) for k in extra if k.startswith("async/models/")}
        self.models = {v: {k: extra[f"async/models/{v}/{k}"] for k in self.state.params} for v in versions}
