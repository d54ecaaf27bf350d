"""MAML-based federated learning (FedMeta-MAML) and its first-order variant.

- MAML: Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
  ICML 2017, arXiv:1703.03400.
- FedMeta: Chen et al., "Federated Meta-Learning with Fast Convergence and Efficient
  Communication", 2018, arXiv:1802.07876 (the MAML variant of FedMeta).

Each local step takes a support and a query minibatch: ``inner_steps`` SGD steps (lr alpha)
on the support, the loss of the adapted model on the query, and a meta step (lr beta) on
the initialisation. ``maml`` differentiates through the inner steps (the true second-order
meta-gradient); ``fomaml`` drops the second-order terms (gradient of the query loss at the
adapted point). The client sends its initialisation delta; the server averages and applies
its optimizer. Personalization: SGD with lr alpha from the global initialisation.

Protocol: the default (equal-budget) runs the configured local work as several local
meta-steps with delta averaging, and evaluates after ``--personalize-steps`` steps.
``protocol: paper`` is FedMeta's Algorithm 1: one episode per client per round, the client
sends its meta-gradient (``lr: 1``, one step), the server averages and applies Adam, and
evaluation adapts with ``inner_steps`` steps, the number training optimised for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor
from torch.func import grad

from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, FirstOrderMetaStep, batch_loss, sgd
from metafed.algorithms.finetune import FineTune
from metafed.models import FunctionalModel
from metafed.types import Params
from metafed.section import Section

# loss_fn(params, j): loss on minibatch j of the step (0 = support, 1 = query)
LossFn = Callable[[Params, int], Tensor]


def adapt(loss_fn: LossFn, params: Params, inner_lr: float, inner_steps: int, first_order: bool) -> Params:
    """Inner loop on the support batch. With ``first_order`` the inner gradients are
    detached, so d(adapted)/d(params) = I."""
    for _ in range(inner_steps):
        g = grad(lambda p: loss_fn(p, 0))(params)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = sgd(params, g, inner_lr)
    return params


def meta_gradient(loss_fn: LossFn, params: Params, inner_lr: float, inner_steps: int,
                  first_order: bool) -> tuple[Params, Tensor]:
    """(d query_loss(adapt(params)) / d params, query loss)."""

    def meta_loss(p):
        q = loss_fn(adapt(loss_fn, p, inner_lr, inner_steps, first_order), 1)
        return q, q

    return grad(meta_loss, has_aux=True)(params)


@dataclass(frozen=True)
class MAMLProgram:
    model: FunctionalModel
    inner_lr: float
    meta_lr: float
    inner_steps: int = 1
    first_order: bool = False
    batches_per_step: int = 2

    @property
    def first_order_meta(self) -> FirstOrderMetaStep | None:
        """FOMAML's step is a plain first-order meta step (the native kernel may run it)."""
        return FirstOrderMetaStep(self.inner_lr, self.inner_steps, self.meta_lr) if self.first_order else None

    def init(self, shared, client):
        return {"params": shared["params"]}

    def step(self, shared, carry, batch):
        g, query_loss = meta_gradient(lambda p, j: batch_loss(self.model, p, batch, j), carry["params"],
                                      self.inner_lr, self.inner_steps, self.first_order)
        return {"params": sgd(carry["params"], g, self.meta_lr)}, query_loss

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]), "state": {}}


class MAML(FederatedAlgorithm):
    paper = "Finn et al., ICML 2017 (arXiv:1703.03400); Chen et al. 2018 (arXiv:1802.07876)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, meta_lr: float, inner_lr: float,
                 inner_steps: int = 1, first_order: bool = False):
        super().__init__(model, server_opt)
        self.name = "fomaml" if first_order else "maml"
        self.program = MAMLProgram(model, inner_lr, meta_lr, inner_steps, first_order)

    def client_program(self, rnd: int = 0) -> MAMLProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> FineTune:
        return FineTune(self.model, self.program.inner_lr)


class MAMLSection(Section):
    """MAML's parameters."""

    name: Literal["maml"] = "maml"
    inner_lr: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")
    inner_steps: int = Field(1, ge=1, description="MAML inner SGD steps on the support batch")


class FOMAMLSection(Section):
    """First-order MAML's parameters."""

    name: Literal["fomaml"] = "fomaml"
    inner_lr: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")
    inner_steps: int = Field(1, ge=1, description="MAML inner SGD steps on the support batch")
