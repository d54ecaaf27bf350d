"""FD, federated distillation: Jeong et al., "Communication-Efficient On-Device Machine
Learning: Federated Distillation and Augmentation under Non-IID Private Data", NeurIPS-W
2018, arXiv:1811.11479.

No public data and no weights travel. Each client keeps its own model (any architecture
of its group) and, while it trains on its private data, records the mean logit vector of
each label it holds. It uploads those per-label means [K, K] and which labels it has [K].
The server averages each label's means over the clients that hold it (the paper's
"global average logit") and broadcasts them. In the next round a client's loss is

    CE(f(x), y) + gamma * T^2 * CE(softmax(teacher[y] / T), softmax(f(x) / T))

where ``teacher[y]`` is the global average for label ``y`` *without the client's own
contribution* (the paper's per-device teacher): the server broadcasts the sums and counts,
and a client that was counted subtracts its own last upload, kept in its state. Labels
no other client reported get no distillation term. Protocol: per round the sampled
clients train ``--local-epochs`` on private data; evaluation scores each client's own
model (there is no global model). ``gamma`` = ``--distill-weight``, ``T`` =
``--distill-temperature``.
"""
from __future__ import annotations

from typing import ClassVar, Literal
from dataclasses import dataclass

import torch
from torch.func import grad

from pydantic import Field

from metafed.distill.base import DistillationAlgorithm, soft_cross_entropy, softmax_t
from metafed.distill.groups import ClientModelsSection
from metafed.models import FunctionalModel


@dataclass(frozen=True)
class DistilledSGD:
    """Local SGD on CE + gamma * distillation towards per-label teacher logits; the carry
    accumulates this client's per-label logit sums [K, K] and counts [K]."""

    model: FunctionalModel
    lr: float
    weight: float
    temperature: float
    num_classes: int
    batches_per_step: int = 1

    def init(self, shared, client):
        state = client["state"]
        counted = (state["sent_round"] == shared["from_round"]).to(shared["sum"].dtype)  # [] 1.0: subtract own
        total = shared["sum"] - counted * state["mean"] * state["present"][:, None]  # [K, K]
        holders = shared["count"] - counted * state["present"]  # [K] clients holding each label
        teacher = total / holders.clamp_min(1.0)[:, None]
        k = self.num_classes
        return {"params": state["params"], "teacher": teacher, "known": (holders > 0.5).to(total.dtype),
                "sum": total.new_zeros(k, k), "count": total.new_zeros(k)}

    def step(self, shared, carry, batch):
        x, y, mask = batch["x"][0], batch["y"][0], batch["mask"][0]
        k = self.num_classes
        onehot = (y[:, None] == torch.arange(k, device=y.device)).to(mask.dtype) * mask[:, None]  # [B, K]
        targets = softmax_t(carry["teacher"][y], self.temperature)  # [B, K]
        pull = self.weight * carry["known"][y]  # [B] no teacher for this label: CE only

        def objective(p):
            logits = self.model.apply(p, x)  # [B, K]
            ce = self.model.sample_loss(logits, y)  # [B]
            per_sample = ce + pull * soft_cross_entropy(logits, targets, self.temperature)
            n = mask.sum().clamp_min(1.0)
            return (per_sample * mask).sum() / n, ((ce * mask).sum() / n, logits.detach())

        g, (data_loss, logits) = grad(objective, has_aux=True)(carry["params"])
        params = {name: v - self.lr * g[name] for name, v in carry["params"].items()}
        return {**carry, "params": params, "sum": carry["sum"] + onehot.T @ logits,
                "count": carry["count"] + onehot.sum(0)}, data_loss

    def final(self, shared, carry, client):
        present = (carry["count"] > 0).to(carry["sum"].dtype)  # [K]
        mean = carry["sum"] / carry["count"].clamp_min(1.0)[:, None]  # [K, K] this client's per-label mean logits
        state = {"params": carry["params"], "mean": mean, "present": present, "sent_round": shared["round"]}
        return {"label_logits": mean, "label_present": present, "state": state}


class FD(DistillationAlgorithm):
    name = "fd"
    paper = "Jeong et al. 2018, arXiv:1811.11479"

    def __init__(self, groups, server_opt, lr: float, weight: float, temperature: float, num_classes: int):
        super().__init__(groups, server_opt, lr)
        self.weight, self.temperature, self.num_classes = weight, temperature, num_classes

    def init_extra(self) -> dict:
        k = self.num_classes
        return {"fd.sum": torch.zeros(k, k), "fd.count": torch.zeros(k), "fd.round": torch.tensor(0)}

    def broadcast_group(self, state, rnd: int, g: int) -> dict:
        e = state.extra
        return {"sum": e["fd.sum"], "count": e["fd.count"], "from_round": e["fd.round"],
                "round": torch.tensor(rnd), "group": torch.tensor(g)}

    def wire_bytes(self, broadcast: dict) -> int:
        return sum(broadcast[k].numel() * broadcast[k].element_size() for k in ("sum", "count"))

    def program_group(self, rnd: int, g: int) -> DistilledSGD:
        return DistilledSGD(self.groups[g].model, self.lr, self.weight, self.temperature, self.num_classes)

    def client_init(self, broadcast: dict) -> dict:
        k = self.num_classes
        return {**super().client_init(broadcast), "mean": torch.zeros(k, k), "present": torch.zeros(k),
                "sent_round": torch.tensor(-1)}

    def server_step(self, state, uploads: list, rnd: int):
        """Per label: the sum over reporting clients of their mean logits, and how many reported."""
        got = [u for u in uploads if u is not None]
        if not got:
            return state
        total = sum((u[1]["label_logits"] * u[1]["label_present"][..., None]).sum(0) for u in got)
        count = sum(u[1]["label_present"].sum(0) for u in got)
        extra = {**state.extra, "fd.sum": total.float(), "fd.count": count.float(), "fd.round": torch.tensor(rnd)}
        return type(state)(state.params, state.opt_state, extra)


class FDSection(ClientModelsSection):
    """FD's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"weight": "distill_weight", "temperature": "distill_temperature"}

    name: Literal["fd"] = "fd"
    weight: float = Field(1.0, ge=0, description="FD: gamma, weight of the distillation term")
    temperature: float = Field(1.0, gt=0, description="FedDF, FD: softmax temperature of the teacher")
