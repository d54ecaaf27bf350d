"""Secure aggregation and DP on the wire, through metafed's real ClientApp handlers (node data,
held uploads, the protocol state kept in each node's ``context.state`` between messages)
and the Flower pool, without the processes. Each node keeps one persistent Context, as a
SuperNode does."""
import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from metafed.deploy import client_app  # noqa: E402
from metafed.deploy.identity import IdentityError, load_roster, make_identities  # noqa: E402
from metafed.deploy.pool import FlowerPool  # noqa: E402
from metafed.privacy.secagg import codec  # noqa: E402
from metafed.privacy.secagg.messages import ShareKeys, SurvivorList  # noqa: E402
from metafed.run import run  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.test_deploy_pool import FakeGrid  # noqa: E402

STAGES = ("train", "advertise", "share", "upload", "sign", "unmask")


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    """n SuperNodes running metafed's ClientApp handlers, each with its own persistent
    Context (node config with its partition and secure-aggregation identity)."""

    HANDLERS = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate,
                "query.secagg": client_app.secagg}

    def __init__(self, n: int, folder, secagg: bool = True, policy: dict | None = None):
        self.n, self.dead_from, self.seen = n, {}, []
        roster, keys = make_identities(folder / "ids", n) if secagg else (None, [])
        self.roster = load_roster(roster) if secagg else None
        self.contexts = {}
        for c in range(n):
            node_config = {"dataset": "digits", "partition-id": c, "num-partitions": n,
                           "state-dir": str(folder / f"node-{c}")}
            if secagg:
                node_config.update({"secagg-key": str(keys[c]), "secagg-roster": str(roster)})
            node_config.update(policy or {})  # the node operator's own policy keys
            self.contexts[100 + c] = Context(run_id=1, node_id=100 + c, node_config=node_config,
                                             state=RecordDict(), run_config={})

    def stage_of(self, m) -> str:
        kind = m.metadata.message_type
        return str(m.content["secagg"]["stage"]) if kind == "query.secagg" else kind

    def answer(self, m):
        node, stage = m.metadata.dst_node_id, self.stage_of(m)
        self.seen.append((node, stage))
        dead = self.dead_from.get(node)
        if dead is not None and stage in STAGES and STAGES.index(stage) >= STAGES.index(dead):
            return None  # the node died before this stage
        return self.HANDLERS[m.metadata.message_type](m, self.contexts[node])

    def pool(self, cfg):
        return FlowerPool(FakeGrid(self.n, self.answer), cfg, self.n, 1, 1, self.roster)


def _close(a: dict, b: dict, atol=1e-5):
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, atol=atol, rtol=0)


def test_secure_aggregation_on_the_wire_equals_the_simulation(tmp_path):
    """fedavg and ditto (personal state on the nodes' disks) with SecAgg, and fedavg with
    SecAgg+ (k = 2): equal to the simulation's secure aggregation; the server saw only masks."""
    for extra in ({"algorithm": "fedavg"}, {"algorithm": "ditto"}, {"algorithm": "fedavg", "secagg_neighbours": 2}):
        cfg = small_config(num_clients=5, clients_per_round=5, rounds=2, backend="loop", local_steps=2,
                           secure_aggregation=True, secagg_range=1000.0, **extra)
        nodes = Nodes(5, tmp_path / extra["algorithm"] / str(extra.get("secagg_neighbours")))
        deployed = run(cfg, pool=nodes.pool(cfg))
        sim = run(cfg)
        _close(deployed.params, sim.params)
        assert deployed.rows[-1]["clients_used"] == 5
        stages = [s for _, s in nodes.seen]
        assert all(stages.count(s) == 10 for s in STAGES), stages  # 5 clients x 2 rounds, every stage


