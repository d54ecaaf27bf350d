"""The Ray backend on a local Ray: parity with the vectorized backend, a worker killed
mid-round retried with an unchanged result, and its configuration errors."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from metafed import tree
from metafed.config import ConfigError, build_config
from metafed.run import run
from tests.conftest import small_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # two worker CPUs, a small object store: enough for digits, light on a 2-core CI machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    # the test's own program class must reach the workers by value (tests/ is not installed there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(algorithm="fedavg", stragglers=0.5, straggler_policy="keep"),
    dict(algorithm="ditto", ditto_lambda=0.5),
    # federated distillation: each architecture group's clients are one Ray-split backend call
    dict(algorithm="fd", client_models="mlp:0.5,small-cnn:0.5", num_clients=8, clients_per_round=6),
])
def test_ray_equals_vectorized(overrides):
    """Same global model and (Ditto) the same personal models, to 1e-5."""
    vec = run(small_config(backend="vectorized", **overrides))
    on_ray = run(small_config(backend="ray", ray_workers=2, **overrides))
    _assert_same(vec.params, on_ray.params)
    assert vec.rows[-1]["personalized_accuracy"] == pytest.approx(on_ray.rows[-1]["personalized_accuracy"], abs=1e-6)
    vec_states, ray_states = vec.federation.pool.clients, on_ray.federation.pool.clients
    assert len(vec_states) == len(ray_states)
    _assert_same(vec_states.to_tensors(), ray_states.to_tensors())


@dataclass(frozen=True)
class DiesOnce:
    """A program whose first run anywhere kills its worker process (as a machine lost
    mid-round would): the marker file records that it happened."""

    inner: object
    marker: str

    @property
    def batches_per_step(self):
        return self.inner.batches_per_step

    def init(self, shared, client):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.inner.init(shared, client)

    def step(self, shared, carry, batch):
        return self.inner.step(shared, carry, batch)

    def final(self, shared, carry, client):
        return self.inner.final(shared, carry, client)


def test_killed_worker_is_retried_and_the_round_is_unchanged(tmp_path):
    from metafed.backends import make_backend
    from metafed.run import build_federation

    fed = build_federation(small_config(algorithm="fedavg"))
    program = fed.algorithm.client_program(1)
    broadcast = fed.algorithm.broadcast(fed.state, 1)
    tasks = [fed.pool.task(c, 1, program, broadcast) for c in range(6)]
    expected_out, expected_loss = fed.backend.run(program, broadcast, tasks)

    backend = make_backend("ray", dataset=fed.dataset, ray_workers=2)
    marker = tmp_path / "died"
    out, loss = backend.run(DiesOnce(program, str(marker)), broadcast, tasks)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker, not this process, died
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    _assert_same(tree.nested_flatten(expected_out), tree.nested_flatten(out))


def test_packed_clients_are_views_of_each_clients_data():
    from metafed.backends.ray_cluster import PackedClients

    xs = [torch.randn(n, 3) for n in (4, 1, 7)]
    ys = [torch.arange(n) for n in (4, 1, 7)]
    packed = PackedClients.of(xs, ys)
    for c in range(3):
        x, y = packed.client(c)
        assert torch.equal(x, xs[c]) and torch.equal(y, ys[c])
    assert packed.offsets.tolist() == [0, 4, 5, 12]


def test_ray_settings_need_the_ray_backend():
    with pytest.raises(ConfigError, match="--ray-workers has no effect without --backend ray"):
        build_config(ray_workers=2)
    with pytest.raises(ConfigError, match="--ray-address has no effect without --backend ray"):
        build_config(ray_address="10.0.0.1:6379")
    assert build_config(backend="ray", ray_workers=2).ray_workers == 2


def test_unreachable_cluster_is_a_clear_error():
    """A wrong --ray-address names the address (checked in a child: this process's Ray is up)."""
    import subprocess

    code = ("from metafed.backends.ray_cluster import RayBackend, PackedClients; import torch;"
            "b = RayBackend(PackedClients.of([torch.zeros(1, 1)], [torch.zeros(1, dtype=torch.long)]),"
            " address='127.0.0.1:1');\ntry:\n b._connect()\nexcept ConnectionError as e:\n print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR cannot join the Ray cluster at 127.0.0.1:1" in out.stdout, out.stdout + out.stderr[-2000:]


def test_clients_built_on_demand_travel_as_a_recipe():
    """A W1 federation of 50,000 clients on Ray: workers build the clients they train (the
    driver packs nothing), and the round equals the vectorized backend's."""
    from metafed.data.lazy import LazyClients

    cfg = dict(dataset="w1", num_clients=50_000, clients_per_round=12, rounds=2, model="mlp", eval_clients=5)
    vec = run(small_config(backend="vectorized", **cfg))
    on_ray = run(small_config(backend="ray", ray_workers=2, **cfg))
    assert isinstance(on_ray.federation.backend.packed, LazyClients)
    _assert_same(vec.params, on_ray.params)
