"""The meta-updater method (metafed seed document 000, sections 3-4), made concrete.

The seed fixes: each client i keeps a personalized model theta_i and a meta-updater u_i
(a tensor per parameter); u_i is trained by gradient descent on the meta-loss
L(theta_i - alpha * u_i; D_i^val) over a validation split of the client's training data;
the server aggregates u_g = sum_i n_i/n u_i (or by attention) and updates the global
model with it; clients personalize with u_g. What the seed leaves open, and what we chose:

1. Validation split. A sample of the client's train split is validation data when its
   index is divisible by ``val_period`` (5 -> 20 %). Train splits are shuffled when they
   are made, so this is a random, disjoint and stable split. Each local step takes two
   full minibatches: the first drawn only from the train part (it trains theta_i), the
   second only from the validation part (the meta-loss), through ``index_pools``. (Drawing
   both from all samples and masking threw away about half of each batch and left the
   meta-gradient zero whenever a batch held no validation sample.)
2. What u_i must do. u_i proposes a starting point theta_i - alpha * u_i from which one
   local SGD step (lr beta) on train data lands where validation loss is low:
       meta-loss(u) = L_val(s - beta * grad L_train(s)),   s = theta_i - alpha * u.
   This is a learned update in the sense of learning-to-learn: u moves the model where a
   step of local training generalises. ``order="second"`` differentiates through the
   inner step (Hessian-vector products); ``order="first"`` detaches the inner gradient
   (d meta-loss / du = -alpha * grad L_val). Without the inner step the loss would be
   plain training of theta - alpha*u and the aggregate would collapse to FedAvg.
3. theta_i. Each round it is re-anchored, theta_i <- (1 - mix) theta_i + mix * w, and
   trained by local SGD on its train-part samples; u_i likewise starts from
   (1 - mix) u_i + mix * u_g, so clients share what they learn through u_g.
4. Server. u_g = aggregate of the u_i (sample-weighted mean, or ``--aggregator attention``
   scored by each client's final meta-loss); w <- w - alpha * u_g through the server
   optimizer (``--server-lr`` scales the step, Adam/Yogi apply). u_g is broadcast.
5. Personalization (evaluation, any client incl. new ones): start from
   (1 - mix) theta_i + mix * w - alpha * u_g, then K SGD steps (lr beta) on train data.

``--meta-formulation delta`` is the document's formulation as written (its sections 3.2 and
4.1): u_i is derived from the client's model change and refined on the validation
meta-loss. Each local step trains theta_i on a train batch and takes a gradient step on a
correction c_i (from 0) of the meta-loss L(theta_i - alpha * c_i; D_val) on a validation
batch; the upload is
    u_i = -(theta_i - w) / alpha + c_i,   so that   w - alpha * u_i = theta_i - alpha * c_i,
the validated personal model: the server's w <- w - alpha * u_g (u_g = sum n_i/n u_i, or
attention) moves w to the mean of the clients' validated models. theta_i starts each round
re-anchored as in 3. Personalization starts from (1 - mix) theta_i + mix * w, u_g being
already part of w, then K SGD steps. The default formulation (``learned-step``) is the one
above, where u_i is a learned step that local training generalises from.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad

from pydantic import Field

from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, ServerState, batch_loss, grad_and_loss, sgd
from metafed.models import FunctionalModel
from metafed.types import Params
from metafed.section import Section


def _mix(a: Params, b: Params, weight_b: float) -> Params:
    return {k: (1 - weight_b) * a[k] + weight_b * b[k] for k in a}


@dataclass(frozen=True)
class MetaUpdaterProgram:
    model: FunctionalModel
    lr: float  # beta: local SGD on theta and the inner step of the meta-loss
    meta_lr: float  # eta: gradient descent on u
    alpha: float
    mix: float
    val_period: int
    second_order: bool
    batches_per_step: int = 2

    def init(self, shared, client):
        st = client["state"]
        return {"personal": _mix(st["personal"], shared["params"], self.mix),
                "meta": _mix(st["meta"], shared["meta"], self.mix),
                "val_loss": torch.zeros(())}

    def index_pools(self, n: int) -> list[np.ndarray]:
        """Batch 0 of a step draws from the train part, batch 1 from the validation part."""
        idx = np.arange(n)
        return [idx[idx % self.val_period != 0], idx[idx % self.val_period == 0]]

    def step(self, shared, carry, batch):
        train_loss = lambda p: batch_loss(self.model, p, batch, 0)  # noqa: E731
        theta = carry["personal"]
        g_theta, value = grad_and_loss(self.model, theta, batch, 0)

        def meta_loss(u):
            start = sgd(theta, u, self.alpha)
            g = grad(train_loss)(start)
            if not self.second_order:
                g = {k: v.detach() for k, v in g.items()}
            loss = batch_loss(self.model, sgd(start, g, self.lr), batch, 1)
            return loss, loss

        g_u, m_loss = grad(meta_loss, has_aux=True)(carry["meta"])
        return {"personal": sgd(theta, g_theta, self.lr), "meta": sgd(carry["meta"], g_u, self.meta_lr),
                "val_loss": m_loss}, value

    def final(self, shared, carry, client):
        return {"update": carry["meta"], "state": {"personal": carry["personal"], "meta": carry["meta"]},
                "metrics": {"val_loss": carry["val_loss"]}}


@dataclass(frozen=True)
class DeltaMetaUpdaterProgram(MetaUpdaterProgram):
    """The document's formulation: u_i from the model change, refined on the validation
    meta-loss L(theta_i - alpha * c_i; D_val) (see the module docstring)."""

    def init(self, shared, client):
        personal = _mix(client["state"]["personal"], shared["params"], self.mix)
        return {"personal": personal, "meta": {k: torch.zeros_like(v) for k, v in personal.items()},
                "val_loss": torch.zeros(())}

    def step(self, shared, carry, batch):
        g_theta, value = grad_and_loss(self.model, carry["personal"], batch, 0)
        theta = sgd(carry["personal"], g_theta, self.lr)

        def meta_loss(c):
            loss = batch_loss(self.model, sgd(theta, c, self.alpha), batch, 1)
            return loss, loss

        g_c, m_loss = grad(meta_loss, has_aux=True)(carry["meta"])
        return {"personal": theta, "meta": sgd(carry["meta"], g_c, self.meta_lr), "val_loss": m_loss}, value

    def final(self, shared, carry, client):
        theta, w = carry["personal"], shared["params"]
        u = {k: (w[k] - theta[k]) / self.alpha + carry["meta"][k] for k in theta}
        return {"update": u, "state": {"personal": theta, "meta": u}, "metrics": {"val_loss": carry["val_loss"]}}


@dataclass(frozen=True)
class MetaUpdaterPersonalize:
    model: FunctionalModel
    lr: float
    alpha: float
    mix: float
    apply_meta: bool = True  # learned-step: start at ... - alpha * u_g; delta: u_g is already in w
    batches_per_step: int = 1

    def init(self, shared, client):
        start = _mix(client["state"]["personal"], shared["params"], self.mix)
        return {"params": sgd(start, shared["meta"], self.alpha) if self.apply_meta else start}

    def step(self, shared, carry, batch):
        g, value = grad_and_loss(self.model, carry["params"], batch)
        return {"params": sgd(carry["params"], g, self.lr)}, value

    def final(self, shared, carry, client):
        return {"params": carry["params"]}


class MetaUpdater(FederatedAlgorithm):
    keeps_personal_model = True
    name = "meta-updater"
    paper = "metafed seed document 000, sections 3-4 (design choices in the module docstring)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float, meta_lr: float, alpha: float,
                 mix: float = 0.5, val_period: int = 5, second_order: bool = False, formulation: str = "learned-step"):
        super().__init__(model, server_opt)
        if val_period < 2:
            raise ValueError("meta-updater val_period must be >= 2 (1 / validation fraction)")
        if formulation not in ("learned-step", "delta"):
            raise ValueError(f"unknown meta-updater formulation {formulation!r}; choose learned-step or delta")
        self.formulation = formulation
        program = DeltaMetaUpdaterProgram if formulation == "delta" else MetaUpdaterProgram
        self.program = program(model, lr, meta_lr, alpha, mix, val_period, second_order)

    def init(self, params: Params) -> ServerState:
        state = super().init(params)
        return ServerState(state.params, state.opt_state, {f"meta.{k}": torch.zeros_like(v) for k, v in params.items()})

    def broadcast(self, state: ServerState, rnd: int) -> dict:
        return {"params": state.params, "meta": {k[5:]: v for k, v in state.extra.items() if k.startswith("meta.")}}

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        u_g = aggregate["update"]
        step = {k: -self.program.alpha * v for k, v in u_g.items()}
        params, opt_state = self.server_opt.step(state.params, step, state.opt_state)
        return ServerState(params, opt_state, {**state.extra, **{f"meta.{k}": v for k, v in u_g.items()}})

    def client_init(self, broadcast: dict) -> dict:
        return {"personal": broadcast["params"], "meta": broadcast["meta"]}

    def client_program(self, rnd: int = 0) -> MetaUpdaterProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> MetaUpdaterPersonalize:
        p = self.program
        return MetaUpdaterPersonalize(self.model, p.lr, p.alpha, p.mix, apply_meta=self.formulation != "delta")


class MetaUpdaterSection(Section):
    """The meta-updater's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"alpha": "meta_alpha", "mix": "meta_mix", "val_period": "meta_val_period", "order": "meta_order", "formulation": "meta_formulation"}

    name: Literal["meta-updater"] = "meta-updater"
    alpha: float = Field(1.0, gt=0, description="meta-updater: step size alpha in theta - alpha*u")
    meta_lr: Optional[float] = Field(None, gt=0, description="meta-updater: learning rate of u (default lr)")
    mix: float = Field(0.5, ge=0, le=1, description="meta-updater: pull of theta_i, u_i towards w, u_g")
    val_period: int = Field(5, ge=2, description="meta-updater: every n-th train sample is validation")
    order: Literal["first", "second"] = Field("first",
        description="meta-updater: first- or second-order meta-gradient")
    formulation: Literal["learned-step", "delta"] = Field(
        "learned-step", description="meta-updater: learned-step (u_i a learned step local training generalises "
        "from) or delta (the seed document as written: u_i from the model change, refined on the validation loss)")
