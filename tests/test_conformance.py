"""Conformance, driven by the algorithm registry (``metafed.algorithms.ALGORITHMS``), never a
hand list: every algorithm on the loop backend (the reference), the vectorized backend, a
local Ray cluster and the real ClientApp handlers, each checked for parity, resume bit for
bit, the shapes of the client states it keeps, and a toy convergence. A new algorithm is
picked up by registering it."""
from __future__ import annotations

import pytest
import torch

from metafed import tree
from metafed.algorithms import ALGORITHMS
from metafed.distill import DISTILLATION
from metafed.run import run
from tests.conftest import small_config

REGISTRY = sorted(ALGORITHMS)

# the settings each algorithm cannot run without (FedProx needs mu > 0; the public-input
# distillation algorithms a public split small enough for the toy federation)
NEEDS = {"fedprox": {"mu": 0.1}, "fedmd": {"public_size": 60, "public_subset": 30},
         "feddf": {"public_size": 60, "distill_steps": 5}}


def config(name: str, **overrides):
    base = dict(algorithm=name, num_clients=6, clients_per_round=3, rounds=2, local_steps=3, **NEEDS.get(name, {}))
    return small_config(**{**base, **overrides})


def _same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_the_registry_lists_every_algorithm_with_its_paper():
    assert len(REGISTRY) >= 15
    assert all(spec.summary and spec.paper for spec in ALGORITHMS.values())


@pytest.mark.parametrize("name", REGISTRY)
def test_loop_equals_vectorized(name):
    loop = run(config(name, backend="loop"))
    vec = run(config(name, backend="vectorized"))
    _same(vec.params, loop.params, atol=1e-5)
    assert vec.rows[-1].keys() == loop.rows[-1].keys()
    for key in ("train_loss", "global_accuracy", "personalized_accuracy"):
        assert vec.rows[-1].get(key) == pytest.approx(loop.rows[-1].get(key), abs=1e-5), key


@pytest.mark.parametrize("name", REGISTRY)
def test_resume_continues_bit_for_bit(name, tmp_path):
    straight = run(config(name, rounds=3, out=str(tmp_path / "straight")))
    run(config(name, rounds=2, out=str(tmp_path / "resumed")))
    resumed = run(config(name, rounds=3, out=str(tmp_path / "resumed")), resume=tmp_path / "resumed")
    for k, v in straight.params.items():
        assert torch.equal(resumed.params[k], v), k
    assert resumed.rows[-1]["train_loss"] == straight.rows[-1]["train_loss"]


@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in DISTILLATION])
def test_client_states_keep_the_shapes_client_init_gives(name):
    result = run(config(name, rounds=3))
    fed = result.federation
    fresh = fed.algorithm.client_init(fed.algorithm.broadcast(fed.state, 1))
    ids = fed.clients.ids()
    if not tree.nested_leaves(fresh):
        assert ids == [], f"{name} keeps no client state, but the store holds {ids}"
        return
    assert ids, f"{name} keeps client state, but no client stored any"
    expected = {k: (v.shape, v.dtype) for k, v in tree.nested_flatten(fresh).items()}
    for cid in ids:
        kept = tree.nested_flatten(fed.clients.get(cid, lambda: {}))
        assert {k: (v.shape, v.dtype) for k, v in kept.items()} == expected, cid
        assert all(torch.isfinite(v).all() for v in kept.values()), cid


@pytest.mark.parametrize("name", REGISTRY)
def test_a_toy_federation_learns(name):
    """8x8 digits, 6 clients: after 8 rounds the global or the personalized model (FedMD and
    FD have no global model) scores at least three times chance (10 classes) and 0.1 above
    its first evaluation."""
    result = run(config(name, rounds=8, eval_every=1, local_steps=10))

    def best(row):
        return max(row.get("global_accuracy", 0.0), row.get("personalized_accuracy", 0.0))

    assert best(result.rows[-1]) >= 0.3, (name, result.rows[-1])
    assert best(result.rows[-1]) >= best(result.rows[0]) + 0.1, (name, best(result.rows[0]), best(result.rows[-1]))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", REGISTRY)
def test_ray_equals_vectorized(name, local_ray):
    vec = run(config(name, backend="vectorized"))
    on_ray = run(config(name, backend="ray", ray_workers=2, chunk_size=2))
    _same(on_ray.params, vec.params, atol=1e-5)



@pytest.mark.parametrize("name", REGISTRY)
def test_client_app_handlers_equal_the_simulation(name, tmp_path, server_task):
    """Every algorithm through metafed's real ClientApp handlers (node data, the task, personal
    state on the node's disk, federated evaluation) over a fake Grid, against the simulation
    with the loop backend. The distillation algorithms deploy too: each node trains its
    group's architecture, the server holds the public inputs it needs."""
    from tests.test_deploy_pool import _client_app_equals_the_simulation

    from metafed.run import build_federation

    cfg = config(name, num_clients=3, clients_per_round=2, backend="loop")
    algorithm = build_federation(cfg).algorithm
    keys = ["personalized_accuracy", "train_loss"]
    if getattr(algorithm, "has_global_model", True):
        keys.append("global_accuracy")
    if not algorithm.combines_groups:
        keys.append("global_train_loss")
    _client_app_equals_the_simulation(cfg, tmp_path, keys=tuple(keys))