@pytest.mark.parametrize("stage", STAGES)
def test_a_node_dying_at_any_stage_is_recovered(stage, tmp_path):
    """A node that stops answering before ``stage`` (of round 1): the round still commits
    (4 of 5 left, threshold 3) and the model equals a plain run over the right clients:
    without the node if it died before its masked input arrived, with it after (its
    self-mask is rebuilt from the others' shares)."""
    cfg = small_config(num_clients=5, clients_per_round=5, rounds=1, backend="loop", local_steps=2,
                       secure_aggregation=True, secagg_range=1000.0, secagg_threshold=3)
    nodes = Nodes(5, tmp_path)
    nodes.dead_from[102] = stage
    deployed = run(cfg, pool=nodes.pool(cfg))
    included = STAGES.index(stage) >= STAGES.index("sign")
    plain_cfg = small_config(num_clients=5, clients_per_round=5, rounds=1, backend="loop", local_steps=2)
    plain_nodes = Nodes(5, tmp_path / "plain", secagg=False)
    if not included:
        plain_nodes.dead_from[102] = "train"
    plain = run(plain_cfg, pool=plain_nodes.pool(plain_cfg))
    assert deployed.rows[-1].get("round_skipped") is None
    assert deployed.rows[-1]["clients_used"] == (5 if included else 4)
    _close(deployed.params, plain.params)


def test_too_many_deaths_skip_the_round_and_the_run_goes_on(tmp_path):
    cfg = small_config(num_clients=5, clients_per_round=5, rounds=2, backend="loop", local_steps=2,
                       secure_aggregation=True, secagg_range=1000.0, secagg_threshold=4)
    nodes = Nodes(5, tmp_path)
    nodes.dead_from.update({101: "upload", 103: "upload"})
    result = run(cfg, pool=nodes.pool(cfg))
    assert all(row.get("round_skipped") == 1 for row in result.rows)


def test_local_and_central_dp_on_the_wire_equal_the_simulation(tmp_path):
    """Local DP noise drawn on the clients (with their own streams), and central DP with
    adaptive clipping whose clipping and count bit run on the clients inside the secure sum.
    Reproducible privacy randomness so both sides draw the same noise."""
    cases = [dict(dp="local", dp_noise_multiplier=0.5, dp_clip=1.0),
             dict(dp="local", dp_noise_multiplier=0.5, dp_clip=1.0, secure_aggregation=True, secagg_range=1000.0),
             dict(dp="central", dp_noise_multiplier=0.8, dp_clip=0.5, dp_adaptive_clip=True, dp_count_noise=1.0,
                  secure_aggregation=True, secagg_range=1000.0)]
    for i, extra in enumerate(cases):
        cfg = small_config(num_clients=5, clients_per_round=5, rounds=2, backend="loop", local_steps=2,
                           insecure_reproducible_privacy=True, **extra)
        nodes = Nodes(5, tmp_path / str(i), secagg=bool(extra.get("secure_aggregation")),
                      policy={"allow-insecure-reproducible-privacy": "true"})  # the nodes opt in, for the test
        deployed = run(cfg, pool=nodes.pool(cfg))
        sim = run(cfg)
        _close(deployed.params, sim.params)
        assert deployed.rows[-1]["epsilon"] == pytest.approx(sim.rows[-1]["epsilon"])
        if extra["dp"] == "central":
            assert deployed.rows[-1]["dp_clip"] == pytest.approx(sim.rows[-1]["dp_clip"], rel=1e-6)


# ---------------------------------------------------------------------------- a malicious server
def _node_after_train(tmp_path, rnd=1):
    """Five nodes that trained round ``rnd`` and hold their uploads; returns (nodes, config json)."""
    from flwr.app import Message

    from metafed.deploy.wire import to_records

    cfg = small_config(num_clients=5, clients_per_round=5, rounds=1, backend="loop", local_steps=2,
                       secure_aggregation=True, secagg_range=1000.0)
    nodes = Nodes(5, tmp_path)
    pool = nodes.pool(cfg)  # registers the nodes
    from metafed.run import build_federation

    fed = build_federation(cfg)
    broadcast = fed.algorithm.broadcast(fed.state, rnd)
    for c in range(5):
        content = RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": rnd, "hold": True}),
                              "broadcast": to_records(broadcast)})
        nodes.answer(Message(content, 100 + c, "train"))
    return nodes, cfg.model_dump_json(), pool


