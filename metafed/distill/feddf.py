"""FedDF, ensemble distillation for robust model fusion: Lin et al., "Ensemble Distillation
for Robust Model Fusion in Federated Learning", NeurIPS 2020, arXiv:2006.07242.

The server keeps one model per architecture group (a "prototype"). Each round the sampled
clients of group g train it locally with SGD (as in FedAvg) and upload their weights;
the server initialises each group's student with its group's sample-weighted FedAvg, then
distils into it the *ensemble of every received client model, of every architecture*:
the average of their logits on unlabelled public inputs is the teacher, and the student
follows it with Adam (``--distill-lr``) for ``--distill-steps`` batches of
``--distill-batch-size`` on T^2 * CE(softmax(teacher / T), softmax(student / T)). The
paper stops early on a validation split; metafed runs the fixed number of steps (so runs
stay reproducible and comparable) and leaves the budget to the user. A group without a
reply this round is still distilled, from its previous prototype. Weights travel, as in
FedAvg; evaluation scores each client's group prototype (global) and its fine-tuning.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional
import numpy as np
import torch

from pydantic import Field

from metafed.algorithms.fedavg import ProximalSGD
from metafed.distill.base import DistillationAlgorithm, group_slice, prefixed, soft_cross_entropy, softmax_t
from metafed.distill.groups import PublicInputsSection

DISTILL_STREAM = 28


class FedDF(DistillationAlgorithm):
    name = "feddf"
    paper = "Lin et al., NeurIPS 2020, arXiv:2006.07242"
    keeps_personal_model = False
    has_global_model = True

    def __init__(self, groups, server_opt, lr: float, public_x: torch.Tensor, steps: int, distill_lr: float,
                 batch_size: int, temperature: float, seed: int):
        super().__init__(groups, server_opt, lr)
        self.public_x, self.steps, self.distill_lr = public_x, steps, distill_lr
        self.batch_size, self.temperature, self.seed = min(batch_size, len(public_x)), temperature, seed

    def broadcast_group(self, state, rnd: int, g: int) -> dict:
        return {"params": group_slice(g, state.params), "group": torch.tensor(g)}

    def program_group(self, rnd: int, g: int) -> ProximalSGD:
        return ProximalSGD(self.groups[g].model, self.lr)

    def client_init(self, broadcast: dict) -> dict:
        return {}

    def group_global(self, state, g: int):
        return group_slice(g, state.params)

    def server_step(self, state, uploads: list, rnd: int):
        if all(u is None for u in uploads):
            return state
        starts, logit_sum, members = [], None, 0
        for g, grp in enumerate(self.groups):
            proto = group_slice(g, state.params)
            if uploads[g] is None:
                starts.append(proto)
                continue
            _, sent, w = uploads[g]
            deltas = sent["update"]  # {name: [C_g, ...]}
            w = (w / w.sum()).to(torch.float32)
            starts.append({k: v + torch.tensordot(w, deltas[k], dims=1) for k, v in proto.items()})
            clients = {k: proto[k][None] + deltas[k] for k in proto}  # each client's local model [C_g, ...]
            with torch.no_grad():
                logits = torch.vmap(grp.model.apply, in_dims=(0, None))(clients, self.public_x)  # [C_g, P, K]
            logit_sum = logits.sum(0) if logit_sum is None else logit_sum + logits.sum(0)
            members += logits.shape[0]
        teacher = softmax_t(logit_sum / members, self.temperature)  # [P, K] the ensemble's soft labels
        params = {}
        for g, grp in enumerate(self.groups):
            params.update(prefixed(g, self._distil(grp.model, starts[g], teacher, rnd, g)))
        return type(state)(params, state.opt_state, state.extra)

    def _distil(self, model, start, teacher: torch.Tensor, rnd: int, g: int):
        """Adam on the student towards the teacher's soft labels; batches from [seed, 28, round, group]."""
        student = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        opt = torch.optim.Adam(list(student.values()), lr=self.distill_lr)
        rng = np.random.default_rng([self.seed, DISTILL_STREAM, rnd, g])
        n = len(self.public_x)
        for _ in range(self.steps):
            pick = torch.from_numpy(rng.choice(n, self.batch_size, replace=False))
            loss = soft_cross_entropy(model.apply(student, self.public_x[pick]), teacher[pick],
                                      self.temperature).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach() for k, v in student.items()}


class FedDFSection(PublicInputsSection):
    """FedDF's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"temperature": "distill_temperature"}

    name: Literal["feddf"] = "feddf"
    distill_steps: int = Field(100, ge=0, description="FedDF: server distillation batches per round")
    distill_lr: Optional[float] = Field(None, gt=0,
        description="FedDF: Adam rate of the server distillation (default 0.001); FedMD: SGD rate of the "
                    "digest (default --lr)")
    distill_batch_size: int = Field(128, ge=1, description="FedDF: public inputs per distillation batch")
    temperature: float = Field(1.0, gt=0, description="FedDF, FD: softmax temperature of the teacher")
