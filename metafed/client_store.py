"""Per-client persistent state (personal models, residuals, meta-updaters) keyed by client id.
In memory for simulation; serialised to safetensors inside checkpoints."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from metafed.types import TensorDict


class ClientStore:
    def __init__(self) -> None:
        self._states: dict[int, TensorDict] = {}

    def get(self, client_id: int, default: Callable[[], TensorDict]) -> TensorDict:
        """The client's state, or ``default()`` for a client seen for the first time (not stored)."""
        return self._states.get(client_id) or default()

    def put(self, client_id: int, state: TensorDict) -> None:
        if state:
            self._states[client_id] = {k: v.detach().clone() for k, v in state.items()}

    def __len__(self) -> int:
        return len(self._states)

    def to_tensors(self) -> dict[str, Tensor]:
        return {f"{cid}/{k}": v for cid, st in self._states.items() for k, v in st.items()}

    @classmethod
    def from_tensors(cls, flat: dict[str, Tensor]) -> "ClientStore":
        store = cls()
        for key, v in flat.items():
            cid, name = key.split("/", 1)
            store._states.setdefault(int(cid), {})[name] = v
        return store
