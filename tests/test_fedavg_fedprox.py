"""FedAvg / FedProx / server optimizers: golden numbers, equivalences, backend parity."""
import pytest
import torch

from metafed import tree
from metafed.aggregate import ServerOptimizer, WeightedMean
from metafed.algorithms.fedavg import FedAvg
from metafed.data.federated import ClientData, FederatedDataset
from metafed.federation import Federation
from metafed.backends import LoopBackend, VectorizedBackend
from metafed.models import FunctionalModel, LogisticRegression
from metafed.run import run
from tests.conftest import small_config


def _zero_logistic() -> FunctionalModel:
    module = LogisticRegression(1, 2)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return FunctionalModel(module)


def _client(xs, ys) -> ClientData:
    x = torch.tensor(xs, dtype=torch.float32).view(-1, 1)
    y = torch.tensor(ys)
    return ClientData(x, y, x, y)


def _one_round(clients, lr, backend, server=ServerOptimizer()):
    model = _zero_logistic()
    cfg = small_config(clients_per_round=len(clients), local_steps=1, batch_size=8, lr=lr, num_clients=len(clients))
    ds = FederatedDataset("toy", clients, (1,), 2)
    alg = FedAvg(model, server, lr)
    fed = Federation(cfg, ds, alg, backend, WeightedMean(), alg.init(model.init_params()))
    fed.run_round(1)
    return fed.state.params


@pytest.mark.parametrize("backend", [LoopBackend(), VectorizedBackend()])
def test_two_client_golden_numbers(backend):
    # Zero-initialised logistic regression: softmax is uniform, so the CE gradient is (p - onehot) x.
    # Client A (x=1, y=0): W -> [[.25], [-.25]], b -> [.25, -.25] after one step at lr 0.5.
    # Client B (x=2, y=1, twice): W -> [[-.5], [.5]], b -> [-.25, .25].
    # Sample-weighted (1:2): W = [[-.25], [.25]], b = [-1/12, 1/12].
    params = _one_round([_client([1.0], [0]), _client([2.0, 2.0], [1, 1])], 0.5, backend)
    torch.testing.assert_close(params["linear.weight"], torch.tensor([[-0.25], [0.25]]))
    torch.testing.assert_close(params["linear.bias"], torch.tensor([-1 / 12, 1 / 12]))


def test_one_client_full_batch_step_equals_sgd_by_hand():
    x = torch.tensor([[0.5], [-1.0], [2.0]])
    y = torch.tensor([1, 0, 1])
    params = _one_round([ClientData(x, y, x, y)], 0.3, VectorizedBackend())
    w = torch.zeros(2, 1, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    torch.nn.functional.cross_entropy(x @ w.T + b, y).backward()
    torch.testing.assert_close(params["linear.weight"], -0.3 * w.grad)
    torch.testing.assert_close(params["linear.bias"], -0.3 * b.grad)


def test_fedprox_without_mu_is_refused_and_mu_without_fedprox_too():
    """--algorithm fedprox at mu = 0 would silently run FedAvg; --mu on another algorithm
    would be ignored. Both are configuration errors."""
    from metafed.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="fedprox needs --mu > 0"):
        build_config(algorithm="fedprox")
    with pytest.raises(ConfigError, match="ignores it"):
        build_config(algorithm="ditto", mu=0.1)


def test_fedprox_proximal_term_pulls_towards_global():
    far = run(small_config(algorithm="fedavg", rounds=1, local_epochs=3))
    near = run(small_config(algorithm="fedprox", mu=10.0, rounds=1, local_epochs=3))
    start = far.federation.algorithm.model.init_params()
    assert tree.sq_norm(tree.sub(near.params, start)) < 0.5 * tree.sq_norm(tree.sub(far.params, start))


@pytest.mark.parametrize("overrides", [
    dict(algorithm="fedavg"),  # the fused MLP step (metafed.backends.fused_mlp), active prefixes of chunks
    dict(algorithm="fedavg", stragglers=0.5, straggler_policy="keep"),  # partial work in the fused step
    dict(algorithm="fedprox", mu=0.5, stragglers=0.5),
    dict(algorithm="fedavg", server_momentum=0.9),
    dict(algorithm="fedavg", server_optimizer="adam", server_lr=0.01),
    dict(algorithm="fedavg", server_optimizer="yogi", server_lr=0.01),
])
def test_loop_equals_vectorized(overrides):
    loop = run(small_config(backend="loop", **overrides))
    vec = run(small_config(backend="vectorized", chunk_size=3, **overrides))
    for k in loop.params:
        torch.testing.assert_close(loop.params[k], vec.params[k], atol=1e-5, rtol=0)
    assert loop.rows[-1]["personalized_accuracy"] == pytest.approx(vec.rows[-1]["personalized_accuracy"], abs=1e-6)


def test_adam_and_yogi_first_step_by_hand():
    params = {"w": torch.tensor([1.0, -2.0])}
    delta = {"w": torch.tensor([0.5, -0.1])}
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    m = (1 - b1) * delta["w"]
    v_adam = b2 * tau ** 2 + (1 - b2) * delta["w"] ** 2
    v_yogi = tau ** 2 + (1 - b2) * delta["w"] ** 2  # sign(tau^2 - d^2) = -1 for these deltas
    for name, v in (("adam", v_adam), ("yogi", v_yogi)):
        opt = ServerOptimizer(name, lr, beta1=b1, beta2=b2, tau=tau)
        new, _ = opt.step(params, delta, opt.init(params))
        torch.testing.assert_close(new["w"], params["w"] + lr * m / (v.sqrt() + tau))


