"""The Flower pool's reply validation, played with a rogue ClientApp: a fake Grid that
answers every message with a random or mutated reply. The round loop must never crash, and
must use exactly the valid replies."""
import types

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from metafed import tree  # noqa: E402
from metafed.client.reply import upload_of
from metafed.deploy.pool import FlowerPool  # noqa: E402
from metafed.deploy.wire import BadReply, from_records, layout, to_records  # noqa: E402
from metafed.run import build_federation  # noqa: E402
from tests.conftest import small_config  # noqa: E402


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Messages are created as by a ServerApp task (the run context Flower sets up)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Reply:
    def __init__(self, src, content=None, error=None):
        self.metadata = types.SimpleNamespace(src_node_id=src)
        self.content, self.error = content, error

    def has_error(self):
        return self.error is not None

    def has_content(self):
        return self.content is not None


class FakeGrid:
    """Nodes 100+cid hold client cid; ``answer(message)`` makes each reply (None: no reply;
    a list: the node replies more than once). A reply waits to be pulled by message id,
    ``delay(message)`` pulls after it is pushed (0 by default)."""

    def __init__(self, n, answer, delay=lambda m: 0):
        self.n, self.answer, self.delay = n, answer, delay
        self.waiting: dict[str, list] = {}  # message id -> [pulls still to wait, replies]
        self.pushed = 0

    def get_node_ids(self):
        return [100 + c for c in range(self.n)]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.pushed += 1
            mid = f"m{self.pushed}"
            reply = self.answer(m)
            if reply is not None:
                self.waiting[mid] = [self.delay(m), [Pulled(r, mid) for r in (reply if isinstance(reply, list)
                                                                              else [reply])]]
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            if mid in self.waiting:
                if self.waiting[mid][0] > 0:
                    self.waiting[mid][0] -= 1
                else:
                    out += self.waiting.pop(mid)[1]
        return out


class Pulled:
    """A reply as Grid.pull_messages returns it: it names the message it answers."""

    def __init__(self, reply, mid):
        self.reply = reply
        self.metadata = types.SimpleNamespace(src_node_id=reply.metadata.src_node_id, reply_to_message_id=mid)

    def has_error(self):
        return self.reply.has_error()

    def __getattr__(self, name):  # content, error
        return getattr(self.reply, name)


def _honest(sim, m):
    """What the real ClientApp computes, from the simulation pool's own task."""
    node = m.metadata.dst_node_id
    cid = node - 100
    if m.metadata.message_type == "query":
        return Reply(node, RecordDict({"info": ConfigRecord({"client": cid, "num_train": 1, "input_shape": [64],
                                                             "num_classes": 10})}))
    rnd = int(m.content["config"]["round"])
    broadcast = from_records(m.content["broadcast"])
    program = sim.algorithm.client_program(rnd)
    replies = sim.pool.train(rnd, np.array([cid]), program, broadcast)
    row = tree.nested_index(replies.outputs, 0)
    sent = upload_of(row)
    meta = MetricRecord({"round": rnd, "client": cid, "loss": float(replies.losses[0]),
                         "num_samples": float(replies.num_samples[0])})
    return Reply(node, RecordDict({"upload": to_records(sent), "meta": meta}))


MUTATIONS = [
    "error", "no-upload", "no-meta", "wrong-round", "wrong-client", "nan", "inf", "wrong-shape", "wrong-dtype",
    "missing-key", "extra-key", "loss-nan", "loss-string", "negative-samples", "zero-samples", "config-not-array",
    "huge-shape", "object-bytes", "int-array", "duplicate",
]