def _stage(nodes, node, stage, rnd, run_id, config_json, payload):
    from flwr.app import Message

    from metafed.deploy.secagg_wire import stage_request

    reply = nodes.answer(Message(RecordDict(stage_request(stage, rnd, run_id, config_json, payload)), node,
                                 "query.secagg"))
    return reply


def _setup(cohort, transform=None, weighting="samples"):
    from metafed.deploy.secagg_wire import round_setup
    from metafed.privacy.upload import UploadTransform

    return round_setup(cohort, len(cohort) // 2 + 1, None, 1000.0, 40, (transform or UploadTransform()).to_config(),
                       weighting)


def test_a_client_refuses_replays_strangers_and_skipped_stages(tmp_path):
    nodes, config_json, _ = _node_after_train(tmp_path)
    run_id = b"r" * 16
    setup = _setup([0, 1, 2, 3, 4])
    first = _stage(nodes, 100, "advertise", 1, run_id, config_json, setup)
    assert not first.has_error()
    # the same session again (a replayed round): refused, nothing signed
    again = _stage(nodes, 100, "advertise", 1, run_id, config_json, setup)
    assert again.has_error() and "replayed" in again.error.reason
    # a cohort member with no identity on the roster (the server's sybil): refused
    stranger = _stage(nodes, 101, "advertise", 1, run_id, config_json, _setup([0, 1, 2, 3, 4, 99]))
    assert stranger.has_error() and "roster" in stranger.error.reason
    # skipping ahead to unmasking: the state machine aborts and wipes its secrets
    lists = SurvivorList(b"s" * 32, b"k" * 32, (0, 1, 2), ())
    skipped = _stage(nodes, 100, "sign", 1, run_id, config_json, lists)
    assert skipped.has_error()
    after = _stage(nodes, 100, "share", 1, run_id, config_json, [])
    assert after.has_error() and "no secure-aggregation round in progress" in after.error.reason
    # garbage where a protocol message belongs: refused, never a crash
    state = nodes.contexts[102].state
    assert not _stage(nodes, 102, "advertise", 1, run_id, config_json, setup).has_error()
    from flwr.app import Message

    from metafed.deploy.secagg_wire import stage_request

    content = stage_request("share", 1, run_id, config_json, [])
    content["secagg"] = ConfigRecord({"stage": "share", "run": run_id, "body": '[{"_t": "AdvertiseKeys", "client": "x"}]'})
    bad = nodes.answer(Message(RecordDict(content), 102, "query.secagg"))
    assert bad.has_error() and "malformed" in bad.error.reason
    assert "snapshot" not in state["metafed.secagg"]


def test_a_server_that_shows_clients_different_setups_gets_nothing(tmp_path):
    """The isolation attack: clients 1-4 are told to clip to a tiny norm (their share of the
    sum vanishes) and client 0 a normal one, so the "sum" would be client 0's update. The
    setup is hashed into the session, so client 0's advert does not verify for the others
    and vice versa: nobody gets to the masked-input stage with a key set that includes 0."""
    from metafed.privacy.secagg.messages import AdvertiseKeys
    from metafed.privacy.upload import UploadTransform

    nodes, config_json, _ = _node_after_train(tmp_path)
    run_id = b"q" * 16
    cohort = [0, 1, 2, 3, 4]
    adverts = {}
    for c in cohort:
        transform = UploadTransform(clip=10.0) if c == 0 else UploadTransform(clip=1e-9)
        reply = _stage(nodes, 100 + c, "advertise", 1, run_id, config_json, _setup(cohort, transform, None))
        adverts[c] = codec.decode(reply.content["secagg"]["body"], AdvertiseKeys)
    # the server relays everything; client 0's own advert is in a different session for the others
    shares_from_0 = _stage(nodes, 100, "share", 1, run_id, config_json, list(adverts.values()))
    assert shares_from_0.has_error() and "threshold" in shares_from_0.error.reason
    shares_from_1 = _stage(nodes, 101, "share", 1, run_id, config_json, list(adverts.values()))
    shares = codec.decode(shares_from_1.content["secagg"]["body"], ShareKeys)
    assert {s.recipient for s in shares.shares} == {2, 3, 4}  # client 0 is not in its key set


