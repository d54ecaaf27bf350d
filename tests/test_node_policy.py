"""The node owns its privacy policy: a malicious server, speaking to metafed's real ClientApp
handlers, cannot get less protection than the node's own config says (issue 22). Each test
plays one attack the server could try with the messages it controls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from metafed.deploy import client_app  # noqa: E402
from metafed.deploy.policy import NodePolicyError, policy_from_node_config, run_sha256  # noqa: E402
from metafed.deploy.wire import from_records, to_records  # noqa: E402
from metafed.privacy.upload import UploadTransform  # noqa: E402
from metafed.run import build_federation  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.test_deploy_pool import FakeGrid  # noqa: E402



def _context(tmp_path, **policy) -> Context:
    node_config = {"dataset": "digits", "partition-id": 0, "num-partitions": 4, "state-dir": str(tmp_path / "node"),
                   **{k.replace("_", "-"): v for k, v in policy.items()}}
    return Context(run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config={})


def _train(cfg, ctx, hold=False, upload: UploadTransform | None = None):
    broadcast = build_federation(cfg).algorithm.broadcast(build_federation(cfg).state, 1)
    content = {"config": ConfigRecord({"config": cfg.model_dump_json(), "round": 1, "hold": hold}),
               "broadcast": to_records(broadcast)}
    if upload is not None:
        content["upload"] = ConfigRecord(upload.to_config())
    return client_app.train(Message(RecordDict(content), 100, "train"), ctx)


def _norm(reply) -> float:
    upload = from_records(reply.content["upload"])
    return float(torch.sqrt(sum(v.double().pow(2).sum() for v in upload["update"].values())))


pytestmark = pytest.mark.usefixtures("server_task")

CFG = dict(num_clients=4, clients_per_round=4, rounds=1, backend="loop", local_steps=3, lr=0.5)


def test_a_server_that_leaves_out_the_local_dp_stage_gets_a_refusal_not_the_raw_update(tmp_path):
    ctx = _context(tmp_path, dp_clip="0.1", dp_noise_multiplier="1.0")
    cfg = small_config(**CFG)
    omitted = _train(cfg, ctx)  # no upload record: the raw update would leave the node
    assert omitted.has_error() and "never sends an unclipped" in omitted.error.reason and not omitted.has_content()
    weaker = _train(cfg, ctx, upload=UploadTransform(clip=10.0, noise_std=10.0 * 0.1))
    assert weaker.has_error() and "weaker than this node's" in weaker.error.reason
    honest = _train(cfg, ctx, upload=UploadTransform(clip=0.1, noise_std=0.1))
    assert not honest.has_error()
    # what left the node is clipped to 0.1 and carries N(0, 0.1^2) noise per coordinate: far from the raw update
    d = sum(v.numel() for v in from_records(honest.content["upload"])["update"].values())
    assert _norm(honest) == pytest.approx(0.1 * np.sqrt(d), rel=0.1)


def test_a_server_that_asks_for_the_insecure_reproducible_mode_is_refused(tmp_path):
    """With insecure_reproducible_privacy in the config it sends, the server could rebuild
    and subtract the node's DP noise from the seed (a residual of 1e-6 before this policy)."""
    cfg = small_config(**CFG, dp="local", dp_clip=1.0, dp_noise_multiplier=1.0, insecure_reproducible_privacy=True)
    reply = _train(cfg, _context(tmp_path), upload=UploadTransform(clip=1.0, noise_std=1.0))
    assert reply.has_error() and "did not opt in" in reply.error.reason and not reply.has_content()
    opted_in = _train(cfg, _context(tmp_path, allow_insecure_reproducible_privacy="true"),
                      upload=UploadTransform(clip=1.0, noise_std=1.0))
    assert not opted_in.has_error()


@pytest.mark.parametrize("policy", [{"require_secure_aggregation": "true"}, {"secagg_key": "/nonexistent/key.pem"}])
def test_a_node_that_requires_secure_aggregation_never_replies_an_upload_in_the_clear(tmp_path, policy):
    cfg = small_config(**CFG)
    reply = _train(cfg, _context(tmp_path, **policy), hold=False)  # the server says: do not hold, send it
    assert reply.has_error() and "never replies an upload in the clear" in reply.error.reason
    assert not reply.has_content()


