"""The contract every algorithm fulfils: a bundle of pure parts, no loops over clients or
rounds (the round loop and the backends own those).

A client's work is a :class:`LocalProgram` split as ``init / step / final`` (fedjax's
client triple) so a backend can run ``step`` for all clients at once under ``torch.vmap``.
All arguments and results are (nested) dicts of tensors:

- ``shared``: what the server broadcast, identical for every client (never batched).
- ``client``: per-client inputs: ``{"state": persistent client state, "num_samples": []}``.
- ``carry``: what ``step`` threads through the local steps.
- ``batch``: ``{"x": [k, B, ...], "y": [k, B], "mask": [k, B]}`` for one step that consumes
  ``k = batches_per_step`` minibatches (e.g. support and query for MAML); ``mask`` is 0.0 on
  padding samples.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.models import FunctionalModel
from metafed.types import Params, TensorDict


class LocalProgram(Protocol):
    """What one client runs. Every method must be pure and vmappable."""

    batches_per_step: int

    def init(self, shared: dict, client: dict) -> dict: ...

    def step(self, shared: dict, carry: dict, batch: dict) -> tuple[dict, Tensor]:
        """One local step; returns the new carry and a scalar training loss for logging."""
        ...

    def final(self, shared: dict, carry: dict, client: dict) -> dict:
        """Training programs return ``{"update": Params, "state": TensorDict}``; personalization
        programs return ``{"params": Params}``."""
        ...


@dataclass(frozen=True)
class SgdPart:
    """A program may declare that its step is nothing but plain SGD on parts of its carry, each
    on the step's batch and independent of the others (``sgd_parts``). Each part is
    ``carry[key] <- carry[key] - lr (grad(mean masked loss) + pull (carry[key] - shared["params"]))``
    and the first part's loss is the step's reported loss. The backends may then run it with a
    fused or native kernel instead of ``step`` (metafed.backends.fused_mlp, .native)."""

    key: str
    lr: float
    pull: float = 0.0


@dataclass(frozen=True)
class FirstOrderMetaStep:
    """A program may declare its step as a first-order meta step (``first_order_meta``) on a
    support batch (slot 0) and a query batch (slot 1) of mean masked losses:
    ``temp = params; inner_steps times: temp <- temp - inner_lr grad(loss(temp; support));
    params <- params - outer_lr grad(loss(temp; query))``, reporting the query loss at temp.
    FOMAML and Per-FedAvg (FO) are such steps; the vectorized backend's native kernel may run
    them instead of ``step``."""

    inner_lr: float
    inner_steps: int
    outer_lr: float


@dataclass(frozen=True)
class MoreauStep:
    """A program may declare its step as pFedMe's (``moreau_step``; Dinh et al. 2020): the
    personal model ``carry["personal"]`` (theta) takes ``inner_steps`` gradient steps at
    ``personal_lr`` on loss(theta) + lam/2 ||theta - w||^2 with w = ``carry["params"]``, then
    w <- w - lr lam (w - theta); the reported loss is loss(theta) after the solve, and
    ``carry["inner_increase"]`` becomes 1 once a solve raises its own objective. With ``lr``
    None it is the personalization solve: ``carry["params"]`` is theta, anchored at
    ``shared["params"]``, and reports loss(theta). The native kernel may run such steps."""

    personal_lr: float
    lam: float
    inner_steps: int
    lr: float | None = None


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds (checkpointed after each round)."""

    params: Params
    opt_state: TensorDict = field(default_factory=dict)
    extra: TensorDict = field(default_factory=dict)  # algorithm-specific, e.g. Meta-SGD rates


class FederatedAlgorithm(ABC):
    """Defaults shared by all algorithms: broadcast the params, apply the server optimizer to
    the aggregated update, personalize by plain fine-tuning. Algorithms override parts."""

    name: str = ""
    paper: str = ""
    # what the round loop does with stragglers (clients that finish only part of their work)
    straggler_policy: str = "drop"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer):
        self.model = model
        self.server_opt = server_opt

    # ---- server side
    def init(self, params: Params) -> ServerState:
        return ServerState(tree.clone(params), self.server_opt.init(params))

    def broadcast(self, state: ServerState, rnd: int) -> dict:
        return {"params": state.params}

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        """``aggregate["update"]`` is the weighted mean of client deltas (local - global)."""
        params, opt_state = self.server_opt.step(state.params, aggregate["update"], state.opt_state)
        return ServerState(params, opt_state, state.extra)

    # ---- client side
    def client_init(self, broadcast: dict) -> TensorDict:
        """Initial persistent state of a client seen for the first time ({} if stateless)."""
        return {}

    @abstractmethod
    def client_program(self, rnd: int) -> LocalProgram:
        """The local training program every sampled client runs in round ``rnd``."""

    def local_work(self, rnd: int) -> tuple[int, int | None] | None:
        """(epochs, steps) for round ``rnd`` when the algorithm overrides the config (e.g.
        Personalized FedAvg's stages); None keeps the configured local work."""
        return None

    def personalize_program(self, steps: int, lr: float) -> LocalProgram:
        """Evaluation-time adaptation on the client's train split (default: fine-tuning)."""
        from metafed.algorithms.finetune import FineTune

        return FineTune(self.model, lr)

    # clients keep a personal model in their state under "personal" (pFedMe, Ditto, meta-updater)
    keeps_personal_model: bool = False

    def stored_personal(self, client_state: TensorDict) -> Params:
        """The personal model a client keeps, as ``personal_eval: stored`` scores it."""
        if not self.keeps_personal_model:
            raise ValueError(f"{self.name} clients keep no personal model")
        return client_state["personal"]

    def global_params(self, state: ServerState) -> Params:
        """The params that 'global model' evaluation uses."""
        return state.params

    def check_params(self, params: Params) -> None:
        """Resume: the checkpoint's server params fit this algorithm (ValueError naming why)."""
        self.model.check_params(params)


def batch_loss(model: FunctionalModel, params: Params, batch: dict, j: int, mask: Tensor | None = None) -> Tensor:
    """Mean loss of ``params`` on minibatch ``j`` of a step's batch (optionally re-masked)."""
    return model.loss(params, batch["x"][j], batch["y"][j], batch["mask"][j] if mask is None else mask)


def grad_and_loss(model: FunctionalModel, params: Params, batch: dict, j: int = 0,
                  mask: Tensor | None = None) -> tuple[Params, Tensor]:
    """(gradient, value) of the mean loss on minibatch ``j``; pure and vmappable."""
    from metafed.algorithms.gradients import grad

    return grad(lambda p: (batch_loss(model, p, batch, j, mask),) * 2, has_aux=True)(params)


def sgd(params: Params, grads: Params, lr: float | Params) -> Params:
    """params - lr * grads; ``lr`` may be a scalar or per-parameter tensors (Meta-SGD)."""
    if isinstance(lr, dict):
        return {k: v - lr[k] * grads[k] for k, v in params.items()}
    return {k: v - lr * grads[k] for k, v in params.items()}
