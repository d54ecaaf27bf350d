"""FedMeta with Meta-SGD: per-parameter inner learning rates learned with the initialisation.

- Meta-SGD: Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017,
  arXiv:1707.09835.
- FedMeta: Chen et al., "Federated Meta-Learning with Fast Convergence and Efficient
  Communication", 2018, arXiv:1802.07876.

Adaptation is theta' = theta - lrs * grad L_support(theta) with ``lrs`` a tensor per
parameter. The meta-loss L_query(theta') is differentiated w.r.t. both theta (second order)
and lrs (d theta'/d lrs = -grad L_support, exact). The broadcast carries the params and the
lrs; clients return deltas of both; the server applies its optimizer to both jointly, as
Meta-SGD meta-learns (theta, alpha) with one optimizer (its Algorithm 1, Adam in the paper's
experiments).

Protocol: ``protocol: paper`` is FedMeta's (one episode per client per round, the
meta-gradients averaged and applied by Adam at the server) and evaluates after one
adaptation step, the step the rates were learned for. The equal-budget protocol adapts
with ``--personalize-steps`` steps at the learned rates.
"""
from __future__ import annotations

from typing import Literal
from dataclasses import dataclass

import torch
from torch.func import grad

from pydantic import Field

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, ServerState, batch_loss, grad_and_loss, sgd
from metafed.models import FunctionalModel
from metafed.types import Params
from metafed.section import Section


@dataclass(frozen=True)
class MetaSGDProgram:
    model: FunctionalModel
    meta_lr: float
    batches_per_step: int = 2

    def init(self, shared, client):
        return {"params": shared["params"], "lrs": shared["lrs"]}

    def step(self, shared, carry, batch):
        def meta_loss(p, lrs):
            g = grad(lambda q: batch_loss(self.model, q, batch, 0))(p)
            value = batch_loss(self.model, sgd(p, g, lrs), batch, 1)
            return value, value

        (g_params, g_lrs), query_loss = grad(meta_loss, argnums=(0, 1), has_aux=True)(carry["params"], carry["lrs"])
        return {"params": sgd(carry["params"], g_params, self.meta_lr),
                "lrs": sgd(carry["lrs"], g_lrs, self.meta_lr)}, query_loss

    def final(self, shared, carry, client):
        return {"update": tree.sub(carry["params"], shared["params"]),
                "lr_update": tree.sub(carry["lrs"], shared["lrs"]), "state": {}}


@dataclass(frozen=True)
class MetaSGDAdapt:
    """Evaluation-time adaptation with the learned per-parameter rates."""

    model: FunctionalModel
    batches_per_step: int = 1

    def init(self, shared, client):
        return {"params": shared["params"]}

    def step(self, shared, carry, batch):
        g, value = grad_and_loss(self.model, carry["params"], batch)
        return {"params": sgd(carry["params"], g, shared["lrs"])}, value

    def final(self, shared, carry, client):
        return {"params": carry["params"]}


class MetaSGD(FederatedAlgorithm):
    name = "meta-sgd"
    paper = "Li et al. 2017 (arXiv:1707.09835); Chen et al. 2018 (arXiv:1802.07876)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, meta_lr: float, inner_lr: float):
        super().__init__(model, server_opt)
        self.inner_lr = inner_lr
        self.program = MetaSGDProgram(model, meta_lr)

    def init(self, params: Params) -> ServerState:
        lrs = {f"lr.{k}": torch.full_like(v, self.inner_lr) for k, v in params.items()}
        return ServerState(tree.clone(params), self.server_opt.init({**params, **lrs}), lrs)

    def broadcast(self, state: ServerState, rnd: int) -> dict:
        return {"params": state.params, "lrs": {k[3:]: v for k, v in state.extra.items() if k.startswith("lr.")}}

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        """One optimizer step on (theta, alpha) together; lrs live in ``extra`` as "lr.<name>"."""
        lrs = {k: v for k, v in state.extra.items() if k.startswith("lr.")}
        delta = {**aggregate["update"], **{f"lr.{k}": v for k, v in aggregate["lr_update"].items()}}
        both, opt_state = self.server_opt.step({**state.params, **lrs}, delta, state.opt_state)
        params = {k: both[k] for k in state.params}
        return ServerState(params, opt_state, {**state.extra, **{k: both[k] for k in lrs}})

    def client_program(self, rnd: int = 0) -> MetaSGDProgram:
        return self.program

    def personalize_program(self, steps: int, lr: float) -> MetaSGDAdapt:
        return MetaSGDAdapt(self.model)


class MetaSGDSection(Section):
    """Meta-SGD's parameters."""

    name: Literal["meta-sgd"] = "meta-sgd"
    inner_lr: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")