def test_label_counts_stay_on_the_node_unless_it_shares_them(tmp_path):
    cfg = small_config(**CFG, aggregator="attention", attention_score="labels")
    query = Message(RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": 0})}), 100, "query")
    refused = client_app.query(query, _context(tmp_path))
    assert refused.has_error() and "does not share them" in refused.error.reason and not refused.has_content()
    shared = client_app.query(query, _context(tmp_path, share_label_counts="true"))
    assert len(shared.content["info"]["label_counts"]) == 10


def test_a_pinned_node_refuses_any_other_run(tmp_path):
    cfg = small_config(**CFG)
    ctx = _context(tmp_path, run_sha256=run_sha256(cfg))
    assert not _train(cfg, ctx).has_error()
    assert not _train(cfg.updated(backend="vectorized", out=str(tmp_path / "o")), ctx).has_error()  # execution only
    other = _train(cfg.updated(lr=5.0), ctx)  # the server changed what clients do
    assert other.has_error() and "pinned to" in other.error.reason and not other.has_content()


def test_evaluation_work_is_bounded_by_the_node(tmp_path):
    cfg = small_config(**CFG, personalize_steps=500)
    fed = build_federation(small_config(**CFG))
    content = RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": 1}),
                          "params": to_records(fed.algorithm.global_params(fed.state)),
                          "broadcast": to_records(fed.algorithm.broadcast(fed.state, 1))})
    reply = client_app.evaluate(Message(content, 100, "evaluate"), _context(tmp_path))
    assert reply.has_error() and "at most 100" in reply.error.reason
    assert not client_app.evaluate(Message(content, 100, "evaluate"),
                                   _context(tmp_path, max_personalize_steps="500")).has_error()


def test_the_node_reads_its_data_from_its_own_location(tmp_path, monkeypatch):
    """The server's data_dir is not the node's: a run naming /etc loads the node's data from
    the node's own data-dir (or $METAFED_DATA)."""
    seen = []
    original = client_app._builtin.load
    monkeypatch.setattr(client_app._builtin, "load", lambda cj, ctx: seen.append(cj) or original(cj, ctx))
    cfg = small_config(**CFG, data_dir="/etc")
    assert not _train(cfg, _context(tmp_path)).has_error()
    assert '"data_dir": null' in seen[-1] and "/etc" not in seen[-1]


def test_a_malformed_policy_is_named():
    with pytest.raises(NodePolicyError, match="dp-clip and dp-noise-multiplier go together"):
        policy_from_node_config({"dp-clip": "1.0"})
    with pytest.raises(NodePolicyError, match="share-label-counts='maybe'"):
        policy_from_node_config({"share-label-counts": "maybe"})
    with pytest.raises(NodePolicyError, match="64 hex digits"):
        policy_from_node_config({"run-sha256": "abc"})
    assert policy_from_node_config({}).local_dp is None


def test_config_hash_prints_what_a_node_pins(tmp_path):
    from typer.testing import CliRunner

    from metafed.cli import app
    from metafed.config import build_config

    (tmp_path / "run.yaml").write_text("rounds: 3\nlr: 0.05\n")
    runner = CliRunner()
    printed = runner.invoke(app, ["config", "hash", "-c", str(tmp_path / "run.yaml")])
    assert printed.exit_code == 0 and printed.output.strip() == run_sha256(build_config(tmp_path / "run.yaml"))
    moved = runner.invoke(app, ["config", "hash", "-c", str(tmp_path / "run.yaml"), "--backend", "loop"])
    assert moved.output == printed.output  # where the server runs is not what the node agreed to
    changed = runner.invoke(app, ["config", "hash", "-c", str(tmp_path / "run.yaml"), "--lr", "0.1"])
    assert changed.output != printed.output


class _Grid(FakeGrid):
    """A grid whose node ``squatter`` (999) answers registration first, claiming client 0."""

    def __init__(self, nodes, squatter_reply):
        super().__init__(nodes.n, lambda m: squatter_reply(m) if m.metadata.dst_node_id == 999 else nodes.answer(m))

    def get_node_ids(self):
        return [999] + super().get_node_ids()


