"""Evaluation over model groups (the distillation algorithms, :mod:`metafed.distill`), by
the simulation pool: each evaluated client scores with its own group's models."""
from __future__ import annotations

import torch

from metafed import tree
from metafed.eval import ClientScores, _concat_scores, evaluation_sample, score_global, score_stacked


def evaluate_groups(run, rnd: int) -> tuple[dict, dict]:
    """``run``: the pool's view of the run (algorithm, cfg, dataset, state, clients, backend).
    Each evaluated client with its own group's models: the group's server model (FedDF)
    as ``global_*`` and after fine-tuning it as ``personalized_*``; for FedMD and FD, which
    have no global model, the client's own model as ``personalized_*``. Per-client lists
    follow the evaluation sample's order."""
    alg, cfg = run.algorithm, run.cfg
    ids = evaluation_sample(run.dataset.num_clients, cfg.eval_clients, cfg.seed)
    by_group = [[c for c in ids if alg.group_of(c) == g] for g in range(len(alg.groups))]
    order = [c for members in by_group for c in members]
    glob, pers = [], []
    for g, members in enumerate(by_group):
        if not members:
            continue
        model, data = alg.groups[g].model, [run.dataset.clients[c] for c in members]
        tests = ([d.test_x for d in data], [d.test_y for d in data])
        if alg.has_global_model:
            params = alg.group_global(run.state, g)
            glob.append(score_global(model, params, *tests))
            pers.append(_finetuned(run, g, params, data, members, rnd) if cfg.personalize_steps > 0 else glob[-1])
        else:
            broadcast = alg.broadcast_group(run.state, rnd, g)
            states = [run.clients.get(c, lambda: alg.client_init(broadcast)) for c in members]
            pers.append(score_stacked(model, tree.nested_stack([s["params"] for s in states]), *tests))
    position = {c: i for i, c in enumerate(order)}
    back = torch.tensor([position[c] for c in ids])  # evaluation-sample order
    metrics, per_client = {}, {"client": [run.dataset.clients[c].name or str(c) for c in ids]}
    for prefix, parts in (("global", glob), ("personalized", pers)):
        if parts:
            scores = _concat_scores(parts)
            scores = ClientScores(scores.correct[back], scores.loss_sum[back], scores.count[back])
            metrics.update(scores.summary(prefix))
            per_client[prefix] = scores.accuracy.tolist()
    if alg.has_global_model and run.dataset.heldout:
        _new_clients(run, rnd, metrics, per_client)
    return metrics, per_client


def newcomer_groups(cfg, num_heldout: int):
    """[H] the architecture group of each held-out client: drawn by the groups' shares from
    ``default_rng([seed, 26, 1])``, the same in simulation and on the nodes."""
    from metafed.distill.groups import assign_groups, parse_client_models

    shares = [s for _, s in parse_client_models(cfg.client_models)] if cfg.client_models else [1.0]
    return assign_groups(num_heldout, shares, cfg.seed, 1)


def _new_clients(run, rnd: int, metrics: dict, per_client: dict) -> None:
    """FedDF's new-client accuracy: each held-out client gets an architecture by the same
    shares (``default_rng([seed, 26, 1])``) and its group's server model, scored after k
    fine-tuning steps on its train split (k = 0: as it is). FedMD and FD have no model to
    give a newcomer, so they report none."""
    from metafed.eval import HELDOUT_ADAPT_STEPS

    alg, heldout = run.algorithm, run.dataset.heldout
    group = newcomer_groups(run.cfg, len(heldout))
    per_k = {k: [None] * len(heldout) for k in HELDOUT_ADAPT_STEPS}
    for g in range(len(alg.groups)):
        members = [j for j in range(len(heldout)) if group[j] == g]
        if not members:
            continue
        data, params = [heldout[j] for j in members], alg.group_global(run.state, g)
        for k in HELDOUT_ADAPT_STEPS:
            scores = score_global(alg.groups[g].model, params, [d.test_x for d in data], [d.test_y for d in data]) \
                if k == 0 else _finetuned(run, g, params, data, members, rnd, steps=k, stream=6)
            for i, j in enumerate(members):
                per_k[k][j] = (float(scores.correct[i]), float(scores.count[i]))
    for k, rows in per_k.items():
        correct = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        count = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        summary = ClientScores(correct, torch.zeros_like(correct), count).summary("x")
        metrics[f"new_client_accuracy_k{k}"] = summary["x_accuracy"]
        metrics[f"new_client_accuracy_mean_k{k}"] = summary["x_accuracy_mean"]
        per_client[f"new_client_k{k}"] = (correct / count.clamp_min(1)).tolist()
    per_client["new_client"] = [c.name or f"new-{j}" for j, c in enumerate(heldout)]


