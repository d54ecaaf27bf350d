"""--local-optimizer momentum|adam: the client's steps are exactly torch.optim's, the state
starts fresh each round, both backends agree, and algorithms with a fixed local solver refuse it."""
import pytest
import torch
from torch import nn

from metafed.algorithms.fedavg import ProximalSGD
from metafed.algorithms.local_opt import LocalOptimizer
from metafed.config import ConfigError, build_config
from metafed.models import FunctionalModel
from metafed.run import run
from tests.conftest import small_config


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_local_steps_equal_torch_optim(name):
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    model = FunctionalModel(module)
    program = ProximalSGD(model, 0.05, local_opt=LocalOptimizer(name, 0.05, momentum=0.8))
    reference = nn.Linear(4, 3)
    reference.load_state_dict(module.state_dict())
    optim = (torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.8) if name == "momentum"
             else torch.optim.Adam(reference.parameters(), lr=0.05))
    shared = {"params": model.init_params()}
    carry = program.init(shared, {})
    for _ in range(4):
        x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        batch = {"x": x[None], "y": y[None], "mask": torch.ones(1, 5)}
        carry, _ = program.step(shared, carry, batch)
        optim.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optim.step()
    for k, v in reference.named_parameters():
        torch.testing.assert_close(carry["params"][k], v.detach(), atol=1e-6, rtol=1e-5)


def test_adam_clients_agree_across_backends_and_differ_from_sgd():
    extra = dict(local_optimizer="adam", lr=0.01, rounds=2, algorithm="fedprox", mu=0.1, stragglers=0.5)
    loop, vec = run(small_config(backend="loop", **extra)), run(small_config(backend="vectorized", **extra))
    for k in loop.params:
        torch.testing.assert_close(loop.params[k], vec.params[k], atol=1e-5, rtol=0)
    sgd = run(small_config(backend="vectorized", **{**extra, "local_optimizer": "sgd"}))
    assert any(not torch.allclose(sgd.params[k], vec.params[k]) for k in vec.params)


def test_local_optimizer_is_refused_where_the_paper_fixes_the_solver():
    with pytest.raises(ConfigError, match="algorithm 'pfedme' ignores it"):
        build_config(algorithm="pfedme", local_optimizer="adam")
    with pytest.raises(ConfigError, match="--local-momentum has no effect without --local-optimizer momentum"):
        build_config(local_momentum=0.5)
    assert build_config(algorithm="reptile", local_optimizer="momentum", local_momentum=0.5).local_momentum == 0.5
