"""What personalization buys: global vs personalized accuracy per client, and new clients.

Every number is computed on clients' *test* splits; adaptation (``personalize``) only ever
sees the client's *train* split. Reported per evaluation:

- ``global_*``: the global model on each client's test data.
- ``personalized_*``: after the algorithm's ``personalize`` program (K steps on train data);
  with ``personal_eval: stored``, each client's stored personal model as it is (pFedMe's
  theta_i, Ditto's v_i: what their papers score).
- ``new_client_accuracy_k{K}``: held-out clients that never trained, after K adaptation steps.

Aggregates: ``*_accuracy`` is sample-weighted (total correct / total test samples);
``*_accuracy_mean`` is the unweighted mean over clients; ``*_accuracy_p10`` the 10th
percentile over clients (how the worst-served clients fare).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, ServerState
from metafed.backends.base import Backend, ClientTask
from metafed.data.federated import ClientData
from metafed.data.schedule import program_schedule
from metafed.models import FunctionalModel
from metafed.section import Section
from metafed.types import Params


class EvaluationSection(Section):
    """What is scored, when, and with how much adaptation (:mod:`metafed.eval`)."""

    TITLE: ClassVar[str] = "Evaluation"

    eval_every: int = Field(1, ge=1, description="evaluate every N rounds (and at the last)")
    eval_clients: Optional[int] = Field(None, ge=1, description="score a fixed, seeded sample of this many "
                                        "training clients at each evaluation (default: all)")
    eval_train_loss: bool = Field(True, description="also report the global model's loss over all the evaluated "
                                  "clients' training data (a full pass)")
    personalize_steps: int = Field(5, ge=0,
        description="adaptation steps from the global model before scoring personalized accuracy")
    personal_eval: Literal["adapt", "stored"] = Field(
        "adapt", description="personalized accuracy: adapt (personalize-steps from the global model, or from the "
        "stored personal model) or stored (score each client's stored personal model as it is: pFedMe, Ditto)")
    personalize_lr: Optional[float] = Field(None, gt=0, description="learning rate of those steps (default: lr)")
    eval_batch_size: int = Field(10, ge=1, description="batch size of the adaptation steps")


EVAL_SAMPLES_PER_CHUNK = 4096
HELDOUT_ADAPT_STEPS = (0, 1, 5, 10)  # new-client accuracy after k adaptation steps


@dataclass(frozen=True)
class ClientScores:
    """Per-client test results: correct counts, summed losses and sample counts, each [C]."""

    correct: Tensor
    loss_sum: Tensor
    count: Tensor

    @property
    def accuracy(self) -> Tensor:
        return self.correct / self.count.clamp_min(1)

    def summary(self, prefix: str) -> dict[str, float]:
        acc = self.accuracy.numpy()
        total = float(self.count.sum())
        return {
            f"{prefix}_accuracy": float(self.correct.sum()) / total,
            f"{prefix}_loss": float(self.loss_sum.sum()) / total,
            f"{prefix}_accuracy_mean": float(acc.mean()),
            f"{prefix}_accuracy_p10": float(np.percentile(acc, 10)),
            f"{prefix}_accuracy_std": float(acc.std()),
        }


def score_global(model: FunctionalModel, params: Params, xs: list[Tensor], ys: list[Tensor]) -> ClientScores:
    """One shared model on many clients' data: concatenated forward passes, split per client."""
    owner = torch.cat([torch.full((len(y),), c, dtype=torch.long) for c, y in enumerate(ys)])
    x, y = torch.cat(xs), torch.cat(ys)
    correct = torch.zeros(len(ys), dtype=torch.float64)
    loss_sum = torch.zeros(len(ys), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(y), EVAL_SAMPLES_PER_CHUNK):
            sl = slice(s, s + EVAL_SAMPLES_PER_CHUNK)
            outputs = model.apply(params, x[sl])
            correct.index_add_(0, owner[sl], model.sample_score(outputs, y[sl]).double())
            loss_sum.index_add_(0, owner[sl], model.sample_loss(outputs, y[sl]).double())
    count = torch.tensor([len(y) for y in ys], dtype=torch.float64)
    return ClientScores(correct, loss_sum, count)


def score_stacked(model: FunctionalModel, stacked: Params, xs: list[Tensor], ys: list[Tensor]) -> ClientScores:
    """Client c's own model stacked[c] on client c's data: vmap over zero-padded test sets."""
    t_max = max(len(y) for y in ys)
    x = xs[0].new_zeros((len(xs), t_max, *xs[0].shape[1:]))
    y = ys[0].new_zeros((len(ys), t_max))
    mask = torch.zeros(len(ys), t_max)
    for c, (xc, yc) in enumerate(zip(xs, ys)):
        x[c, : len(yc)], y[c, : len(yc)], mask[c, : len(yc)] = xc, yc, 1.0
    with torch.no_grad():
        correct, loss_sum = torch.vmap(model.correct_and_loss)(stacked, x, y, mask)
    return ClientScores(correct.double(), loss_sum.double(), mask.sum(1).double())


