"""Per-FedAvg: Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020, arXiv:2002.07948.

Local step on independent batches D, D' (and D'' for HF), Algorithm 1 of the paper:
  temp = w - alpha * grad f(w; D)
  FO:  w <- w - beta * grad f(temp; D')
  HF:  w <- w - beta * (I - alpha * H(w; D'')) grad f(temp; D')
The Hessian-vector product H(w; D'') v is one forward-over-reverse ``jvp(grad(f), w, v)``:
no Hessian is formed. Personalization (evaluation): SGD steps with lr alpha from w.

Protocol: ``protocol: paper`` averages the local models uniformly (the paper's
w = 1/(rn) sum w_i) and evaluates after exactly one SGD step at alpha on the client's train
data (Section 5); the equal-budget protocol adapts ``--personalize-steps`` steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

from torch import Tensor
from torch.func import grad, jvp

from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, FirstOrderMetaStep, batch_loss, sgd
from metafed.algorithms.finetune import FineTune
from metafed.models import FunctionalModel
from metafed.types import Params
from metafed.section import Section


def hessian_vector_product(loss: Callable[[Params], Tensor], params: Params, vector: Params) -> Params:
    """H(params) @ vector for a scalar ``loss``, via forward-mode over reverse-mode."""
    return jvp(grad(loss), (params,), (vector,))[1]


@dataclass(frozen=True)
class PerFedAvgProgram:
    model: FunctionalModel
    alpha: float
    beta: float
    hessian_free: bool = False

    @property
    def batches_per_step(self) -> int:
        return 3 if self.hessian_free else 2

    @property
    def first_order_meta(self) -> FirstOrderMetaStep | None:
        """FO's step is a first-order meta step with one inner step (the native kernel may
        run it); HF's Hessian-vector product is not."""
        return None if self.hessian_free else FirstOrderMetaStep(self.alpha, 1, self.beta)

    def init(self, shared, client):
        return {"params": shared["params"]}

    def step(self, shared, carry, batch):
        w = carry["params"]
        loss = lambda j: (lambda p: batch_loss(self.model, p, batch, j))  # noqa: E731
        temp = sgd(w, grad(loss(0))(w), self.alpha)
        g, outer_loss = grad(lambda p: (loss(1)(p),) * 2, has_aux=True)(temp)
        if self.hessian_free:
            hv = hessian_vector_product(loss(2), w, g)
            g = {k: g[k] - self.alpha * hv[k] for k in g}
        return {"params": sgd(w, g, self.beta)}, outer_loss

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]), "state": {}}


class PerFedAvg(FederatedAlgorithm):
    paper = "Fallah et al., NeurIPS 2020 (arXiv:2002.07948)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, alpha: float, beta: float,
                 hessian_free: bool):
        super().__init__(model, server_opt)
        self.name = "per-fedavg-hf" if hessian_free else "per-fedavg-fo"
        self.program = PerFedAvgProgram(model, alpha, beta, hessian_free)

    def client_program(self, rnd: int = 0) -> PerFedAvgProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> FineTune:
        return FineTune(self.model, self.program.alpha)


class PerFedAvgFOSection(Section):
    """Per-FedAvg (first order)'s parameters."""

    FLAT: ClassVar[dict[str, str]] = {"alpha": "inner_lr"}

    name: Literal["per-fedavg-fo"] = "per-fedavg-fo"
    alpha: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")


class PerFedAvgHFSection(Section):
    """Per-FedAvg (Hessian-free)'s parameters."""

    FLAT: ClassVar[dict[str, str]] = {"alpha": "inner_lr"}

    name: Literal["per-fedavg-hf"] = "per-fedavg-hf"
    alpha: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")