def _squatter(info_extra):
    def reply(m):
        info = ConfigRecord({"client": 0, "role": "train", "num_train": 50, "input_shape": [64], "num_classes": 10,
                             "input_dtype": "float32", **info_extra(m)})
        return Message(RecordDict({"info": info}), reply_to=m)
    return reply


@pytest.mark.parametrize("proof", ["none", "forged", "replayed"])
def test_a_node_cannot_take_another_clients_id(tmp_path, proof, caplog):
    """With the operators' roster, a registration claim must be signed by the client's own
    identity over the server's fresh challenge: a squatter answering first with no signature,
    a forged one or one replayed from an earlier registration is refused and logged, and the
    real client registers and trains."""
    from metafed.deploy.identity import load_identity, registration_message
    from metafed.deploy.pool import FlowerPool
    from metafed.run import run
    from tests.test_deploy_secagg import Nodes

    nodes = Nodes(4, tmp_path)  # the operators' identities: a roster and one key per node
    for ctx in nodes.contexts.values():  # a run without secure aggregation: the keys only bind ids
        ctx.node_config["identity-key"] = ctx.node_config.pop("secagg-key")
    stolen_key = load_identity(tmp_path / "ids" / "client-1.key")  # another client's key
    extra = {"none": lambda m: {},
             "forged": lambda m: {"proof": stolen_key.sign(registration_message(
                 bytes.fromhex(str(m.content["config"]["challenge"])), 0)).hex()},
             "replayed": lambda m: {"proof": load_identity(tmp_path / "ids" / "client-0.key").sign(
                 registration_message(b"\0" * 16, 0)).hex()}}[proof]
    cfg = small_config(num_clients=4, clients_per_round=4, rounds=1, backend="loop", local_steps=2)
    pool = FlowerPool(_Grid(nodes, _squatter(extra)), cfg, 5, 1, 1, nodes.roster)
    assert pool.node_of[0] == 100 and 999 not in pool.node_of.values()
    assert "not signed by its identity" in caplog.text or "carries no signature" in caplog.text
    assert run(cfg, pool=pool).rows[-1]["clients_used"] == 4


def test_a_node_with_dissenting_data_is_left_out_not_fatal(tmp_path, caplog):
    from metafed.deploy.pool import FlowerPool
    from tests.test_deploy_secagg import Nodes

    nodes = Nodes(4, tmp_path, secagg=False)
    odd = _squatter(lambda m: {"client": 3, "input_shape": [99]})
    cfg = small_config(num_clients=4, clients_per_round=3, rounds=1, backend="loop", local_steps=2)
    grid = _Grid(nodes, lambda m: odd(m))
    grid.get_node_ids = lambda: [100, 101, 102, 999]  # the odd node holds client 3 with 99 features
    pool = FlowerPool(grid, cfg, 4, 1, 1)
    assert pool.input_shape == (64,) and 3 not in pool.node_of
    assert "differs from the federation's" in caplog.text


def test_what_a_reply_reveals_beside_the_upload(tmp_path):
    """Under local DP the exact training loss, sample count and program metrics are outside
    the noise: the node does not send them; under secure aggregation the protocol needs none
    of them. Registration never sends the train-set size."""
    local = _train(small_config(**CFG, dp="local", dp_clip=1.0, dp_noise_multiplier=1.0), _context(tmp_path),
                   upload=UploadTransform(clip=1.0, noise_std=1.0))
    assert set(local.content["meta"].keys()) == {"round", "client"}
    held = _train(small_config(**CFG), _context(tmp_path / "b"), hold=True)
    assert set(held.content["meta"].keys()) == {"round", "client"} and "upload" not in held.content
    plain = _train(small_config(**CFG), _context(tmp_path / "c"))
    assert {"loss", "num_samples"} <= set(plain.content["meta"].keys())
    cfg = small_config(**CFG)
    query = Message(RecordDict({"config": ConfigRecord({"config": cfg.model_dump_json(), "round": 0})}), 100, "query")
    assert "num_train" not in client_app.query(query, _context(tmp_path / "d")).content["info"]
