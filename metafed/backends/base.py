"""What a backend is given: one task per client, and the contract it must honour."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from metafed.algorithms.base import LocalProgram


@dataclass(frozen=True)
class ClientTask:
    """One client's local work in one call.

    x, y: the client's training data [n, ...], [n]. schedule: sample indices [S, k, B], -1 = padding.
    active_steps: steps actually run (< S for a straggler); steps after it change nothing.
    inputs: per-client program inputs ({"state": ..., "num_samples": ...}).
    client: the training client's id when x, y are its training data (a backend that holds
    the data elsewhere, like Ray's object store, may look it up instead of shipping it).
    """

    x: Tensor
    y: Tensor
    schedule: np.ndarray
    active_steps: int
    inputs: dict
    client: int | None = None


class Backend(Protocol):
    name: str

    def run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]) -> tuple[dict, Tensor]:
        """Run ``program`` for every task; returns (outputs stacked [C, ...] in task order,
        mean training loss over each client's active steps [C])."""
        ...


def step_batch(x: Tensor, y: Tensor, idx: Tensor) -> dict:
    """Gather one step's batches from a client's data. idx [..., k, B] (-1 = padding)."""
    safe = idx.clamp_min(0)
    return {"x": x[safe], "y": y[safe], "mask": (idx >= 0).to(torch.float32)}
