"""FedMD: Li and Wang, "FedMD: Heterogenous Federated Learning via Model Distillation",
NeurIPS-W 2019, arXiv:1910.03581.

Clients keep their own models (any architecture of their group) and share class scores
on a public dataset. One round of the paper is *communicate* (each client's logits on a
public subset), *aggregate* (the server averages them into the consensus), *distribute*,
*digest* (each client trains towards the consensus on that subset) and *revisit* (a few
epochs on its private data). metafed pipelines it into one round trip: in round r a
client digests the consensus of round r-1 on subset S_{r-1}, revisits its private data for
``--local-epochs``, then uploads its logits on subset S_r, which the server averages into
the consensus of round r. Subsets are ``--public-subset`` inputs drawn per round from
``default_rng([seed, 27, r])``; clients hold the public data, so only indices and logits
travel (``bytes_down`` counts the consensus and the indices).

Digest: ``--digest-epochs`` passes of SGD at ``--distill-lr`` over S_{r-1} in batches of
``--batch-size`` on the L1 distance between logits and consensus (implementations differ:
L1 or MSE). The paper's transfer-learning warm-up (full training on the *labelled* public
set, then on private data) is not run: the public split here is unlabelled; round 1 is
the private training. Evaluation scores each client's own model (there is no global one).
"""
from __future__ import annotations

from typing import Literal, Optional
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad

from pydantic import Field

from metafed.distill.base import DistillationAlgorithm
from metafed.distill.groups import PublicInputsSection
from metafed.models import FunctionalModel

SUBSET_STREAM = 27


@dataclass(frozen=True)
class DigestRevisit:
    """init: digest steps towards the consensus on the previous subset; step: private SGD
    (revisit); final: logits on this round's subset."""

    model: FunctionalModel
    lr: float
    digest_lr: float
    digest_steps: int
    batch_size: int
    batches_per_step: int = 1

    def init(self, shared, client):
        params = client["state"]["params"]
        x, target = shared["digest_x"], shared["consensus"]  # [P, ...], [P, K]
        on = shared["has_consensus"]  # [] 0.0 in round 1: nothing to digest yet
        n = x.shape[0]
        for j in range(self.digest_steps):  # static schedule: the same batches for every client
            start = (j * self.batch_size) % n
            xb, tb = x[start: start + self.batch_size], target[start: start + self.batch_size]
            g = grad(lambda p: (self.model.apply(p, xb) - tb).abs().sum(-1).mean())(params)
            params = {k: v - on * self.digest_lr * g[k] for k, v in params.items()}
        return {"params": params}

    def step(self, shared, carry, batch):
        def objective(p):
            value = self.model.loss(p, batch["x"][0], batch["y"][0], batch["mask"][0])
            return value, value

        g, value = grad(objective, has_aux=True)(carry["params"])
        return {"params": {k: v - self.lr * g[k] for k, v in carry["params"].items()}}, value

    def final(self, shared, carry, client):
        scores = self.model.apply(carry["params"], shared["score_x"])  # [P, K]
        return {"scores": scores, "state": {"params": carry["params"]}}


class FedMD(DistillationAlgorithm):
    name = "fedmd"
    paper = "Li and Wang 2019, arXiv:1910.03581"

    def __init__(self, groups, server_opt, lr: float, public_x: torch.Tensor, subset: int, digest_lr: float,
                 digest_epochs: int, batch_size: int, seed: int, num_classes: int):
        super().__init__(groups, server_opt, lr)
        self.public_x, self.subset = public_x, min(subset, len(public_x))
        self.digest_lr, self.batch_size, self.seed, self.num_classes = digest_lr, batch_size, seed, num_classes
        self.digest_steps = digest_epochs * -(-self.subset // batch_size)

    def subset_indices(self, rnd: int) -> torch.Tensor:
        """[P] the public inputs of round ``rnd`` (sorted; round 0 is never used)."""
        pick = np.random.default_rng([self.seed, SUBSET_STREAM, rnd]).choice(len(self.public_x), self.subset,
                                                                             replace=False)
        return torch.from_numpy(np.sort(pick))

    def init_extra(self) -> dict:
        return {"fedmd.consensus": torch.zeros(self.subset, self.num_classes), "fedmd.round": torch.tensor(0)}

    def broadcast_group(self, state, rnd: int, g: int) -> dict:
        prev = int(state.extra["fedmd.round"])
        return {"consensus": state.extra["fedmd.consensus"], "has_consensus": torch.tensor(float(prev > 0)),
                "digest_x": self.public_x[self.subset_indices(prev)], "digest_idx": self.subset_indices(prev),
                "score_x": self.public_x[self.subset_indices(rnd)], "score_idx": self.subset_indices(rnd),
                "group": torch.tensor(g)}

    def wire_bytes(self, broadcast: dict) -> int:
        """The consensus and the two index lists: clients hold the public inputs themselves."""
        return sum(broadcast[k].numel() * broadcast[k].element_size()
                   for k in ("consensus", "digest_idx", "score_idx"))

    def program_group(self, rnd: int, g: int) -> DigestRevisit:
        return DigestRevisit(self.groups[g].model, self.lr, self.digest_lr, self.digest_steps, self.batch_size)

    def server_step(self, state, uploads: list, rnd: int):
        """The consensus: the plain mean of the replying clients' scores (the paper's average)."""
        got = [u[1]["scores"] for u in uploads if u is not None]
        if not got:
            return state
        scores = torch.cat(got)  # [C, P, K]
        extra = {**state.extra, "fedmd.consensus": scores.mean(0).float(), "fedmd.round": torch.tensor(rnd)}
        return type(state)(state.params, state.opt_state, extra)


class FedMDSection(PublicInputsSection):
    """FedMD's parameters."""

    name: Literal["fedmd"] = "fedmd"
    public_subset: int = Field(500, ge=1, description="FedMD: public inputs scored per round")
    digest_epochs: int = Field(1, ge=1, description="FedMD: passes over the subset towards the consensus")
    distill_lr: Optional[float] = Field(None, gt=0,
        description="FedDF: Adam rate of the server distillation (default 0.001); FedMD: SGD rate of the "
                    "digest (default --lr)")
