"""Your own nn.Module and data in deployment: ``flower_apps(model, node_data)`` and nodes
serving a safetensors file, through the real Flower ClientApp object (message routing
included) and the Flower pool, equal the simulation of the same model and data."""
import pytest
import torch
from torch import nn

flwr = pytest.importorskip("flwr")
from flwr.app import Context, RecordDict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from metafed.data.federated import ClientData, FederatedDataset  # noqa: E402
from metafed.deploy import NodeData, flower_apps  # noqa: E402
from metafed.deploy.node import NodeConfigError, load_node_file  # noqa: E402
from metafed.deploy.pool import FlowerPool  # noqa: E402
from metafed.run import run  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.test_deploy_pool import FakeGrid  # noqa: E402


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class TinyConvNet(nn.Module):
    """A user's model: conv + GroupNorm on 1x8x8 images, 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _client(k: int) -> ClientData:
    g = torch.Generator().manual_seed(k)
    y = torch.randint(0, 3, (60,), generator=g)
    x = torch.randn(60, 8, 8, generator=g) + y.view(-1, 1, 1).float()  # separable by mean intensity
    return ClientData(x[:45], y[:45], x[45:], y[45:], f"client-{k}")


def _run_through(client_app, node_configs, cfg):
    contexts = {100 + c: Context(run_id=1, node_id=100 + c, node_config=nc, state=RecordDict(), run_config={})
                for c, nc in enumerate(node_configs)}
    pool = FlowerPool(FakeGrid(len(node_configs), lambda m: client_app(m, contexts[m.metadata.dst_node_id])), cfg,
                      len(node_configs), 1, 1)
    return pool


@pytest.mark.parametrize("algorithm", ["fedavg", "ditto"])
def test_flower_apps_with_your_model_and_datasets_equal_the_simulation(algorithm, tmp_path):
    cfg = small_config(algorithm=algorithm, num_clients=3, clients_per_round=2, rounds=2, backend="loop",
                       local_steps=2, batch_size=8)
    clients = [_client(k) for k in range(3)]

    def node_data(context):
        k = int(context.node_config["client-id"])
        c = clients[k]
        return NodeData(k, 3, PairDataset(c.train_x, c.train_y), PairDataset(c.test_x, c.test_y),
                        state_dir=str(tmp_path / f"node-{k}"))

    server_app, client_app = flower_apps(TinyConvNet, node_data)
    pool = _run_through(client_app, [{"client-id": k} for k in range(3)], cfg)
    deployed = run(cfg, pool=pool, model=TinyConvNet)
    sim = run(cfg, model=TinyConvNet, data=FederatedDataset("mine", clients, (8, 8), 3))
    assert set(deployed.params) == {"conv.weight", "conv.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed.params[k], v, atol=1e-5, rtol=0)
    for key in ("global_accuracy", "personalized_accuracy", "train_loss"):
        assert deployed.rows[-1][key] == pytest.approx(sim.rows[-1][key], abs=1e-6), key


def test_nodes_serving_safetensors_files_equal_the_simulation(tmp_path):
    """A party without Python code: its SuperNode serves a safetensors file (metafed's node
    format); the config's reference model (mlp) is built from the shapes the nodes report."""
    from metafed.deploy.client_app import make_client_app

    cfg = small_config(num_clients=3, clients_per_round=3, rounds=2, backend="loop", local_steps=2, batch_size=8)
    clients = [_client(k) for k in range(3)]
    configs = []
    for k, c in enumerate(clients):
        path = tmp_path / f"party-{k}.safetensors"
        save_file({"train_x": c.train_x, "train_y": c.train_y, "test_x": c.test_x, "test_y": c.test_y}, str(path))
        configs.append({"data-file": str(path), "client-id": k, "num-classes": 3, "state-dir": str(tmp_path / str(k))})
    deployed = run(cfg, pool=_run_through(make_client_app(), configs, cfg))
    sim = run(cfg, data=FederatedDataset("mine", clients, (8, 8), 3))
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed.params[k], v, atol=1e-5, rtol=0)


def test_bad_node_files_and_datasets_get_clear_errors(tmp_path):
    c = _client(0)
    good = {"train_x": c.train_x, "train_y": c.train_y, "test_x": c.test_x, "test_y": c.test_y}
    cases = {
        "missing": {k: v for k, v in good.items() if k != "test_y"},
        "float-labels": {**good, "train_y": c.train_y.float()},
        "negative-labels": {**good, "train_y": -c.train_y - 1},
        "nan": {**good, "train_x": torch.full_like(c.train_x, float("nan"))},
        "rows": {**good, "train_y": c.train_y[:-1]},
        "shape": {**good, "test_x": torch.zeros(15, 4, 4)},
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(NodeConfigError):
            load_node_file(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(NodeConfigError, match="cannot read"):
        load_node_file(tmp_path / "junk.safetensors")
    assert load_node_file(_save(tmp_path, good)).num_train == 45


def _save(tmp_path, tensors):
    path = tmp_path / "good.safetensors"
    save_file(tensors, str(path))
    return path