def _mutate(reply: Reply, kind: str, rng) -> Reply | list:
    if kind == "error":
        return Reply(reply.metadata.src_node_id, error=types.SimpleNamespace(reason="boom"))
    content = reply.content
    upload, meta = content["upload"], dict(content["meta"])
    arrays = dict(upload.items())
    key = sorted(arrays)[0]
    value = arrays[key].numpy()
    if kind == "no-upload":
        return Reply(reply.metadata.src_node_id, RecordDict({"meta": MetricRecord(meta)}))
    if kind == "no-meta":
        return Reply(reply.metadata.src_node_id, RecordDict({"upload": upload}))
    if kind == "wrong-round":
        meta["round"] = meta["round"] + 1
    elif kind == "wrong-client":
        meta["client"] = (meta["client"] + 1) % 5
    elif kind in ("nan", "inf"):
        bad = value.copy()
        bad.flat[rng.integers(bad.size)] = np.nan if kind == "nan" else np.inf
        arrays[key] = Array(bad)
    elif kind == "wrong-shape":
        arrays[key] = Array(value.reshape(-1)[:-1].copy())
    elif kind == "wrong-dtype":
        arrays[key] = Array(value.astype(np.float64))
    elif kind == "int-array":
        arrays[key] = Array(value.astype(np.int32))
    elif kind == "missing-key":
        del arrays[key]
    elif kind == "extra-key":
        arrays["update/evil"] = Array(np.zeros(3, dtype=np.float32))
    elif kind == "loss-nan":
        meta["loss"] = float("nan")
    elif kind == "loss-string":
        return Reply(reply.metadata.src_node_id, RecordDict({"upload": upload, "meta": ConfigRecord({**meta, "loss": "x"})}))
    elif kind == "negative-samples":
        meta["num_samples"] = -5.0
    elif kind == "zero-samples":
        meta["num_samples"] = 0.0
    elif kind == "config-not-array":
        return Reply(reply.metadata.src_node_id, RecordDict({"upload": ConfigRecord({"a": 1}), "meta": MetricRecord(meta)}))
    elif kind == "huge-shape":
        arrays[key] = Array(np.zeros((200, 200), dtype=np.float32))
    elif kind == "object-bytes":
        arrays[key] = Array(dtype="float32", shape=value.shape, stype="numpy.ndarray", data=bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    elif kind == "duplicate":
        return [reply, reply]
    return Reply(reply.metadata.src_node_id, RecordDict({"upload": ArrayRecord(arrays), "meta": MetricRecord(meta)}))


def test_rogue_client_app_fuzz_never_crashes_and_keeps_only_valid_replies(caplog):
    cfg = small_config(num_clients=5, clients_per_round=5, rounds=1, local_steps=2, backend="loop")
    sim = build_federation(cfg)
    rng = np.random.default_rng(0)
    plan = {}

    def answer(m):
        honest = _honest(sim, m)
        if m.metadata.message_type == "query":
            return honest
        kind = plan.get(honest.metadata.src_node_id - 100)
        return honest if kind is None else _mutate(honest, kind, rng)

    grid = FakeGrid(5, answer)
    pool = FlowerPool(grid, cfg, 5, connect_timeout=1, round_timeout=1)
    fed = build_federation(cfg, pool)
    bad_replies = 0
    for trial in range(90):  # 90 rounds x 1-4 rogue nodes: over 200 bad replies
        rogue = rng.choice(5, size=rng.integers(1, 5), replace=False)
        plan.clear()
        plan.update({int(c): MUTATIONS[rng.integers(len(MUTATIONS))] for c in rogue})
        bad_replies += sum(k != "duplicate" for k in plan.values())
        program = fed.algorithm.client_program(1)
        broadcast = fed.algorithm.broadcast(fed.state, 1)
        replies = pool.train(1, np.arange(5), program, broadcast)
        honest_ids = [c for c in range(5) if c not in plan or plan[c] == "duplicate"]
        assert replies.ids == honest_ids, plan
        if replies.ids:
            assert all(torch.isfinite(v).all() for v in tree.nested_leaves(replies.outputs))
    assert bad_replies >= 200
    row = fed.run_round(1)  # the real round loop over the rogue pool still runs
    assert row["round"] == 1


def test_flower_pool_matches_the_simulation_round():
    """With honest nodes the Flower pool's round equals the simulation's (same tasks, same order)."""
    cfg = small_config(num_clients=5, clients_per_round=3, rounds=2, backend="loop")
    sim = build_federation(cfg)
    sim_clients = build_federation(cfg)
    pool = FlowerPool(FakeGrid(5, lambda m: _honest(sim_clients, m)), cfg, 5, 1, 1)
    deployed = build_federation(cfg, pool)
    for rnd in (1, 2):
        sim.run_round(rnd)
        deployed.run_round(rnd)
    for k in sim.state.params:
        torch.testing.assert_close(deployed.state.params[k], sim.state.params[k], atol=1e-6, rtol=0)


def test_registration_asks_each_node_once_waits_for_it_and_refuses_to_start_short():
    """A SuperNode that answers late (a cold start, a reconnect after a SuperLink restart) is
    waited for, never sent a second query that would only queue behind the first; a run never
    starts with fewer nodes than it waits for (it would train another federation)."""
    cfg = small_config(num_clients=3, clients_per_round=3, rounds=1, backend="loop")
    sim = build_federation(cfg)
    asked: dict[int, int] = {}

    def counted(m):
        asked[m.metadata.dst_node_id] = asked.get(m.metadata.dst_node_id, 0) + 1
        return _honest(sim, m)

    slow = FakeGrid(3, counted, delay=lambda m: 40 if m.metadata.dst_node_id == 101 else 0)  # 40 pulls late
    pool = FlowerPool(slow, cfg, 3, connect_timeout=30, round_timeout=1)
    assert pool.node_of == {0: 100, 1: 101, 2: 102} and asked == {100: 1, 101: 1, 102: 1}
    with pytest.raises(RuntimeError, match="only 2 of the 3 SuperNodes"):
        FlowerPool(FakeGrid(3, lambda m: None if m.metadata.dst_node_id == 102 else _honest(sim, m)), cfg, 3,
                   connect_timeout=2, round_timeout=1)


def test_wire_round_trip_and_refusals():
    nested = {"update": {"w": torch.randn(3, 4), "b": torch.zeros(2)}}
    back = from_records(to_records(nested), layout(nested))
    assert torch.equal(back["update"]["w"], nested["update"]["w"])
    with pytest.raises(BadReply, match="missing"):
        from_records(to_records({"update": {"w": torch.zeros(3, 4)}}), layout(nested))
    with pytest.raises(BadReply, match="expected an ArrayRecord"):
        from_records(ConfigRecord({"a": 1}), layout(nested))


# every algorithm through the real ClientApp handlers: tests/test_conformance.py (driven by the registry)


def test_attention_by_label_distribution_through_the_client_app(tmp_path):
    """--attention-score labels: nodes send their label counts at registration (only when
    the run asks for them); the deployed round weighs clients as the simulation does."""
    _client_app_equals_the_simulation(small_config(num_clients=3, clients_per_round=3, rounds=2, backend="loop",
                                                   aggregator="attention", attention_score="labels"), tmp_path,
                                      policy={"share-label-counts": "true"})  # the nodes agree to share them


def _client_app_equals_the_simulation(cfg, tmp_path, nodes=3,
                                      keys=("global_accuracy", "personalized_accuracy", "global_train_loss", "train_loss"),
                                      sim_cfg=None, policy=None):
    from flwr.app import Context, RecordDict as FlwrRecordDict

    from metafed.deploy import client_app
    from metafed.run import run

    handlers = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}

    def answer(m):
        node = m.metadata.dst_node_id
        ctx = Context(run_id=1, node_id=node, node_config={"dataset": "digits", "partition-id": node - 100,
                                                           "num-partitions": nodes,
                                                           "state-dir": str(tmp_path / f"node-{node}"),
                                                           **(policy or {})},
                      state=FlwrRecordDict(), run_config={})
        return handlers[m.metadata.message_type](m, ctx)

    deployed = run(cfg, pool=FlowerPool(FakeGrid(nodes, answer), cfg, nodes, 1, 1))
    sim = run(sim_cfg or cfg)
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed.params[k], v, atol=1e-5, rtol=0)
    for key in keys:
        assert deployed.rows[-1][key] == pytest.approx(sim.rows[-1][key], abs=1e-5), key
    return deployed


