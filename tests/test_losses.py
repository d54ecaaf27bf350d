"""Your own loss and score (metafed.losses): regression trains on both backends alike, the
per-sample functions are checked up front, and what cannot work is refused by name."""
import pytest
import torch
from torch import nn

from metafed import RunConfig, run
from metafed.data.federated import ClientData, FederatedDataset
from metafed.losses import cross_entropy, mse, top1, within
from metafed.models import FunctionalModel


def _regression_data(num_clients: int = 4, n: int = 30) -> FederatedDataset:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    clients = []
    for c in range(num_clients):
        x = torch.randn(n, 3, generator=g)
        y = x @ w + c * 0.5
        clients.append(ClientData(x[:20], y[:20], x[20:], y[20:], name=f"c{c}"))
    return FederatedDataset("reg", clients, input_shape=(3,), num_classes=1)


def _linear() -> nn.Module:
    return nn.Linear(3, 1)


CFG = dict(num_clients=4, clients_per_round=2, rounds=3, lr=0.05, batch_size=8, local_epochs=1, progress=False,
           personalize_steps=2)


def test_mse_loss_and_within_score_match_a_by_hand_computation():
    model = FunctionalModel(_linear(), mse, within(0.5))
    params = model.init_params()
    x, y = torch.randn(6, 3), torch.randn(6)
    mask = torch.tensor([1.0, 1, 1, 1, 0, 0])
    pred = x @ params["weight"][0] + params["bias"]
    torch.testing.assert_close(model.loss(params, x, y, mask), ((pred - y)[:4] ** 2).mean())
    correct, loss_sum = model.correct_and_loss(params, x, y, mask)
    assert correct == ((pred - y).abs()[:4] <= 0.5).sum()
    torch.testing.assert_close(loss_sum, ((pred - y)[:4] ** 2).sum())


def test_regression_trains_and_the_two_backends_agree():
    data = _regression_data()
    runs = [run(RunConfig(**CFG, backend=b, algorithm="ditto", ditto_lambda=0.1), model=_linear, data=data,
                loss=mse, score=within(0.5)) for b in ("loop", "vectorized")]
    for k in runs[0].params:
        torch.testing.assert_close(runs[0].params[k], runs[1].params[k], atol=1e-5, rtol=0)
    first = run(RunConfig(**{**CFG, "rounds": 1}), model=_linear, data=data, loss=mse, score=within(0.5))
    assert runs[0].rows[-1]["global_loss"] < first.rows[-1]["global_loss"]  # training lowers the test MSE


def test_default_loss_and_score_are_cross_entropy_and_top1():
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    torch.testing.assert_close(cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    assert top1(logits, y).tolist() == [1.0, 0.0]


def test_what_cannot_work_is_refused_by_name():
    data = _regression_data()
    with pytest.raises(ValueError, match="targets are floats .* pass score="):
        run(RunConfig(**CFG), model=_linear, data=data, loss=mse)
    with pytest.raises(ValueError, match="one value per sample, shape \\(4,\\), got \\(\\)"):
        run(RunConfig(**CFG), model=_linear, data=data, loss=lambda out, y: ((out.squeeze(-1) - y) ** 2).mean(),
            score=within(0.5))
    with pytest.raises(ValueError, match="score.* must be in \\[0, 1\\]"):
        run(RunConfig(**CFG), model=_linear, data=data, loss=mse, score=lambda out, y: 2 + 0 * y)
    with pytest.raises(ValueError, match="label-flip rewrites class labels"):
        run(RunConfig(**CFG, attack="label-flip", malicious_fraction=0.25), model=_linear, data=data, loss=mse,
            score=within(0.5))
    with pytest.raises(ValueError, match="runs in simulation"):
        run(RunConfig(**CFG), pool=object(), loss=mse)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        within(0)
