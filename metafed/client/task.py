"""A client's task for one round, built purely from what the client holds: its data, its
persistent state, the round's program and the local work the round asks for. The same
function builds the simulation's tasks and a deployed node's, so both train on exactly the
same batches (``default_rng([seed, 3, round, client])``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from metafed.algorithms.base import FederatedAlgorithm, LocalProgram
from metafed.backends.base import ClientTask
from metafed.data.federated import ClientData
from metafed.data.schedule import program_schedule

if TYPE_CHECKING:
    from metafed.config import RunConfig

# the seeded stream of every client's batch order
BATCH_STREAM = 3


@dataclass(frozen=True)
class LocalWork:
    """How much local work round ``rnd`` asks of a client: ``epochs`` passes (or ``steps``
    steps when set) of ``batch_size`` minibatches, batch order seeded by ``seed``."""

    batch_size: int
    epochs: int
    steps: int | None
    seed: int

    @classmethod
    def of_round(cls, cfg: "RunConfig", algorithm: FederatedAlgorithm, rnd: int) -> "LocalWork":
        """The configured work, or the algorithm's own for this round (Personalized FedAvg's stages)."""
        epochs, steps = algorithm.local_work(rnd) or (cfg.local_epochs, cfg.local_steps)
        return cls(cfg.batch_size, epochs, steps, cfg.seed)


def make_task(data: ClientData, cid: int, rnd: int, program: LocalProgram, state: dict, work: LocalWork) -> ClientTask:
    """Client ``cid``'s task in round ``rnd``: its training data, its seeded batch schedule
    [S, k, B] and its persistent state. Pure: the same inputs give the same task anywhere."""
    sched = program_schedule(program, data.num_train, batch_size=work.batch_size, epochs=work.epochs,
                             steps=work.steps, rng=np.random.default_rng([work.seed, BATCH_STREAM, rnd, cid]))
    inputs = {"state": state, "num_samples": torch.tensor(float(data.num_train))}
    return ClientTask(data.train_x, data.train_y, sched, len(sched), inputs, client=cid)
