"""Per-client persistent state (personal models, residuals, meta-updaters) keyed by client id.
States are nested dicts of tensors. In memory for simulation; serialised to safetensors
inside checkpoints as flat keys ``<client id>/<path>``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metafed import tree


class ClientStore:
    def __init__(self) -> None:
        self._states: dict[int, dict] = {}

    def get(self, client_id: int, default: Callable[[], dict]) -> dict:
        """The client's state, or ``default()`` for a client seen for the first time (not stored)."""
        return self._states.get(client_id) or default()

    def put(self, client_id: int, state: dict) -> None:
        if state:
            self._states[client_id] = tree.nested_map(lambda v: v.detach().clone(), state)

    def __len__(self) -> int:
        return len(self._states)

    def to_tensors(self) -> dict[str, Tensor]:
        return tree.nested_flatten({str(cid): st for cid, st in self._states.items()})

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "ClientStore":
        store = cls()
        store._states = {int(cid): st for cid, st in tree.nested_unflatten(flat).items()}
        return store
