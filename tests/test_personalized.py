"""Meta-learning and personalized algorithms: math checks, degenerate equivalences, parity."""
import numpy as np
import pytest
import torch
from torch.func import grad

from metafed import tree
from metafed.aggregate import Attention
from metafed.algorithms import ALGORITHMS
from metafed.algorithms.maml import meta_gradient
from metafed.algorithms.per_fedavg import hessian_vector_product
from metafed.algorithms.pfedme import moreau_inner_solve
from metafed.config.aliases import ALGORITHM_KEYS
from metafed.backends.base import step_batch
from metafed.data.schedule import client_schedule
from metafed.run import run
from tests.conftest import small_config



def _quadratic(seed=0, dim=4):
    g = torch.Generator().manual_seed(seed)
    mats, centres = [], []
    for _ in range(3):
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        mats.append(a @ a.T / dim + torch.eye(dim, dtype=torch.float64))
        centres.append(torch.randn(dim, generator=g, dtype=torch.float64))
    loss = lambda p, j: 0.5 * (p["w"] - centres[j]) @ mats[j] @ (p["w"] - centres[j])  # noqa: E731
    return loss, mats, centres


def test_fomaml_equals_hand_gradient_on_quadratic():
    loss, A, c = _quadratic()
    p = {"w": torch.randn(4, dtype=torch.float64)}
    alpha = 0.1
    adapted = p["w"] - alpha * A[0] @ (p["w"] - c[0])
    g, _ = meta_gradient(loss, p, alpha, 1, first_order=True)
    torch.testing.assert_close(g["w"], A[1] @ (adapted - c[1]))
    g2, _ = meta_gradient(loss, p, alpha, 1, first_order=False)  # true MAML: (I - alpha A0) A1 (adapted - c1)
    torch.testing.assert_close(g2["w"], (torch.eye(4, dtype=torch.float64) - alpha * A[0]) @ A[1] @ (adapted - c[1]))


def test_second_order_maml_matches_finite_differences_on_a_network():
    torch.manual_seed(0)
    params = {"w1": torch.randn(5, 3, dtype=torch.float64), "w2": torch.randn(2, 5, dtype=torch.float64)}
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 8))

    def loss(p, j):
        logits = torch.tanh(x[j] @ p["w1"].T) @ p["w2"].T
        return torch.nn.functional.cross_entropy(logits, y[j])

    g, _ = meta_gradient(loss, params, 0.5, 2, first_order=False)
    meta = lambda p: meta_gradient(loss, p, 0.5, 2, first_order=False)[1]  # noqa: E731
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-5
    numeric = (meta(tree.add(params, direction, eps)) - meta(tree.add(params, direction, -eps))) / (2 * eps)
    assert float(tree.dot(g, direction)) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)
    g_first, _ = meta_gradient(loss, params, 0.5, 2, first_order=True)
    assert float(tree.sq_norm(tree.sub(g, g_first))) > 1e-8  # the second-order terms matter here


def test_hessian_vector_product_equals_double_backward():
    torch.manual_seed(1)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(10, 4, dtype=torch.float64)
    f = lambda p: torch.log1p(torch.exp(x @ p["w"].T)).sum()  # noqa: E731
    v = torch.randn(6, 4, dtype=torch.float64)
    hv = hessian_vector_product(f, {"w": w.detach()}, {"w": v})["w"]
    (g,) = torch.autograd.grad(f({"w": w}), w, create_graph=True)
    (expected,) = torch.autograd.grad((g * v).sum(), w)
    torch.testing.assert_close(hv, expected)


def test_pfedme_inner_solve_reaches_moreau_minimizer():
    loss, A, c = _quadratic()
    w = {"w": torch.randn(4, dtype=torch.float64)}
    lam = 2.0
    theta = moreau_inner_solve(grad(lambda p: loss(p, 0)), w, w, lam, lr=0.1, steps=500)
    # argmin f + lam/2 ||theta - w||^2 solves (A0 + lam I) theta = A0 c0 + lam w
    exact = torch.linalg.solve(A[0] + lam * torch.eye(4, dtype=torch.float64), A[0] @ c[0] + lam * w["w"])
    torch.testing.assert_close(theta["w"], exact)


