"""pFedMe: Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS 2020, arXiv:2006.08848.

Client i approximately solves the Moreau-envelope inner problem on each minibatch,
    theta_i = argmin_theta f_i(theta) + lambda/2 ||theta - w||^2,
with K gradient steps at the personal learning rate (warm-started from the previous
theta_i), then moves its local model towards it: w <- w - eta * lambda * (w - theta_i).
The server mixes: w <- (1 - beta) w + beta * mean(w_i) = w + beta * mean delta, i.e. the
SGD server optimizer with ``--server-lr`` = beta. theta_i is kept in client state.

Evaluation: ``protocol: paper`` (``personal_eval: stored``) scores the personal model theta_i
as the client's last local training left it, as the paper and its official code do (there
every client trains every round; here a client never sampled scores the global model it
was initialised with). The equal-budget protocol scores theta_i(w): the inner problem
re-solved from the current global model on the client's train split, one solve per
minibatch for ``--personalize-steps`` minibatches. The solve is gradient descent at the
personal rate on f + lambda/2 ||theta - w||^2, stable only for
personal_lr * (L + lambda) < 2: personal_lr * lambda >= 2 is refused up front.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Optional

import torch
from torch.func import grad

from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, MoreauStep, batch_loss
from metafed.models import FunctionalModel
from metafed.types import Params
from metafed.section import Section


def moreau_inner_solve(grad_fn: Callable[[Params], Params], anchor: Params, theta: Params, lam: float, lr: float,
                       steps: int) -> Params:
    """K gradient steps on f(theta) + lam/2 ||theta - anchor||^2 starting at ``theta``."""
    for _ in range(steps):
        g = grad_fn(theta)
        theta = {k: v - lr * (g[k] + lam * (v - anchor[k])) for k, v in theta.items()}
    return theta


@dataclass(frozen=True)
class PFedMeProgram:
    model: FunctionalModel
    lr: float
    personal_lr: float
    lam: float
    inner_steps: int
    batches_per_step: int = 1

    @property
    def moreau_step(self) -> MoreauStep:
        """This step, declared for the native kernel (metafed.algorithms.base.MoreauStep)."""
        return MoreauStep(self.personal_lr, self.lam, self.inner_steps, self.lr)

    def init(self, shared, client):
        return {"params": shared["params"], "personal": client["state"]["personal"],
                "inner_increase": torch.zeros(())}

    def step(self, shared, carry, batch):
        w = carry["params"]
        loss = lambda p: batch_loss(self.model, p, batch, 0)  # noqa: E731
        prox = lambda p: 0.5 * self.lam * tree.sq_norm(tree.sub(p, w))  # noqa: E731
        theta = moreau_inner_solve(grad(loss), w, carry["personal"], self.lam, self.personal_lr, self.inner_steps)
        theta_loss = loss(theta)  # logged below too: one forward pass for both
        # gradient descent at a stable rate never raises the inner objective: a rise means
        # personal_lr * (L + lambda) > 2 for this client's loss (reported, then warned about)
        start = carry["personal"]
        rose = (theta_loss + prox(theta) > loss(start) + prox(start)).to(torch.float32)
        w = {k: v - self.lr * self.lam * (v - theta[k]) for k, v in w.items()}
        return {"params": w, "personal": theta,
                "inner_increase": torch.maximum(carry["inner_increase"], rose.detach())}, theta_loss

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]), "state": {"personal": carry["personal"]},
                "metrics": {"inner_increase": carry["inner_increase"]}}


@dataclass(frozen=True)
class PFedMePersonalize:
    """theta(w): one Moreau inner solve per train minibatch, anchored at the global model."""

    model: FunctionalModel
    personal_lr: float
    lam: float
    inner_steps: int
    batches_per_step: int = 1

    @property
    def moreau_step(self) -> MoreauStep:
        """The personalization solve, declared for the native kernel."""
        return MoreauStep(self.personal_lr, self.lam, self.inner_steps)

    def init(self, shared, client):
        return {"params": shared["params"]}

    def step(self, shared, carry, batch):
        loss = lambda p: batch_loss(self.model, p, batch, 0)  # noqa: E731
        theta = moreau_inner_solve(grad(loss), shared["params"], carry["params"], self.lam, self.personal_lr,
                                   self.inner_steps)
        return {"params": theta}, loss(theta)

    def final(self, shared, carry, client):
        return {"params": carry["params"]}


class PFedMe(FederatedAlgorithm):
    keeps_personal_model = True
    name = "pfedme"
    paper = "Dinh et al., NeurIPS 2020 (arXiv:2006.08848)"
    straggler_policy = "keep"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float, personal_lr: float,
                 lam: float, inner_steps: int):
        super().__init__(model, server_opt)
        self.program = PFedMeProgram(model, lr, personal_lr, lam, inner_steps)

    def client_init(self, broadcast: dict) -> dict:
        return {"personal": broadcast["params"]}

    def client_program(self, rnd: int = 0) -> PFedMeProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> PFedMePersonalize:
        p = self.program
        return PFedMePersonalize(self.model, p.personal_lr, p.lam, p.inner_steps)


class PFedMeSection(Section):
    """pFedMe's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"lam": "pfedme_lambda", "steps": "pfedme_steps"}

    name: Literal["pfedme"] = "pfedme"
    lam: float = Field(15.0, gt=0,
        description="pFedMe: lambda, the pull of the personal model to the global one", alias='lambda')
    steps: int = Field(5, ge=1, description="K: inner steps of the Moreau-envelope solve")
    personal_lr: Optional[float] = Field(None, gt=0, description="pFedMe / Ditto personal rate (default lr)")
