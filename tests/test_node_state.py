"""A node's private state (issue 22): per-user private folders, refused when others could
write there, state keyed by run, a planted partition cache never trusted for the client id,
key files never written through a planted link. Through the real ClientApp handlers."""
from __future__ import annotations

import os
import stat

import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from metafed.deploy import client_app  # noqa: E402
from metafed.deploy.node import load_node  # noqa: E402
from metafed.deploy.wire import to_records  # noqa: E402
from metafed.run import build_federation  # noqa: E402
from tests.conftest import small_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("server_task")

CFG = dict(num_clients=4, clients_per_round=4, rounds=1, backend="loop", local_steps=2)


@pytest.fixture(autouse=True)
def _fresh_node_cache():
    load_node.cache_clear()  # each test's nodes are loaded from their own folders


def _train(cfg, node_config: dict, rnd: int = 1):
    fed = build_federation(cfg)
    content = RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": rnd}),
                          "broadcast": to_records(fed.algorithm.broadcast(fed.state, rnd))})
    ctx = Context(run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config={})
    return client_app.train(Message(content, 100, "train"), ctx)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_default_state_folder_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("METAFED_NODE_STATE", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    reply = _train(small_config(**CFG, algorithm="ditto"), {"dataset": "digits", "partition-id": 1,
                                                             "num-partitions": 4})
    assert not reply.has_error()
    folder = tmp_path / "home" / ".local" / "state" / "metafed" / "nodes" / "partition-1"
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and all(_mode(p) == 0o600 for p in files), [(p, oct(_mode(p))) for p in files]
    assert all(_mode(p) == 0o700 for p in folder.rglob("*") if p.is_dir())
    assert not any(str(p).startswith("/tmp/metafed-node") for p in files)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_state_folder_others_can_write_is_refused(tmp_path, mode):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    reply = _train(small_config(**CFG), {"dataset": "digits", "partition-id": 0, "num-partitions": 4,
                                         "state-dir": str(folder)})
    assert reply.has_error() and "writable by group or others" in reply.error.reason
    assert list(folder.iterdir()) == []  # nothing of the node's data or state was written there


def test_a_link_in_place_of_the_state_folder_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    reply = _train(small_config(**CFG), {"dataset": "digits", "partition-id": 0, "num-partitions": 4,
                                         "state-dir": str(tmp_path / "link")})
    assert reply.has_error() and "symbolic link" in reply.error.reason and list(target.iterdir()) == []


def test_personal_state_is_keyed_by_run(tmp_path):
    """A second run on the same node starts from a fresh personal model, not the first run's;
    the same run resumed (more rounds) finds its own."""
    node_config = {"dataset": "digits", "partition-id": 0, "num-partitions": 4, "state-dir": str(tmp_path / "n")}
    first = small_config(**CFG, algorithm="ditto", lr=0.1)
    assert not _train(first, node_config).has_error()
    fed = build_federation(first)
    fresh = fed.algorithm.client_init(fed.algorithm.broadcast(fed.state, 1))
    node = load_node(first.model_dump_json(), "digits", 0, 4, str(tmp_path / "n"))
    kept = node.load_state(fed.algorithm.broadcast(fed.state, 1))
    assert any(not (kept["personal"][k] == fresh["personal"][k]).all() for k in fresh["personal"])
    other = small_config(**CFG, algorithm="ditto", lr=0.05)
    other_node = load_node(other.model_dump_json(), "digits", 0, 4, str(tmp_path / "n"))
    assert all((other_node.load_state(fed.algorithm.broadcast(fed.state, 1))["personal"][k] == v).all()
               for k, v in fresh["personal"].items())
    resumed = load_node(first.updated(rounds=5).model_dump_json(), "digits", 0, 4, str(tmp_path / "n"))
    assert resumed.run_dir == node.run_dir


def test_a_planted_partition_cache_does_not_choose_the_client_id(tmp_path):
    """A cache file of another partition, renamed to this partition's name, is not believed:
    the node rebuilds its own partition and registers as its own client."""
    cfg = small_config(**CFG)
    folder = tmp_path / "n"
    honest = load_node(cfg.model_dump_json(), "digits", 2, 4, str(folder))
    own_cache = next(folder.glob("partition-2-*.safetensors"))
    load_node.cache_clear()
    load_node(cfg.model_dump_json(), "digits", 3, 4, str(tmp_path / "other"))
    planted = next((tmp_path / "other").glob("partition-3-*.safetensors"))
    os.replace(planted, own_cache)  # partition 3's data under partition 2's name
    load_node.cache_clear()
    node = load_node(cfg.model_dump_json(), "digits", 2, 4, str(folder))
    assert node.client_id == honest.client_id
    assert (node.data.train_y == honest.data.train_y).all()


def test_identity_keys_are_never_written_through_a_planted_link(tmp_path):
    from metafed.deploy.identity import make_identities

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "keys"
    out.mkdir()
    (out / "client-0.key").symlink_to(victim)
    with pytest.raises(OSError):
        make_identities(out, 2)
    assert victim.read_text() == "precious"