def test_momentum_accumulates():
    opt = ServerOptimizer("sgd", 1.0, momentum=0.5)
    p, s = {"w": torch.zeros(1)}, opt.init({"w": torch.zeros(1)})
    d = {"w": torch.ones(1)}
    p, s = opt.step(p, d, s)
    p, s = opt.step(p, d, s)
    assert p["w"].item() == pytest.approx(1.0 + 1.5)


def test_stragglers_dropped_by_fedavg_kept_by_fedprox():
    avg = run(small_config(algorithm="fedavg", stragglers=0.5, rounds=1))
    prox = run(small_config(algorithm="fedprox", mu=0.1, stragglers=0.5, rounds=1))
    assert avg.federation.clients is not None
    assert avg.rows[-1]["clients_used"] == 2 and avg.rows[-1]["clients_sampled"] == 4
    assert prox.rows[-1]["clients_used"] == 4


def test_nan_update_is_rejected_and_model_stays_finite():
    cfg = small_config(lr=1e30, rounds=1)  # diverges to inf/nan on every client
    result = run(cfg)
    assert result.rows[-1]["clients_used"] == 0
    assert tree.all_finite(result.params)


def test_compiled_unrolled_step_equals_eager():
    # torch.compile of the vmapped step, 3 steps per compiled call (padding steps are inactive),
    # two rounds with different cohort step counts: must equal the eager vectorized result
    clients = [_client([0.5, -1.0, 2.0, 0.1, 0.3], [1, 0, 1, 1, 0]), _client([1.0, -2.0], [0, 1]),
               _client([0.2], [1])]
    results = []
    for backend in (VectorizedBackend(), VectorizedBackend(compile=True, unroll=3)):
        model = _zero_logistic()
        cfg = small_config(clients_per_round=3, local_epochs=2, batch_size=2, lr=0.3, num_clients=3)
        alg = FedAvg(model, ServerOptimizer(), 0.3, mu=0.1)
        fed = Federation(cfg, FederatedDataset("toy", clients, (1,), 2), alg, backend, WeightedMean(),
                         alg.init(model.init_params()))
        fed.run_round(1)
        fed.run_round(2)
        results.append(fed.state.params)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name,hidden,mu", [("mlp", (32, 16), 0.0), ("logistic", (), 0.0),
                                                  ("mlp", (32,), 0.5)])
def test_fused_mlp_step_equals_the_generic_vmapped_step(model_name, hidden, mu):
    """The hand-fused batched SGD step (metafed.backends.fused_mlp) equals vmap(grad) + SGD
    on real and padded steps, per client; it only takes programs it can run exactly."""
    import numpy as np

    from metafed.algorithms.fedavg import ProximalSGD
    from metafed.algorithms.local_opt import LocalOptimizer
    from metafed.backends.fused_mlp import fused_sgd_step
    from metafed.models import FunctionalModel, build_model

    torch.manual_seed(0)
    model = FunctionalModel(build_model(model_name, (20,), 5, 0, hidden))
    program = ProximalSGD(model, 0.3, mu=mu)
    fused = fused_sgd_step(program)
    assert fused is not None
    c, b = 6, 7
    params = {k: v[None].repeat(c, *[1] * v.dim()) + 0.1 * torch.randn(c, *v.shape) for k, v in
              model.init_params().items()}
    x, y = torch.randn(c, b, 20), torch.randint(0, 5, (c, b))
    mask = torch.ones(c, b)
    mask[1, 3:] = 0.0  # a short batch
    mask[4] = 0.0  # a padded step: must change nothing
    anchor = model.init_params()  # FedProx's pull target: the broadcast params
    got, loss = fused({k: v.clone() for k, v in params.items()}, x, y, mask, anchor)  # it updates in place

    def generic(p, xb, yb, mb):
        return program.step({"params": anchor}, {"params": p}, {"x": xb[None], "y": yb[None], "mask": mb[None]})

    want, want_loss = torch.vmap(generic)(params, x, y, mask)
    for k in params:
        torch.testing.assert_close(got[k], want["params"][k], atol=1e-6, rtol=1e-5)
        if mu == 0:
            assert torch.equal(got[k][4], params[k][4])  # an all-padding batch: no change
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
    assert float(loss[4]) == 0.0
    from metafed.algorithms.finetune import FineTune

    assert fused_sgd_step(FineTune(model, 0.3)) is not None  # evaluation's fine-tuning is plain SGD too
    # what it must not take: a proximal term, optimizer state, another loss
    assert fused_sgd_step(ProximalSGD(model, 0.3, local_opt=LocalOptimizer("adam", 0.3))) is None
    assert fused_sgd_step(ProximalSGD(FunctionalModel(model.module, lambda o, t: (o - 0).sum(-1)), 0.3)) is None
    assert np.isfinite(float(loss.sum()))
