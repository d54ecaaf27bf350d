import os
from pathlib import Path

import pytest
import torch

from metafed.config import RunConfig

SHARED_DATA = Path(os.environ.get("METAFED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def small_config(**overrides) -> RunConfig:
    """A few-second digits job used across tests."""
    base = dict(dataset="digits", num_clients=8, clients_per_round=4, rounds=3, local_epochs=1, batch_size=16,
                lr=0.1, personalize_steps=2, progress=False, hidden=[32])
    base.update(overrides)
    return RunConfig(**base)


def needs_shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture
def server_task(monkeypatch):
    """Messages are created as by a ServerApp task (the run context Flower sets up), so the
    real ClientApp handlers and FlowerPool can be driven in-process."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attribute, value)
