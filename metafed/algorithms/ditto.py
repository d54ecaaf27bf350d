"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv:2012.04221.

Each local step does two things on the same minibatch: the global part (plain local SGD on
w, as FedAvg) and the personal part, v <- v - eta_p * (grad f(v) + lambda * (v - w_global))
with w_global the model received this round. v is kept in client state; lambda = 0 makes v
purely local training.

Evaluation: ``protocol: paper`` (``personal_eval: stored``) scores the stored v_i exactly as
local training left it (the paper's Section 5); the equal-budget protocol continues the
personal objective from the stored v_i for ``--personalize-steps`` steps, then scores it.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional
from dataclasses import dataclass


from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, SgdPart, grad_and_loss, sgd
from metafed.models import FunctionalModel
from metafed.section import Section


def personal_step(model: FunctionalModel, v, w_global, batch, lam: float, lr: float):
    """One step on f(v) + lam/2 ||v - w_global||^2; returns (v, data loss at v)."""
    g, value = grad_and_loss(model, v, batch)
    if lam:
        g = {k: g[k] + lam * (v[k] - w_global[k]) for k in g}
    return sgd(v, g, lr), value


@dataclass(frozen=True)
class DittoProgram:
    model: FunctionalModel
    lr: float
    personal_lr: float
    lam: float
    batches_per_step: int = 1

    @property
    def sgd_parts(self) -> tuple[SgdPart, ...]:
        """Both models take plain SGD steps on the same batch, independent given the round's
        global model: the vectorized backend may run them with its native kernel."""
        return SgdPart("params", self.lr), SgdPart("personal", self.personal_lr, self.lam)

    def init(self, shared, client):
        return {"params": shared["params"], "personal": client["state"]["personal"]}

    def step(self, shared, carry, batch):
        g, value = grad_and_loss(self.model, carry["params"], batch)
        v, _ = personal_step(self.model, carry["personal"], shared["params"], batch, self.lam, self.personal_lr)
        return {"params": sgd(carry["params"], g, self.lr), "personal": v}, value

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]), "state": {"personal": carry["personal"]}}


@dataclass(frozen=True)
class DittoPersonalize:
    model: FunctionalModel
    personal_lr: float
    lam: float
    batches_per_step: int = 1

    @property
    def sgd_parts(self) -> tuple[SgdPart, ...]:
        """The personal objective's plain SGD steps (see DittoProgram.sgd_parts)."""
        return (SgdPart("params", self.personal_lr, self.lam),)

    def init(self, shared, client):
        return {"params": client["state"]["personal"]}

    def step(self, shared, carry, batch):
        v, value = personal_step(self.model, carry["params"], shared["params"], batch, self.lam, self.personal_lr)
        return {"params": v}, value

    def final(self, shared, carry, client):
        return {"params": carry["params"]}


class Ditto(FederatedAlgorithm):
    keeps_personal_model = True
    name = "ditto"
    paper = "Li et al., ICML 2021 (arXiv:2012.04221)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float, personal_lr: float, lam: float):
        super().__init__(model, server_opt)
        self.program = DittoProgram(model, lr, personal_lr, lam)

    def client_init(self, broadcast: dict) -> dict:
        return {"personal": broadcast["params"]}

    def client_program(self, rnd: int = 0) -> DittoProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> DittoPersonalize:
        return DittoPersonalize(self.model, self.program.personal_lr, self.program.lam)


class DittoSection(Section):
    """Ditto's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"lam": "ditto_lambda"}

    name: Literal["ditto"] = "ditto"
    lam: float = Field(0.1, ge=0,
        description="Ditto: lambda, the pull of the personal model to the global one", alias='lambda')
    personal_lr: Optional[float] = Field(None, gt=0, description="pFedMe / Ditto personal rate (default lr)")
