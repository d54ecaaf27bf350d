"""Plain local fine-tuning: the baseline personalization any algorithm gets at evaluation."""
from __future__ import annotations

from dataclasses import dataclass

from torch.func import grad

from metafed.models import FunctionalModel


@dataclass(frozen=True)
class FineTune:
    """SGD on the client's train split starting from ``start`` (broadcast params by default,
    or a key of the client state such as a personal model)."""

    model: FunctionalModel
    lr: float
    start: str = "broadcast"
    batches_per_step: int = 1

    def init(self, shared, client):
        params = shared["params"] if self.start == "broadcast" else client["state"][self.start]
        return {"params": params}

    def step(self, shared, carry, batch):
        def loss(p):
            value = self.model.loss(p, batch["x"][0], batch["y"][0], batch["mask"][0])
            return value, value

        g, value = grad(loss, has_aux=True)(carry["params"])
        return {"params": {k: v - self.lr * g[k] for k, v in carry["params"].items()}}, value

    def final(self, shared, carry, client):
        return {"params": carry["params"]}
