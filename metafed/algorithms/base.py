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

from metafed import tree
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.finetune import FineTune
from metafed.algorithms.program import (FirstOrderMetaStep, LocalProgram, MoreauStep, SgdPart,  # noqa: F401 (the
                                        batch_loss, grad_and_loss, sgd)  # algorithm files' one import)
from metafed.models import FunctionalModel
from metafed.types import Params, TensorDict


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds (checkpointed after each round)."""

    params: Params
    opt_state: TensorDict = field(default_factory=dict)
    extra: TensorDict = field(default_factory=dict)  # algorithm-specific, e.g. Meta-SGD rates
    # the aggregation pipeline's stages, each in its own named slot (metafed.pipeline): the
    # round driver keeps them across the algorithm's server update
    stages: dict[str, TensorDict] = field(default_factory=dict)


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

    # ---- model groups: clients of different architectures (federated distillation). An
    # ordinary algorithm is one group of every client; the round driver asks each group's
    # clients with the group's broadcast and program.
    combines_groups: bool = False  # True: ``server_step(state, uploads per group)`` replaces the chain

    @property
    def num_groups(self) -> int:
        return 1

    def group_of(self, cid: int) -> int:
        return 0

    def broadcast_group(self, state: ServerState, rnd: int, g: int) -> dict:
        return self.broadcast(state, rnd)

    def program_group(self, rnd: int, g: int) -> LocalProgram:
        return self.client_program(rnd)

    def wire_bytes(self, broadcast: dict) -> int:
        """Bytes a broadcast puts on the wire."""
        return tree.nested_bytes(broadcast)

    def check_params(self, params: Params) -> None:
        """Resume: the checkpoint's server params fit this algorithm (ValueError naming why)."""
        self.model.check_params(params)
