"""Plain local fine-tuning: the baseline personalization any algorithm gets at evaluation."""
from __future__ import annotations

from dataclasses import dataclass

from metafed.algorithms.program import SgdPart, grad_and_loss, sgd
from metafed.models import FunctionalModel


@dataclass(frozen=True)
class FineTune:
    """SGD on the client's train split starting from ``start`` (broadcast params by default,
    or a key of the client state such as a personal model)."""

    model: FunctionalModel
    lr: float
    start: str = "broadcast"
    batches_per_step: int = 1

    @property
    def sgd_parts(self) -> tuple[SgdPart, ...]:
        """Plain SGD on ``carry["params"]``: the fused step and the native kernel may run it."""
        return (SgdPart("params", self.lr),)

    def init(self, shared, client):
        params = shared["params"] if self.start == "broadcast" else client["state"][self.start]
        return {"params": params}

    def step(self, shared, carry, batch):
        g, value = grad_and_loss(self.model, carry["params"], batch)
        return {"params": sgd(carry["params"], g, self.lr)}, value

    def final(self, shared, carry, client):
        return {"params": carry["params"]}
