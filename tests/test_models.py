"""Reference models run under vmap exactly as unbatched (the vectorized backend's premise)."""
import pytest
import torch

from metafed.models import FunctionalModel, build_model


@pytest.mark.parametrize("name,shape,classes,x", [
    ("logistic", (60,), 10, lambda: torch.randn(5, 60)),
    ("mlp", (64,), 10, lambda: torch.randn(5, 64)),
    ("cnn", (784,), 62, lambda: torch.rand(5, 784)),
    ("lstm", (80,), 80, lambda: torch.randint(0, 80, (5, 12))),
])
def test_model_vmaps_like_unbatched(name, shape, classes, x):
    model = FunctionalModel(build_model(name, shape, classes, seed=0, hidden=(16,)))
    params = model.init_params()
    xs = torch.stack([x(), x()])
    stacked = {k: torch.stack([v, v + 0.01]) for k, v in params.items()}
    batched = torch.vmap(model.apply)(stacked, xs)
    assert batched.shape == (2, 5, classes)
    for c in range(2):
        single = model.apply({k: v[c] for k, v in stacked.items()}, xs[c])
        torch.testing.assert_close(batched[c], single, atol=1e-5, rtol=1e-5)


def test_femnist_cnn_layout():
    model = build_model("cnn", (784,), 62, seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert shapes["conv1.weight"] == (32, 1, 5, 5) and shapes["conv2.weight"] == (64, 32, 5, 5)
    assert shapes["fc.weight"] == (2048, 3136) and shapes["out.weight"] == (62, 2048)


def test_check_params_names_the_problem():
    model = FunctionalModel(build_model("logistic", (4,), 3, seed=0))
    params = model.init_params()
    with pytest.raises(ValueError, match="linear.weight"):
        model.check_params({**params, "linear.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="NaN"):
        model.check_params({**params, "linear.bias": torch.full((3,), float("nan"))})


def test_masked_padding_contributes_nothing():
    model = FunctionalModel(build_model("logistic", (3,), 2, seed=0))
    p = model.init_params()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    full = model.loss(p, x[:2], y[:2], torch.ones(2))
    padded = model.loss(p, x, y, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(full, padded)
    assert model.loss(p, x, y, torch.zeros(4)).item() == 0.0


@pytest.mark.parametrize("layer,needle", [(lambda: torch.nn.BatchNorm1d(16), "GroupNorm"),
                                          (lambda: torch.nn.Dropout(0.3), "Dropout with p=0.3")])
def test_stateful_layers_are_refused_up_front_with_the_fix(layer, needle):
    """A BatchNorm or Dropout model gets one clear error before any training (the CLI prints
    it on one line), not a failure deep inside torch.func."""
    from metafed.config import RunConfig
    from metafed.run import run

    def model():
        return torch.nn.Sequential(torch.nn.Linear(64, 16), layer(), torch.nn.ReLU(), torch.nn.Linear(16, 10))

    with pytest.raises(ValueError, match=needle):
        run(RunConfig(rounds=1, progress=False), model=model)
    run(RunConfig(rounds=1, progress=False), model=lambda: torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.Dropout(0.0), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 10)))  # p = 0 and GroupNorm are fine