def _finetuned(run, g: int, params, data, members, rnd: int, steps: int | None = None,
               stream: int = 5) -> ClientScores:
    """FedDF's personalized score: ``--personalize-steps`` (or ``steps``) of fine-tuning the
    group model, seeded like every algorithm's ([seed, stream, round, client])."""
    from metafed.eval import Evaluator

    view = _GroupView(run.algorithm.groups[g].model)
    evaluator = Evaluator(view, run.backend, run.cfg.eval_batch_size, run.cfg.personalize_lr or run.cfg.lr,
                          run.cfg.seed)
    return evaluator.personalized({"params": params}, data, [{} for _ in data],
                                  run.cfg.personalize_steps if steps is None else steps, rnd, stream=stream, ids=members)


class _GroupView:
    """What :class:`~metafed.eval.Evaluator` needs of an algorithm, for one group's model."""

    def __init__(self, model):
        self.model = model

    def personalize_program(self, steps: int, lr: float):
        from metafed.algorithms.finetune import FineTune

        return FineTune(self.model, lr)


def score_group_client(run, params, rnd: int, cid: int, data, state: dict) -> dict[str, float]:
    """One training client's counts on its own data, in deployment: what :func:`evaluate_groups`
    computes for it in simulation. ``run``: (algorithm, backend, cfg); ``params``: the server's
    params of every group (prefixed); ``state``: the client's own (its model, FedMD and FD)."""
    from metafed.algorithms.base import ServerState

    alg, cfg = run.algorithm, run.cfg
    g = alg.group_of(cid)
    model, tests = alg.groups[g].model, ([data.test_x], [data.test_y])
    out = {"test_count": float(len(data.test_y))}
    if alg.has_global_model:
        group_params = alg.group_global(ServerState(params), g)
        glob = score_global(model, group_params, *tests)
        pers = _finetuned(run, g, group_params, [data], [cid], rnd) if cfg.personalize_steps > 0 else glob
        out.update(global_correct=float(glob.correct[0]), global_loss_sum=float(glob.loss_sum[0]))
    else:
        pers = score_stacked(model, tree.nested_stack([state["params"]]), *tests)
    out.update(personalized_correct=float(pers.correct[0]), personalized_loss_sum=float(pers.loss_sum[0]))
    return out


def score_group_new_client(run, params, rnd: int, index: int, num_heldout: int, data,
                           steps: tuple[int, ...]) -> dict[str, float]:
    """One held-out client's new-client counts in deployment (FedDF; FedMD and FD have no model
    to give a newcomer): its group drawn as :func:`_new_clients` draws it."""
    from metafed.algorithms.base import ServerState

    alg, cfg = run.algorithm, run.cfg
    g = int(newcomer_groups(cfg, num_heldout)[index])
    group_params = alg.group_global(ServerState(params), g)
    out = {"test_count": float(len(data.test_y))}
    for k in steps:
        scores = score_global(alg.groups[g].model, group_params, [data.test_x], [data.test_y]) if k == 0 \
            else _finetuned(run, g, group_params, [data], [index], rnd, steps=k, stream=6)
        out[f"new_k{k}_correct"] = float(scores.correct[0])
    return out