def _concat_scores(parts: list[ClientScores]) -> ClientScores:
    return ClientScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("correct", "loss_sum", "count")))


@dataclass
class Evaluator:
    """Runs the evaluation protocol; ``states_for`` gives each client's persistent state."""

    algorithm: FederatedAlgorithm
    backend: Backend
    batch_size: int
    personalize_lr: float
    seed: int
    personal_eval: str = "adapt"  # or "stored": score the personal model each client keeps
    group_size: int = 64

    @classmethod
    def from_config(cls, algorithm: FederatedAlgorithm, backend: Backend, cfg) -> "Evaluator":
        """The evaluator a RunConfig describes (the simulation and every node build the same)."""
        return cls(algorithm, backend, cfg.eval_batch_size, cfg.personalize_lr or cfg.lr, cfg.seed, cfg.personal_eval)

    def personal_scores(self, broadcast: dict, clients: list[ClientData], states: list[dict], steps: int,
                        rnd: int, ids: list[int] | None = None) -> ClientScores:
        """Personalized scores of training clients under the configured ``personal_eval``."""
        if self.personal_eval == "stored":
            stacked = tree.nested_stack([self.algorithm.stored_personal(s) for s in states])
            return score_stacked(self.algorithm.model, stacked, [c.test_x for c in clients],
                                 [c.test_y for c in clients])
        return self.personalized(broadcast, clients, states, steps, rnd, stream=5, ids=ids)

    def personalized(self, broadcast: dict, clients: list[ClientData], states: list[dict], steps: int,
                     rnd: int, stream: int, ids: list[int] | None = None) -> ClientScores:
        """Adapt each client with ``personalize`` for ``steps`` steps on its train split, then
        score it on its test split. Clients go through the backend in groups to bound memory.
        Client c's schedule is seeded by [seed, stream, round, id of c] (``ids``, default the
        positions 0..C-1), so a client adapts the same way whoever else is evaluated."""
        program = self.algorithm.personalize_program(steps, self.personalize_lr)
        parts = []
        for g in range(0, len(clients), self.group_size):
            group = range(g, min(g + self.group_size, len(clients)))
            tasks = []
            for c in group:
                cd = clients[c]
                rng = np.random.default_rng([self.seed, stream, rnd, c if ids is None else ids[c]])
                sched = program_schedule(program, cd.num_train, batch_size=self.batch_size, epochs=1, steps=steps,
                                         rng=rng)
                inputs = {"state": states[c], "num_samples": torch.tensor(float(cd.num_train))}
                tasks.append(ClientTask(cd.train_x, cd.train_y, sched, steps, inputs))
            out, _ = self.backend.run(program, broadcast, tasks)
            parts.append(score_stacked(self.algorithm.model, out["params"],
                                       [clients[c].test_x for c in group], [clients[c].test_y for c in group]))
        return _concat_scores(parts)

    def evaluate(self, state: ServerState, rnd: int, clients: list[ClientData], states: list[dict],
                 personalize_steps: int, heldout: list[ClientData], heldout_steps: tuple[int, ...],
                 ids: list[int] | None = None, train_loss: bool = True) -> tuple[dict, dict]:
        """Returns (metrics for metrics.jsonl, per-client accuracies for plots). ``ids``: the
        clients' ids when ``clients`` is a sample (``--eval-clients``); ``train_loss``: also
        the global model's loss over all their training data (a full pass)."""
        model = self.algorithm.model
        params = self.algorithm.global_params(state)
        broadcast = self.algorithm.broadcast(state, rnd)
        glob = score_global(model, params, [c.test_x for c in clients], [c.test_y for c in clients])
        metrics = glob.summary("global")
        if train_loss:
            train = score_global(model, params, [c.train_x for c in clients], [c.train_y for c in clients])
            metrics["global_train_loss"] = float(train.loss_sum.sum() / train.count.sum())
        per_client = {"global": glob.accuracy.tolist()}
        if personalize_steps > 0 or self.personal_eval == "stored":
            pers = self.personal_scores(broadcast, clients, states, personalize_steps, rnd, ids)
        else:
            pers = glob
        metrics.update(pers.summary("personalized"))
        per_client["personalized"] = pers.accuracy.tolist()
        if heldout:
            fresh = [self.algorithm.client_init(broadcast) for _ in heldout]
            for k in heldout_steps:
                if k == 0:
                    scores = score_global(model, params, [c.test_x for c in heldout], [c.test_y for c in heldout])
                else:
                    scores = self.personalized(broadcast, heldout, fresh, k, rnd, stream=6)
                metrics[f"new_client_accuracy_k{k}"] = scores.summary("x")["x_accuracy"]
                metrics[f"new_client_accuracy_mean_k{k}"] = scores.summary("x")["x_accuracy_mean"]
                per_client[f"new_client_k{k}"] = scores.accuracy.tolist()
        return metrics, per_client


