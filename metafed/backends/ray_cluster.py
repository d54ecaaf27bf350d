"""The Ray backend: a round's cohort is cut into parts, and Ray workers (on this machine or
across a cluster) run each part with the vectorized backend.

- **Data travels once.** The clients' training data is packed into three tensors
  (:class:`PackedClients`: all samples [N, ...], their labels [N], per-client offsets
  [clients + 1]) and put into Ray's object store once per run. A worker process fetches
  it on its first task and keeps it (``_WORKER_DATA``); a task then names clients by id and
  carries only their batch schedules and states. Tasks without a client id (evaluation on
  held-out or test data) carry their data with them. A federation whose clients are built on
  demand (:class:`~metafed.data.lazy.LazyClients`, e.g. 10^5 W1 clients) sends its recipe
  instead: each worker builds the clients its parts name, keeping a bounded cache.
- **Parts are balanced.** Clients are sorted by their number of steps and dealt round-robin
  to the parts, so every part has the same mix of long and short clients; inside a part the
  vectorized backend sorts and chunks again.
- **Failures are retried.** A part is a stateless Ray task (``max_retries``): if its worker
  dies mid-round, Ray runs it again elsewhere. Programs are pure and their inputs (schedule,
  state, broadcast) fixed, so the retried result is the same bits.

Results equal the vectorized backend's up to float summation order (tested to 1e-5).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import LocalProgram
from metafed.backends.base import ClientTask
from metafed.backends.vectorized import VectorizedBackend

log = logging.getLogger(__name__)

# per worker process: object-store key -> PackedClients, and (chunk size, compile, device) -> backend
_WORKER_DATA: dict[str, "PackedClients"] = {}
_WORKER_BACKENDS: dict[tuple, VectorizedBackend] = {}


@dataclass(frozen=True)
class PackedClients:
    """Every client's training data in three tensors: x [N, ...], y [N], offsets [clients + 1]
    (client c owns rows offsets[c]:offsets[c + 1]). One object instead of 2 x clients tensors:
    cheap to serialise, and slicing it makes views, not copies."""

    x: Tensor
    y: Tensor
    offsets: Tensor

    @classmethod
    def of(cls, train_x: list[Tensor], train_y: list[Tensor]) -> "PackedClients":
        sizes = torch.tensor([0] + [int(y.shape[0]) for y in train_y], dtype=torch.int64)
        return cls(torch.cat(train_x), torch.cat(train_y), torch.cumsum(sizes, 0))

    def client(self, c: int) -> tuple[Tensor, Tensor]:
        lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
        return self.x[lo:hi], self.y[lo:hi]


def _import_ray():
    try:
        import ray
    except ImportError:
        from metafed.errors import ConfigError

        raise ConfigError("--backend ray needs Ray: pip install 'metafed[ray]'") from None
    return ray


def _run_part(data_ref: list, program: LocalProgram, shared: dict, tasks: list[ClientTask],
              chunk_size: int, compile: bool, device: str = "cpu") -> tuple[dict, Tensor]:
    """One part of a cohort, in a Ray worker. ``data_ref`` is the packed data's ObjectRef
    wrapped in a list, so that Ray does not fetch it for every task: the worker fetches it
    once and keeps it."""
    ray = _import_ray()
    key = data_ref[0].hex()
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()  # one run's data at a time per worker
        _WORKER_DATA[key] = ray.get(data_ref[0])
    data = _WORKER_DATA[key]
    tasks = [replace(t, x=data.client(t.client)[0], y=data.client(t.client)[1]) if t.client is not None else t
             for t in tasks]
    key = (chunk_size, compile, device)
    if key not in _WORKER_BACKENDS:  # "auto" resolves on the worker's machine
        _WORKER_BACKENDS[key] = VectorizedBackend(chunk_size, compile, device=device)
    backend = _WORKER_BACKENDS[key]
    return backend.run(program, shared, tasks)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (Ray itself retries for minutes). Other
    forms ("auto", "ray://...") are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
                           f"running there, and is the port open?)") from None


class RayBackend:
    """Runs each round's client work on Ray workers (see the module docstring).

    packed: the federation's training data (:meth:`PackedClients.of`), put in the object
    store on first use. address: an existing cluster (``ray start --head`` prints it), or
    None to start Ray on this machine with ``workers`` CPUs. workers: parts per round
    (default: the cluster's CPUs). max_retries: how often a part whose worker died is rerun.
    """

    name = "ray"

    def __init__(self, packed: PackedClients, chunk_size: int = 128, compile: bool = False,
                 address: str | None = None, workers: int | None = None, max_retries: int = 3, device: str = "cpu"):
        self.packed, self.device = packed, device
        self.chunk_size, self.compile = chunk_size, compile
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self._data_ref = None
        self._remote = None

    def _connect(self) -> None:
        if self._remote is not None:
            return
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address:
                _check_reachable(self.address)
                try:
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise ConnectionError(f"cannot join the Ray cluster at {self.address}: {e} (a cluster started with "
                                          "RAY_AUTH_MODE=token needs it here too, with the cluster's token in "
                                          "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._data_ref = ray.put(self.packed)
        self._remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(_run_part)
        log.info("ray: %d parts per round on a cluster of %s CPUs", self.workers,
                 int(ray.cluster_resources().get("CPU", 0)))

    def run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]) -> tuple[dict, Tensor]:
        self._connect()
        ray = _import_ray()
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i].active_steps)
        n_parts = max(1, min(self.workers, len(tasks)))
        parts = [order[p::n_parts] for p in range(n_parts)]  # round-robin: each part gets long and short clients
        empty = torch.zeros(0)
        refs = []
        for part in parts:
            # clients the object store knows travel by id; the rest carry their data
            sent = [replace(tasks[i], x=empty, y=empty) if tasks[i].client is not None else tasks[i] for i in part]
            refs.append(self._remote.remote([self._data_ref], program, shared, sent, self.chunk_size, self.compile,
                                            self.device))
        results = ray.get(refs)
        outputs = tree.nested_cat([out for out, _ in results])
        losses = torch.cat([loss for _, loss in results])
        inverse = torch.from_numpy(np.argsort(np.concatenate(parts)))
        return tree.nested_index(outputs, inverse), losses[inverse]


__all__ = ["PackedClients", "RayBackend"]