def test_reptile_eps_one_equals_fedavg():
    a = run(small_config(algorithm="fedavg"))
    b = run(small_config(algorithm="reptile", server_lr=1.0))
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    c = run(small_config(algorithm="reptile", server_lr=0.5, rounds=1))
    start = c.federation.algorithm.model.init_params()
    one = run(small_config(algorithm="fedavg", rounds=1))
    for k in start:  # eps = 0.5 lands halfway between the start and FedAvg's average
        torch.testing.assert_close(c.params[k], start[k] + 0.5 * (one.params[k] - start[k]))


def test_ditto_lambda_zero_is_purely_local_training():
    # every client participates every round; with lambda = 0 the personal model must equal
    # plain local SGD on the client's own batches, whatever the global model does
    cfg = small_config(algorithm="ditto", ditto_lambda=0.0, clients_per_round=8, rounds=3)
    fed = run(cfg).federation
    model = fed.algorithm.model
    for cid in (0, 5):
        data = fed.dataset.clients[cid]
        v = model.init_params()
        for rnd in (1, 2, 3):
            sched = client_schedule(data.num_train, batch_size=cfg.batch_size, epochs=cfg.local_epochs, steps=None,
                                    batches_per_step=1, rng=np.random.default_rng([cfg.seed, 3, rnd, cid]))
            for s in torch.from_numpy(sched):
                b = step_batch(data.train_x, data.train_y, s)
                g = grad(lambda p: model.loss(p, b["x"][0], b["y"][0], b["mask"][0]))(v)
                v = {k: v[k] - cfg.lr * g[k] for k in v}
        personal = fed.clients.get(cid, dict)["personal"]
        for k in v:
            torch.testing.assert_close(personal[k], v[k], atol=1e-5, rtol=1e-5)


def test_meta_sgd_learning_rates_move_and_stay_finite():
    result = run(small_config(algorithm="meta-sgd", inner_lr=0.05, lr=0.05, rounds=3))
    lrs = result.federation.state.extra
    moved = max(float((v - 0.05).abs().max()) for v in lrs.values())
    assert moved > 1e-4
    assert all(torch.isfinite(v).all() for v in lrs.values())


def test_attention_weights_sum_to_one_and_are_uniform_for_equal_scores():
    updates = {"update": {"w": torch.randn(5, 3)}}
    n = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    att = Attention("loss", temperature=0.7)
    w = att.weights(updates, n, torch.tensor([0.3, 0.1, 0.9, 0.5, 0.2]))
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 1  # lowest loss weighs most
    torch.testing.assert_close(att.weights(updates, n, torch.full((5,), 0.4)), torch.full((5,), 0.2, dtype=torch.float64))
    same = {"update": {"w": torch.ones(5, 3)}}
    torch.testing.assert_close(Attention("cosine").weights(same, n, None), torch.full((5,), 0.2, dtype=torch.float64))


PERSONALIZED = ["reptile", "maml", "fomaml", "meta-sgd", "per-fedavg-fo", "per-fedavg-hf", "personalized-fedavg",
                "pfedme", "ditto", "meta-updater"]


@pytest.mark.parametrize("name", [*PERSONALIZED, "meta-updater-delta"])
def test_loop_equals_vectorized(name):
    delta = name == "meta-updater-delta"
    name = name.removesuffix("-delta")
    extra = dict(algorithm=name, rounds=2, server_lr=0.5 if name == "reptile" else 1.0,
                 heldout_fraction=0.25, meta_order="second" if name == "meta-updater" and not delta else "first")
    if name in ALGORITHM_KEYS["inner_lr"]:
        extra["inner_lr"] = 0.05
    if name == "personalized-fedavg":
        extra["stage1_rounds"] = 1
    if delta:
        extra["meta_formulation"] = "delta"
    loop = run(small_config(backend="loop", **extra))
    vec = run(small_config(backend="vectorized", chunk_size=2, **extra))
    for k in loop.params:
        torch.testing.assert_close(loop.params[k], vec.params[k], atol=1e-5, rtol=0)
    for key in ("personalized_accuracy", "new_client_accuracy_k5"):
        assert loop.rows[-1][key] == pytest.approx(vec.rows[-1][key], abs=1e-6), key


def test_attention_aggregator_runs_with_any_algorithm():
    for name, score in (("fedavg", "cosine"), ("meta-updater", "loss")):
        result = run(small_config(algorithm=name, aggregator="attention", attention_score=score))
        assert tree.all_finite(result.params)


def test_every_algorithm_is_listed_with_a_paper():
    assert set(PERSONALIZED) | {"fedavg", "fedprox", "fedmd", "feddf", "fd"} == set(ALGORITHMS)
    assert all(spec.paper and spec.summary for spec in ALGORITHMS.values())
