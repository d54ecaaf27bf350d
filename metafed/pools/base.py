"""The contract between the round loop and the clients, wherever they run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import LocalProgram, ServerState
from metafed.client.reply import upload_of
from metafed.client_store import ClientStore
from metafed.privacy.upload import UploadTransform

if TYPE_CHECKING:
    from metafed.asynchrony import AsyncClients


@dataclass
class RoundReplies:
    """What the clients of one round sent back, in reply order.

    ids: client ids; outputs: the program's ``final`` outputs stacked [C, ...] (``update``
    and anything else uploaded, ``state`` only where the pool keeps states server-side,
    ``metrics``); losses: mean training loss per client [C]; num_samples: the sample counts
    clients report [C] (untrusted: the round loop caps them)."""

    ids: list[int]
    outputs: dict
    losses: Tensor
    num_samples: Tensor

    @classmethod
    def empty(cls) -> "RoundReplies":
        return cls([], {}, torch.zeros(0), torch.zeros(0, dtype=torch.float64))

    @property
    def upload(self) -> dict:
        """What the clients uploaded, stacked [C, ...] (empty where secure aggregation keeps the
        uploads on the clients until they are masked)."""
        return upload_of(self.outputs)

    @property
    def state(self) -> dict:
        """The clients' new persistent states [C, ...] (only where the pool keeps them server-side)."""
        return self.outputs.get("state", {})

    @property
    def metrics(self) -> dict:
        """Per-client numbers reported beside the upload, each [C] (never aggregated)."""
        return self.outputs.get("metrics", {})


def zero_rows(outputs: dict) -> dict:
    """Zero-row copies [0, ...] of what clients upload (``state`` and ``metrics`` stay home):
    the shapes of a message without holding any client's values."""
    uploaded = upload_of(outputs)
    return tree.nested_map(lambda v: v.new_zeros((0, *v.shape[1:])), uploaded)


class ClientPool(Protocol):
    """Where the clients live, as the round drivers see them: everything a driver asks of
    clients goes through these methods, in simulation (:class:`~metafed.pools.simulation.
    SimulationPool`) and in deployment (:class:`~metafed.deploy.pool.FlowerPool`) alike."""

    num_clients: int  # training clients (held-out ones never train)
    clients: ClientStore  # personal states kept server-side (empty where the nodes keep their own)

    def train(self, rnd: int, cohort: np.ndarray, program: LocalProgram, broadcast: dict,
              upload: UploadTransform | None = None, downlink=None) -> RoundReplies:
        """Ask the ``cohort`` (client ids) to run ``program`` from ``broadcast``; return who
        replied. ``upload``: the clients' own upload stage (local DP: clip and noise on the
        client); ``downlink``: the compressed broadcast each client rebuilds its model from."""
        ...

    def keep_states(self, ids: list[int], states: dict, accepted: Tensor) -> None:
        """Persist the personal states of clients whose reply the server accepted (a no-op
        where clients keep their own state, as in deployment)."""
        ...

    def label_counts(self, ids: list[int]) -> Tensor:
        """[C, K] training samples per class of clients ``ids`` (attention score ``labels``)."""
        ...

    def message_template(self, rnd: int, program: LocalProgram, broadcast: dict) -> dict:
        """Zero-row stacked outputs with the shapes clients upload (a round without replies
        still needs them to release DP noise)."""
        ...

    def secure_sum(self, rnd: int, run_id: bytes, cohort: list[int], ids: list[int], rows: dict | None,
                   transform: UploadTransform, weighting: str | None) -> tuple[dict, list[int]]:
        """Secure aggregation over the round's ``cohort``: the clients ``ids`` finish their
        uploads (``transform``, their own weight under ``weighting``), mask them and the
        server learns the survivors' sum only. Returns (sum, survivors)."""
        ...

    def evaluate(self, rnd: int, state: ServerState) -> tuple[dict, dict]:
        """Federated evaluation of the server state: clients score on their own test data.
        Returns (metrics, per-client lists, possibly empty)."""
        ...

    def async_clients(self) -> "AsyncClients":
        """The clients seen asynchronously (``--mode async``): submit jobs, poll arrivals."""
        ...

    def deliver_receipts(self, rnd: int, entries: list[dict], public_key: str) -> None:
        """Hand each client its signed ledger entry of round ``rnd`` (``--contribution``)."""
        ...
