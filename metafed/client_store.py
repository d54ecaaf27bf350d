"""Per-client persistent state (personal models, residuals, meta-updaters) keyed by client id.
States are nested dicts of tensors. In memory for simulation; serialised to safetensors
inside checkpoints as flat keys ``<client id>/<path>``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metafed import tree


# state the client keeps for the pipeline, not for its algorithm's program (which never sees it)
PRIVATE_KEYS = ("ef_residual",)


class ClientStore:
    def __init__(self) -> None:
        self._states: dict[int, dict] = {}

    def get(self, client_id: int, default: Callable[[], dict]) -> dict:
        """The client's algorithm state, or ``default()`` for a client seen for the first time
        (not stored). Pipeline entries (``PRIVATE_KEYS``) are left out: see :meth:`private`."""
        state = {k: v for k, v in self._states.get(client_id, {}).items() if k not in PRIVATE_KEYS}
        return state or default()

    def put(self, client_id: int, state: dict) -> None:
        """Store the client's algorithm state; its pipeline entries are kept."""
        kept = {k: v for k, v in self._states.get(client_id, {}).items() if k in PRIVATE_KEYS}
        state = {k: v for k, v in state.items() if k not in PRIVATE_KEYS}
        if state or kept:
            self._states[client_id] = {**tree.nested_map(lambda v: v.detach().clone(), state), **kept}

    def private(self, client_id: int, key: str):
        """A pipeline entry of the client's state (e.g. its error-feedback residual), or None."""
        return self._states.get(client_id, {}).get(key)

    def put_private(self, client_id: int, key: str, value: Tensor) -> None:
        self._states.setdefault(client_id, {})[key] = value.detach().clone()

    def __len__(self) -> int:
        return len(self._states)

    def to_tensors(self) -> dict[str, Tensor]:
        return tree.nested_flatten({str(cid): st for cid, st in self._states.items()})

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "ClientStore":
        store = cls()
        store._states = {int(cid): st for cid, st in tree.nested_unflatten(flat).items()}
        return store