def evaluate_one_client(evaluator: Evaluator, params: Params, broadcast: dict, rnd: int, cid: int,
                        client: ClientData, client_state: dict, personalize_steps: int,
                        train_loss: bool = True) -> dict[str, float]:
    """Federated evaluation on one client's own data: the counts the server aggregates into
    the same metrics :meth:`Evaluator.evaluate` reports (global test and train, personalized).
    The adaptation schedule uses the same seeds ([seed, 5, round, client]) as the simulation."""
    model = evaluator.algorithm.model
    glob = score_global(model, params, [client.test_x], [client.test_y])
    out = {"global_correct": float(glob.correct[0]), "global_loss_sum": float(glob.loss_sum[0]),
           "test_count": float(glob.count[0])}
    if train_loss:
        train = score_global(model, params, [client.train_x], [client.train_y])
        out.update(train_loss_sum=float(train.loss_sum[0]), train_count=float(train.count[0]))
    if personalize_steps > 0 or evaluator.personal_eval == "stored":
        pers = evaluator.personal_scores(broadcast, [client], [client_state], personalize_steps, rnd, ids=[cid])
        out.update(personalized_correct=float(pers.correct[0]), personalized_loss_sum=float(pers.loss_sum[0]))
    else:
        out.update(personalized_correct=out["global_correct"], personalized_loss_sum=out["global_loss_sum"])
    return out


def evaluation_sample(num_clients: int, eval_clients: int | None, seed: int) -> list[int]:
    """The training clients scored at every evaluation: all, or a fixed sample of
    ``eval_clients`` drawn once from ``default_rng([seed, 14])`` (the same in every round and
    in simulation and deployment, so curves compare)."""
    if eval_clients is None or eval_clients >= num_clients:
        return list(range(num_clients))
    return sorted(np.random.default_rng([seed, 14]).choice(num_clients, eval_clients, replace=False).tolist())


def evaluate_new_client(evaluator: Evaluator, params: Params, broadcast: dict, rnd: int, index: int,
                        client: ClientData, steps: tuple[int, ...]) -> dict[str, float]:
    """Federated new-client evaluation on one held-out client (it never trained): correct
    and total test counts after k adaptation steps from a fresh client state, for each k in
    ``steps``. Same seeds as the simulation ([seed, 6, round, held-out index])."""
    out = {"test_count": float(client.num_test)}
    for k in steps:
        if k == 0:
            scores = score_global(evaluator.algorithm.model, params, [client.test_x], [client.test_y])
        else:
            fresh = [evaluator.algorithm.client_init(broadcast)]
            scores = evaluator.personalized(broadcast, [client], fresh, k, rnd, stream=6, ids=[index])
        out[f"new_k{k}_correct"] = float(scores.correct[0])
    return out


def combine_new_client_evaluations(rows: list[dict[str, float]], steps: tuple[int, ...]) -> dict[str, float]:
    """Server side: held-out clients' counts -> new_client_accuracy_k{k} (pooled) and
    new_client_accuracy_mean_k{k} (per-client mean), the simulation's keys."""
    count = torch.tensor([r["test_count"] for r in rows], dtype=torch.float64)
    metrics = {}
    for k in steps:
        correct = torch.tensor([r[f"new_k{k}_correct"] for r in rows], dtype=torch.float64)
        summary = ClientScores(correct, torch.zeros_like(correct), count).summary("x")
        metrics[f"new_client_accuracy_k{k}"] = summary["x_accuracy"]
        metrics[f"new_client_accuracy_mean_k{k}"] = summary["x_accuracy_mean"]
    return metrics


def combine_client_evaluations(rows: list[dict[str, float]]) -> dict[str, float]:
    """Server side of federated evaluation: per-client counts -> the metrics of ``evaluate``."""
    count = torch.tensor([r["test_count"] for r in rows], dtype=torch.float64)
    metrics = {}
    for prefix in ("global", "personalized"):
        if f"{prefix}_correct" not in rows[0]:  # model groups without a global model (FedMD, FD)
            continue
        scores = ClientScores(torch.tensor([r[f"{prefix}_correct"] for r in rows], dtype=torch.float64),
                              torch.tensor([r[f"{prefix}_loss_sum"] for r in rows], dtype=torch.float64), count)
        metrics.update(scores.summary(prefix))
        if prefix == "global" and "train_loss_sum" in rows[0]:
            metrics["global_train_loss"] = sum(r["train_loss_sum"] for r in rows) / sum(r["train_count"] for r in rows)
    return metrics