def test_roster_files_are_checked(tmp_path):
    roster, keys = make_identities(tmp_path, 3)
    assert set(load_roster(roster)) == {0, 1, 2}
    assert oct(keys[0].stat().st_mode & 0o777) == "0o600"
    roster.write_text('{"format": "metafed-secagg-roster-1", "clients": {"0": "bad"}}')
    with pytest.raises(IdentityError, match="roster"):
        load_roster(roster)
    cfg = small_config(num_clients=3, clients_per_round=3, secure_aggregation=True, secagg_range=1000.0)
    with pytest.raises(ValueError, match="roster"):
        FlowerPool(FakeGrid(3, lambda m: None), cfg, 3, 1, 1, {0: b"x" * 32})
    np.testing.assert_equal(len(keys), 3)


def test_min_clients_rule_skips_a_round_with_too_few_replies(tmp_path):
    """A node that never answers: with --min-clients 5 the round is skipped (model unchanged,
    logged), with 4 it commits over the others."""
    from metafed.run import build_federation

    for need, skipped in ((5, True), (4, False)):
        cfg = small_config(num_clients=5, clients_per_round=5, rounds=1, backend="loop", local_steps=2,
                           min_clients=need)
        nodes = Nodes(5, tmp_path / str(need), secagg=False)
        nodes.dead_from[103] = "train"
        result = run(cfg, pool=nodes.pool(cfg))
        assert (result.rows[-1].get("round_skipped") == 1) is skipped
        initial = build_federation(cfg).algorithm.global_params(build_federation(cfg).state)
        changed = any(not torch.equal(initial[k], v) for k, v in result.params.items())
        assert changed is not skipped
    with pytest.raises(ValueError, match="min-clients"):
        small_config(clients_per_round=3, min_clients=4)


def test_held_out_supernodes_report_new_client_accuracy_as_the_simulation(tmp_path):
    """--heldout-fraction in deployment: the partitions the simulation holds out are SuperNodes
    that never train (a train request is refused) and score new-client accuracy at k = 0, 1,
    5, 10 on their own data; every metric equals the simulation's."""
    cfg = small_config(algorithm="per-fedavg-fo", num_clients=5, clients_per_round=3, rounds=2, backend="loop",
                       local_steps=2, heldout_fraction=0.4)
    from flwr.app import Message

    from metafed.deploy.wire import to_records

    nodes = Nodes(5, tmp_path, secagg=False)
    pool = nodes.pool(cfg)
    deployed = run(cfg, pool=pool)
    sim = run(cfg)
    _close(deployed.params, sim.params)
    heldout = set(pool.heldout_node_of.values())
    assert len(heldout) == 2 and pool.num_clients == 3
    assert not heldout & {node for node, stage in nodes.seen if stage == "train"}
    content = RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": 3}),
                          "broadcast": to_records(deployed.params)})
    refused = nodes.answer(Message(content, min(heldout), "train"))
    assert refused.has_error() and "never trains" in refused.error.reason
    keys = [k for k in sim.rows[-1] if k.startswith("new_client_accuracy")]
    assert len(keys) == 8
    for key in keys + ["global_accuracy", "personalized_accuracy", "personalized_accuracy_p10"]:
        assert deployed.rows[-1][key] == pytest.approx(sim.rows[-1][key], abs=1e-6), key