def test_evaluation_on_a_client_sample_without_the_train_pass_equals_the_simulation(tmp_path):
    """--eval-clients 2 --no-eval-train-loss: the same seeded sample of clients is scored in
    simulation and over the ClientApps, with the same numbers; no training-loss pass."""
    cfg = small_config(num_clients=4, clients_per_round=2, rounds=2, backend="loop", eval_clients=2,
                       eval_train_loss=False)
    deployed = _client_app_equals_the_simulation(cfg, tmp_path, nodes=4,
                                                 keys=("global_accuracy", "personalized_accuracy"))
    assert deployed.rows[-1]["clients_evaluated"] == 2 and "global_train_loss" not in deployed.rows[-1]


@pytest.mark.parametrize("tamper, problem", [
    (lambda b: b[:-1], "expected"),  # a truncated message
    (lambda b: b + b"\x00", "expected"),  # padded
    (lambda b: b"\x00\x00\xc0\x7f" + b[4:], "NaN or Inf"),  # a NaN smuggled into the values
])
def test_a_forged_compressed_reply_is_rejected_by_the_server(tamper, problem):
    """The server decodes compressed uploads only after checking size and content: a rogue
    ClientApp's forged bytes become a BadReply (the round goes on without them)."""
    from metafed.compression import make_compression

    comp = make_compression("topk:0.1", False)
    expected = {"update/w": ((4, 5), torch.float32), "update/b": ((5,), torch.float32)}
    pool = types.SimpleNamespace(compression=comp, cfg=types.SimpleNamespace(seed=0))
    x = torch.randn(25, dtype=torch.float64)
    blob, _ = comp.encode_one(x, None, 0, 3, 1)
    record = ArrayRecord({"bytes": Array(np.frombuffer(blob, dtype=np.uint8).copy())})
    upload, size = FlowerPool._decode(pool, record, expected, 3)
    assert size == len(blob) and upload["update"]["w"].shape == (4, 5) and upload["update"]["b"].dtype == torch.float32
    forged = ArrayRecord({"bytes": Array(np.frombuffer(tamper(blob), dtype=np.uint8).copy())})
    with pytest.raises(BadReply, match=problem):
        FlowerPool._decode(pool, forged, expected, 3)
    with pytest.raises(BadReply, match="one array, 'bytes'"):
        FlowerPool._decode(pool, ArrayRecord({"other": Array(np.zeros(3, np.uint8))}), expected, 3)


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff"])
def test_asynchronous_deployment_follows_the_simulation(rule, tmp_path):
    """--mode async over the ClientApps (jobs pushed, replies pulled as they arrive): with one
    job at a time (FedAsync, M = 1), or a buffer as large as the cohort (FedBuff, K = M) whose
    replies all arrive together (as the fake grid answers at once; in the simulation, equal
    client speeds), the deployment follows the simulation's trajectory."""
    m = 1 if rule == "fedasync" else 3
    common = dict(mode="async", async_rule=rule, num_clients=3, clients_per_round=m, rounds=4, backend="loop",
                  local_steps=3, eval_every=2)
    deployed = _client_app_equals_the_simulation(small_config(**common), tmp_path, keys=("global_accuracy", "train_loss"),
                                                 sim_cfg=small_config(**common, client_speed="constant"))
    assert [r["updates"] for r in deployed.rows] == [1, 2, 3, 4]
    assert all(r["clients_used"] == (1 if rule == "fedasync" else 3) for r in deployed.rows)


@pytest.mark.parametrize("algorithm", ["fedmd", "feddf", "fd"])
def test_distillation_with_two_architectures_deploys_as_the_simulation(algorithm, tmp_path):
    """Federated distillation in deployment: each node trains its group's architecture (an
    MLP or a logistic model, drawn as the server draws them), the server holds the public
    inputs it needs (FedMD's scored subsets travel in the broadcast); with held-out nodes,
    FedDF's new-client accuracy too. Parameters and metrics equal the simulation's."""
    extra = {"fedmd": dict(public_size=60, public_subset=30), "feddf": dict(public_size=60, distill_steps=3),
             "fd": {}}[algorithm]
    cfg = small_config(algorithm=algorithm, num_clients=8, clients_per_round=4, rounds=2, backend="loop",
                       local_steps=3, client_models="mlp:0.5,logistic:0.5", heldout_fraction=0.25, **extra)
    keys = ["personalized_accuracy", "train_loss"] + (["global_accuracy", "new_client_accuracy_k1",
                                                       "new_client_accuracy_k5"] if algorithm == "feddf" else [])
    deployed = _client_app_equals_the_simulation(cfg, tmp_path, nodes=8, keys=tuple(keys))
    assert deployed.rows[-1]["clients_used"] == 4
