"""Each algorithm's paper protocol (``protocol: paper``) and the equal-budget mode, checked
against by-hand computations: FedMeta's meta-gradient average with the outer Adam step,
Per-FedAvg's one-step evaluation, Personalized FedAvg's Reptile stage with Adam, pFedMe's
stored personal models, Reptile's annealing, uniform weighting, server optimizer defaults."""
import logging

import numpy as np
import pytest
import torch

from metafed import tree
from metafed.aggregate.server_opt import DEFAULT_SERVER_LR, ServerOptimizer
from metafed.config import ConfigError, RunConfig, build_config
from metafed.eval import score_stacked
from metafed.run import build_federation, run
from tests.conftest import small_config


def _adam_by_hand(x, delta, lr, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al.'s FedAdam from a fresh state: m0 = 0, v0 = tau^2, no bias correction."""
    m = (1 - b1) * delta
    v = b2 * tau ** 2 + (1 - b2) * delta * delta
    return x + lr * m / (v.sqrt() + tau)


def _mean_loss(model, params, x, y):
    return torch.nn.functional.cross_entropy(model.apply(params, x), y)


def test_fedmeta_paper_protocol_is_a_meta_gradient_average_with_the_outer_adam_step():
    """Chen et al. 2018: each client computes one MAML meta-gradient on a support and a query
    batch (second order, via plain autograd here); the server averages them by sample count
    and takes one Adam step."""
    cfg = RunConfig(algorithm="maml", protocol="paper", num_clients=2, clients_per_round=2, rounds=1,
                    inner_lr=0.05, batch_size=8, hidden=[16], progress=False)
    assert (cfg.local_steps, cfg.lr, cfg.server_optimizer, cfg.personalize_steps) == (1, 1.0, "adam", 1)
    fed = build_federation(cfg)
    start = tree.clone(fed.state.params)
    broadcast = fed.algorithm.broadcast(fed.state, 1)
    model = fed.algorithm.model
    grads, weights = [], []
    for cid in range(2):
        task = fed.pool.task(cid, 1, fed.algorithm.client_program(1), broadcast)
        support, query = (torch.as_tensor(idx[idx >= 0]) for idx in task.schedule[0])
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        inner = torch.autograd.grad(_mean_loss(model, params, task.x[support], task.y[support]),
                                    list(params.values()), create_graph=True)
        adapted = {k: v - 0.05 * g for (k, v), g in zip(params.items(), inner)}
        outer = torch.autograd.grad(_mean_loss(model, adapted, task.x[query], task.y[query]), list(params.values()))
        grads.append(dict(zip(params, outer)))
        weights.append(float(task.inputs["num_samples"]))
    fed.run_round(1)
    total = sum(weights)
    for k in start:
        mean_grad = sum(w * g[k] for w, g in zip(weights, grads)) / total
        expected = _adam_by_hand(start[k], -mean_grad, DEFAULT_SERVER_LR["adam"])
        torch.testing.assert_close(fed.state.params[k], expected, atol=1e-6, rtol=1e-5)


def test_per_fedavg_paper_protocol_adapts_exactly_one_step_and_averages_uniformly(monkeypatch):
    cfg = RunConfig(algorithm="per-fedavg-fo", protocol="paper", num_clients=6, rounds=1, inner_lr=0.03,
                    hidden=[16], progress=False)
    assert cfg.personalize_steps == 1 and cfg.weighting == "uniform"
    fed = build_federation(cfg)
    steps_seen = []
    from metafed.eval import Evaluator

    original = Evaluator.personalized

    def spy(self, broadcast, clients, states, steps, rnd, stream, ids=None):
        steps_seen.append((steps, stream))
        return original(self, broadcast, clients, states, steps, rnd, stream, ids)

    monkeypatch.setattr(Evaluator, "personalized", spy)
    fed.evaluate(1)
    assert steps_seen == [(1, 5)]
    program = fed.algorithm.personalize_program(1, cfg.lr)
    assert program.lr == 0.03  # the step is SGD at alpha


def test_uniform_weighting_is_the_plain_mean_of_client_updates():
    cfg = small_config(weighting="uniform", partition="quantity", rounds=1)
    fed = build_federation(cfg)
    start = tree.clone(fed.state.params)
    broadcast = fed.algorithm.broadcast(fed.state, 1)
    cohort = fed._sample(1)
    replies = fed.pool.train(1, cohort, fed.algorithm.client_program(1), broadcast)
    assert len(set(replies.num_samples.tolist())) > 1  # unequal clients: weighting matters
    fed = build_federation(cfg)
    fed.run_round(1)
    for k in start:
        torch.testing.assert_close(fed.state.params[k], start[k] + replies.outputs["update"][k].mean(0),
                                   atol=1e-6, rtol=0)


def test_personalized_fedavg_stage2_is_reptile_with_adam_and_stage1_fedavgm():
    """Stage 1 (round 1): FedAvg with server momentum 0.9, x + m, m = 0.9 m + delta. Stage 2
    (rounds 2, 3): Adam on the mean K-step delta, with its own state. On the quadratic
    f(w) = |w - c|^2 / 2, K local SGD steps at lr give the delta (1 - (1 - lr)^K)(c - w)."""
    cfg = small_config(algorithm="personalized-fedavg", protocol="paper", stage1_rounds=1, rounds=3)
    assert cfg.server_momentum == 0.9 and cfg.stage2_server_optimizer == "adam"
    alg = build_federation(cfg).algorithm
    w = {"w": torch.tensor([1.0, -2.0, 0.5])}
    c = torch.tensor([0.0, 1.0, 3.0])
    k_delta = lambda params: (1 - (1 - cfg.lr) ** 4) * (c - params["w"])  # noqa: E731
    state = alg.init(w)
    d1 = k_delta(state.params)
    state = alg.server_update(state, {"update": {"w": d1}}, 1)
    torch.testing.assert_close(state.params["w"], w["w"] + d1)
    d2 = k_delta(state.params)
    after1 = state.params["w"]
    state = alg.server_update(state, {"update": {"w": d2}}, 2)
    torch.testing.assert_close(state.params["w"], _adam_by_hand(after1, d2, DEFAULT_SERVER_LR["adam"]))
    assert torch.equal(state.opt_state["m.w"], d1)  # stage 1's momentum kept apart, untouched


def test_pfedme_paper_evaluation_scores_the_stored_personal_models():
    cfg = small_config(algorithm="pfedme", protocol="paper", rounds=2, clients_per_round=8, personal_lr=0.05,
                       pfedme_lambda=15)
    assert cfg.personal_eval == "stored"
    result = run(cfg)
    fed = result.federation
    personal = [fed.clients.get(c, None)["personal"] for c in range(fed.dataset.num_clients)]
    scores = score_stacked(fed.algorithm.model, tree.nested_stack(personal), [c.test_x for c in fed.dataset.clients],
                           [c.test_y for c in fed.dataset.clients])
    assert result.rows[-1]["personalized_accuracy"] == pytest.approx(float(scores.correct.sum() / scores.count.sum()))


def test_reptile_anneals_its_outer_step_linearly():
    cfg = small_config(algorithm="reptile", protocol="paper", server_lr=0.5, rounds=4)
    assert cfg.reptile_anneal
    alg = build_federation(cfg).algorithm
    assert [alg.step_scale(r) for r in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    state = alg.init({"w": torch.zeros(2)})
    state = alg.server_update(state, {"update": {"w": torch.ones(2)}}, 3)
    torch.testing.assert_close(state.params["w"], torch.full((2,), 0.25))


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi", "adagrad"])
def test_each_server_optimizer_default_lr_trains_the_digits_default(name):
    result = run(RunConfig(server_optimizer=name, progress=False, rounds=20))
    assert result.rows[-1]["global_accuracy"] >= 0.85, result.rows[-1]["global_accuracy"]


def test_server_lr_far_above_the_default_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="metafed"):
        build_federation(small_config(server_optimizer="adam", server_lr=1.0))
    assert "over 10x the adam default" in caplog.text


def test_adagrad_accumulates_squared_deltas():
    opt = ServerOptimizer("adagrad", 0.1)
    x, d = {"w": torch.zeros(1)}, {"w": torch.tensor([2.0])}
    state = opt.init(x)
    x1, state = opt.step(x, d, state)
    assert state["v.w"].item() == pytest.approx(1e-6 + 4.0)
    torch.testing.assert_close(x1["w"], 0.1 * 0.2 / (torch.sqrt(torch.tensor([4.000001])) + 1e-3))


def test_protocol_settings_given_explicitly_win_and_misuses_are_refused():
    cfg = build_config(algorithm="maml", protocol="paper", server_optimizer="yogi", personalize_steps=3)
    assert (cfg.server_optimizer, cfg.personalize_steps, cfg.local_steps) == ("yogi", 3, 1)
    with pytest.raises(ConfigError, match="personal_lr \\* lambda"):
        build_config(algorithm="pfedme", personal_lr=0.2, pfedme_lambda=15)
    with pytest.raises(ConfigError, match="keeps none"):
        build_config(algorithm="fedavg", personal_eval="stored")
    with pytest.raises(ConfigError, match="reptile"):
        build_config(algorithm="fedavg", reptile_anneal=True)
    with pytest.raises(ConfigError, match="setting of personalized-fedavg: algorithm 'fedavg' ignores it"):
        build_config(algorithm="fedavg", stage2_server_optimizer="adam")


def test_stored_personal_model_list_matches_the_algorithms():
    from metafed.algorithms import ALGORITHMS
    from metafed.config import STORED_PERSONAL_MODELS
    from metafed.models import FunctionalModel

    keep = []
    for name, spec in ALGORITHMS.items():
        if spec.build is None:  # distillation: clients keep their own model by design (tests/test_distill.py)
            continue
        cfg = small_config(algorithm=name, mu=0.1 if name == "fedprox" else 0.0)
        alg = spec.build(cfg, FunctionalModel(torch.nn.Linear(4, 2)), ServerOptimizer())
        if alg.keeps_personal_model:
            keep.append(name)
    assert sorted(keep) == sorted(STORED_PERSONAL_MODELS)
    assert np.all([name in ALGORITHMS for name in STORED_PERSONAL_MODELS])


def test_meta_updater_draws_train_and_validation_batches_from_disjoint_parts():
    """Each step's first batch holds only train-part samples and its second only
    validation-part samples, both full (no masking that empties the meta-loss)."""
    from metafed.data.schedule import program_schedule

    program = build_federation(small_config(algorithm="meta-updater")).algorithm.client_program(1)
    sched = program_schedule(program, 53, batch_size=8, epochs=2, steps=None, rng=np.random.default_rng(0))
    train, val = sched[:, 0], sched[:, 1]
    assert sched.shape == (2 * 6, 2, 8)  # 42 train-part samples -> 6 batches per epoch
    assert np.all(train[train >= 0] % 5 != 0) and np.all(val[val >= 0] % 5 == 0)
    assert (val >= 0).sum(axis=1).min() >= 3  # 11 validation samples: every step has some
    assert sorted(train[:6][train[:6] >= 0].tolist()) == [i for i in range(53) if i % 5]  # one epoch = the part


def test_attention_by_labels_does_not_reward_single_class_clients():
    """Score ``labels``: a client whose labels look like the cohort's outweighs a
    single-class one, whatever their losses (a single-class client's loss is the lowest)."""
    from metafed.aggregate import Attention

    counts = torch.tensor([[30, 30, 30], [90, 0, 0], [25, 35, 30]])
    updates = {"update": {"w": torch.tensor([[1.0], [5.0], [1.2]])}}
    low_loss_for_the_easy_one = torch.tensor([1.0, 0.01, 1.1])
    w = Attention("labels").weights(updates, torch.ones(3), low_loss_for_the_easy_one, counts)
    assert w[1] < w[0] and w[1] < w[2]
    assert Attention("loss").weights(updates, torch.ones(3), low_loss_for_the_easy_one)[1] > 0.5  # what labels avoids
    result = run(small_config(aggregator="attention", attention_score="labels", rounds=10))
    assert result.rows[-1]["global_accuracy"] > 0.7  # the mean reaches 0.75 in this job
    with pytest.raises(ConfigError, match="label counts"):
        build_config(aggregator="attention", attention_score="labels", dp="local", dp_noise_multiplier=1.0)


def test_meta_updater_delta_formulation_by_hand():
    """The seed document as written: one local step trains theta on a train batch and the
    correction c on the validation meta-loss L(theta - alpha c); the client sends
    u = (w - theta) / alpha + c, and the server's w - alpha u is theta - alpha c."""
    cfg = small_config(algorithm="meta-updater", meta_formulation="delta", num_clients=2, clients_per_round=1,
                       rounds=1, local_steps=1, lr=0.1, meta_lr=0.5, meta_alpha=0.3)
    fed = build_federation(cfg)
    w = tree.clone(fed.state.params)
    broadcast = fed.algorithm.broadcast(fed.state, 1)
    cid = int(fed._sample(1)[0])
    task = fed.pool.task(cid, 1, fed.algorithm.client_program(1), broadcast)
    train, val = (torch.as_tensor(idx[idx >= 0]) for idx in task.schedule[0])
    model = fed.algorithm.model
    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    g = torch.autograd.grad(_mean_loss(model, params, task.x[train], task.y[train]), list(params.values()))
    theta = {k: (v - 0.1 * gk).detach() for (k, v), gk in zip(params.items(), g)}
    c = {k: torch.zeros_like(v, requires_grad=True) for k, v in theta.items()}
    gc = torch.autograd.grad(_mean_loss(model, {k: theta[k] - 0.3 * c[k] for k in theta}, task.x[val], task.y[val]),
                             list(c.values()))
    c_new = {k: -0.5 * gk for k, gk in zip(c, gc)}
    fed.run_round(1)
    for k in w:
        torch.testing.assert_close(fed.state.params[k], theta[k] - 0.3 * c_new[k], atol=1e-6, rtol=1e-5)


def test_pfedme_warns_when_its_inner_solve_is_unstable(caplog):
    """personal_lr * lambda < 2 passes the up-front check, but with the loss's curvature L
    the solve can still diverge; the clients report an objective that rose."""
    with caplog.at_level(logging.WARNING, logger="metafed"):
        run(small_config(algorithm="pfedme", rounds=1, personal_lr=0.01, pfedme_lambda=15))
    assert "inner solve raised" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="metafed"):
        run(small_config(algorithm="pfedme", rounds=1, personal_lr=0.13, pfedme_lambda=15, lr=0.01))
    assert "inner solve raised its objective" in caplog.text
