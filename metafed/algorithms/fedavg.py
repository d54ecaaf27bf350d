"""FedAvg and FedProx.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017, arXiv:1602.05629. Local SGD, sample-weighted average.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
  arXiv:1812.06127. The local objective gains mu/2 * ||w - w_global||^2 and stragglers'
  partial work is kept. mu = 0 runs exactly FedAvg's program.
- Server optimizers (FedAvgM, FedAdam, FedYogi) come from ``ServerOptimizer``: Reddi et al.,
  "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
"""
from __future__ import annotations

from typing import Literal
from dataclasses import dataclass


from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, SgdPart
from metafed.algorithms.gradients import grad, sgd_step
from metafed.algorithms.local_opt import LocalOptimizer, LocalSolverSection
from metafed.models import FunctionalModel


@dataclass(frozen=True)
class ProximalSGD:
    """Local SGD on loss(w) + mu/2 ||w - w_global||^2 (the proximal term is skipped when mu == 0,
    so FedProx(mu=0) and FedAvg execute identical operations). ``local_opt`` replaces plain
    SGD with momentum or Adam (:mod:`metafed.algorithms.local_opt`), state fresh each round."""

    model: FunctionalModel
    lr: float
    mu: float = 0.0
    batches_per_step: int = 1
    local_opt: LocalOptimizer | None = None  # None: plain SGD at lr

    @property
    def sgd_parts(self) -> tuple[SgdPart, ...] | None:
        """With plain SGD (no optimizer state) each step is params - lr (grad(mean masked loss)
        + mu (params - shared["params"])) and nothing else: one SGD part, which the fused step
        and the native kernel may run. None with a local optimizer."""
        return (SgdPart("params", self.lr, self.mu),) if self.local_opt is None else None

    def init(self, shared, client):
        if self.local_opt is None:
            return {"params": shared["params"]}
        return {"params": shared["params"], "opt": self.local_opt.init(shared["params"])}

    def step(self, shared, carry, batch):
        anchor = shared["params"]

        def objective(p):
            data_loss = self.model.loss(p, batch["x"][0], batch["y"][0], batch["mask"][0])
            if self.mu == 0.0:
                return data_loss, data_loss
            return data_loss + 0.5 * self.mu * tree.sq_norm(tree.sub(p, anchor)), data_loss

        g, data_loss = grad(objective, has_aux=True)(carry["params"])
        if self.local_opt is None:
            return {"params": sgd_step(carry["params"], g, self.lr)}, data_loss
        params, opt_state = self.local_opt.step(carry["params"], g, carry["opt"])
        return {"params": params, "opt": opt_state}, data_loss

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]), "state": {}}


class FedAvg(FederatedAlgorithm):
    """FedAvg; with ``mu > 0`` FedProx. Reptile-style server steps come from the server
    optimizer's learning rate, not from a separate class."""

    name = "fedavg"
    paper = "McMahan et al., AISTATS 2017 (arXiv:1602.05629)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float, mu: float = 0.0,
                 local_opt: LocalOptimizer | None = None):
        super().__init__(model, server_opt)
        self.lr, self.mu = lr, mu
        self.local_opt = local_opt if local_opt is not None and local_opt.name != "sgd" else None
        if mu > 0:
            self.name, self.paper = "fedprox", "Li et al., MLSys 2020 (arXiv:1812.06127)"
            self.straggler_policy = "keep"

    def client_program(self, rnd: int = 0) -> ProximalSGD:
        return ProximalSGD(self.model, self.lr, self.mu, local_opt=self.local_opt)


class FedAvgSection(LocalSolverSection):
    """FedAvg's parameters (the local solver, where it is free)."""

    name: Literal["fedavg"] = "fedavg"


class FedProxSection(LocalSolverSection):
    """FedProx's parameters."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.0, ge=0, description="FedProx proximal weight")
