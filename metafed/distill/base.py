"""What the three distillation algorithms share: client groups with their own
architectures, group-prefixed server params, and per-group parts for the round loop.

A distillation algorithm is a :class:`~metafed.algorithms.base.FederatedAlgorithm` whose
parts come per group ``g`` (``broadcast_group``, ``program_group``, ``client_init`` reads
the group from the broadcast) and whose server step combines the groups' uploads
(``combines_groups``); the synchronous round driver (:mod:`metafed.federation`) runs them.
Server params are one dict with keys ``"{g}.{name}"`` (FedDF's prototypes; FedMD and FD
keep the groups' initial weights there, which their clients start from), so checkpoints,
``final.safetensors`` and resume treat them like any model.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from metafed import tree

from metafed.algorithms.base import FederatedAlgorithm, ServerState
from metafed.aggregate.server_opt import ServerOptimizer
from metafed.distill.groups import ModelGroup
from metafed.types import Params


def prefixed(g: int, params: Params) -> Params:
    return {f"{g}.{k}": v for k, v in params.items()}


def group_slice(g: int, params: Params) -> Params:
    """Group ``g``'s params out of the prefixed server dict."""
    head = f"{g}."
    return {k[len(head):]: v for k, v in params.items() if k.startswith(head)}


def softmax_t(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def soft_cross_entropy(student: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """[B] per-sample cross-entropy of the student's tempered softmax against teacher
    probabilities, scaled by T^2 (Hinton et al. 2015) so gradients keep their size across T.
    Equals KL(teacher || student) up to the teacher's entropy, a constant here."""
    log_p = torch.log_softmax(student / temperature, dim=-1)
    return -(teacher_probs * log_p).sum(-1) * temperature ** 2


class DistillationAlgorithm(FederatedAlgorithm):
    """Heterogeneous groups; subclasses define the per-group parts and the server step."""

    # the clients' own model is their state "params": it is what personalized evaluation scores
    keeps_personal_model = True
    has_global_model = False  # FedDF: each group has a server model; FedMD, FD: none
    combines_groups = True

    def __init__(self, groups: list[ModelGroup], server_opt: ServerOptimizer, lr: float):
        super().__init__(groups[0].model, server_opt)
        self.groups, self.lr = groups, lr
        self._group_of = {c: g for g, grp in enumerate(groups) for c in grp.members}
        self._initial = [grp.model.init_params() for grp in groups]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of(self, cid: int) -> int:
        return self._group_of[cid]

    # ---- server side
    def init(self, params: Params) -> ServerState:
        """``params`` (the single-model default) is ignored: each group brings its own."""
        merged = {}
        for g, p in enumerate(self._initial):
            merged.update(prefixed(g, p))
        return ServerState(merged, {}, self.init_extra())

    def init_extra(self) -> dict:
        return {}

    def check_params(self, params: Params) -> None:
        """Resume: every group's slice fits its model (ValueError naming the problem)."""
        for g, grp in enumerate(self.groups):
            grp.model.check_params(group_slice(g, params))
        unknown = set(params) - {f"{g}.{k}" for g, p in enumerate(self._initial) for k in p}
        if unknown:
            raise ValueError(f"parameters of no client group: {sorted(unknown)[:3]}")

    def broadcast(self, state: ServerState, rnd: int) -> dict:
        return self.broadcast_group(state, rnd, 0)

    @abstractmethod
    def broadcast_group(self, state: ServerState, rnd: int, g: int) -> dict:
        """What group ``g``'s clients receive in round ``rnd`` (with ``"group"``: g)."""

    def wire_bytes(self, broadcast: dict) -> int:
        """Bytes a broadcast puts on the wire (inputs every client holds travel as indices)."""
        return tree.nested_bytes(broadcast)

    def client_program(self, rnd: int = 0):
        return self.program_group(rnd, 0)

    @abstractmethod
    def program_group(self, rnd: int, g: int):
        """The local program group ``g``'s clients run in round ``rnd`` (on their group's model)."""

    def client_init(self, broadcast: dict) -> dict:
        """A client's own model starts from its group's initial weights (the same seed)."""
        g = int(broadcast["group"])
        return {"params": {k: v.clone() for k, v in self._initial[g].items()}}

    @abstractmethod
    def server_step(self, state: ServerState, uploads: list, rnd: int) -> ServerState:
        """``uploads[g]`` = (client ids, stacked accepted uploads, sample weights [C_g]) or None
        when no client of group ``g`` replied."""

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        raise TypeError(f"{self.name} runs its own server step over the groups (server_step)")

    def group_global(self, state: ServerState, g: int) -> Params | None:
        """Group ``g``'s server model (FedDF), or None where the algorithm has none."""
        return None

    def global_params(self, state: ServerState) -> Params:
        return state.params
