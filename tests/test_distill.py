"""Federated distillation (FedMD, FedDF, FD) with heterogeneous client models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metafed.config import ConfigError, build_config
from metafed.distill.fd import FD, DistilledSGD
from metafed.distill.groups import assign_groups, parse_client_models
from metafed.run import build_federation, run
from tests.conftest import small_config

HETERO = dict(client_models="mlp:0.5,small-cnn:0.5", num_clients=8, clients_per_round=6)
PUBLIC = dict(public_size=200)
ALGS = {"fd": {}, "fedmd": {**PUBLIC, "public_subset": 64}, "feddf": {**PUBLIC, "distill_steps": 5,
                                                                     "distill_batch_size": 32}}


def _cfg(algorithm, **kw):
    return small_config(algorithm=algorithm, **{**HETERO, **ALGS[algorithm], **kw})


def test_client_models_spec_is_parsed_and_refused_clearly():
    assert parse_client_models("mlp:0.25,small-cnn:0.75") == [("mlp", 0.25), ("small-cnn", 0.75)]
    assert parse_client_models("logistic") == [("logistic", 1.0)]
    for bad, says in (("resnet:1", "unknown model 'resnet'"), ("mlp:0.5,cnn:0.4", "sum to 0.9"),
                      ("mlp:x", "not a number"), ("mlp:0.5,mlp:0.5", "listed twice")):
        with pytest.raises(ValueError, match=says):
            parse_client_models(bad)


def test_groups_are_seeded_and_sized_by_share():
    g = assign_groups(10, [0.3, 0.7], seed=1)
    assert np.bincount(g).tolist() == [3, 7]
    assert np.array_equal(g, assign_groups(10, [0.3, 0.7], seed=1))
    assert not np.array_equal(g, assign_groups(10, [0.3, 0.7], seed=2))
    assert np.bincount(assign_groups(7, [1 / 3, 1 / 3, 1 / 3], 0)).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


@pytest.mark.parametrize("algorithm", sorted(ALGS))
def test_loop_and_vectorized_agree_with_heterogeneous_groups(algorithm):
    """Each group runs its own architecture on each backend: the server state and every
    client's own model agree to 1e-5."""
    # FedDF's server distillation takes Adam steps, which are about lr per coordinate whatever the
    # gradient's size: on near-zero gradients float summation order can flip a step's sign, so
    # its parity is checked with the server distillation off (the clients' work is the same code)
    extra = {"distill_steps": 0} if algorithm == "feddf" else {}
    runs = {b: run(_cfg(algorithm, backend=b, **extra)) for b in ("loop", "vectorized")}
    a, b = (runs[k].federation for k in ("loop", "vectorized"))
    for key in a.state.params:
        torch.testing.assert_close(a.state.params[key], b.state.params[key], atol=1e-5, rtol=1e-4)
    for key in a.state.extra:
        torch.testing.assert_close(a.state.extra[key], b.state.extra[key], atol=1e-5, rtol=1e-4)
    assert sorted(a.clients.ids()) == sorted(b.clients.ids())
    for cid in a.clients.ids():
        sa, sb = a.clients.get(cid, dict), b.clients.get(cid, dict)
        for key in sa.get("params", {}):
            torch.testing.assert_close(sa["params"][key], sb["params"][key], atol=1e-5, rtol=1e-4)
    ra, rb = runs["loop"].rows[-1], runs["vectorized"].rows[-1]
    assert ra["personalized_accuracy"] == pytest.approx(rb["personalized_accuracy"], abs=1e-6)


def test_heterogeneous_groups_train_together_and_only_logits_travel_for_fd():
    result = run(_cfg("fd", rounds=6, clients_per_round=8))
    fed = result.federation
    alg = fed.algorithm
    assert [g.name for g in alg.groups] == ["mlp", "small-cnn"]
    for g, grp in enumerate(alg.groups):  # every client keeps a model of its own group's architecture
        for cid in grp.members:
            grp.model.check_params(fed.clients.get(cid, dict)["params"])
    row = result.rows[-1]
    k = 10
    assert row["bytes_up"] == 8 * (k * k + k) * 4  # per-label mean logits and label presence, float32
    assert row["bytes_down"] == 8 * (k * k + k) * 4
    assert row["personalized_accuracy"] > 0.5  # chance is 0.1
    assert "global_accuracy" not in row  # FD has no global model


def test_fd_teacher_leaves_out_the_clients_own_contribution():
    """Two holders of label 0 report mean logits a and b: client A's teacher for label 0 is b."""
    k = 3
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    shared = {"sum": torch.zeros(k, k), "count": torch.tensor([2.0, 1.0, 0.0]), "from_round": torch.tensor(4),
              "round": torch.tensor(5)}
    shared["sum"][0] = a + b
    shared["sum"][1] = torch.tensor([0.0, 0.0, 3.0])
    own = {"params": {}, "mean": torch.stack([a, torch.zeros(k), torch.zeros(k)]),
           "present": torch.tensor([1.0, 0.0, 0.0]), "sent_round": torch.tensor(4)}
    program = DistilledSGD(model=None, lr=0.1, weight=1.0, temperature=1.0, num_classes=k)
    carry = program.init(shared, {"state": own})
    assert torch.equal(carry["teacher"][0], b) and torch.equal(carry["teacher"][1], torch.tensor([0.0, 0.0, 3.0]))
    assert carry["known"].tolist() == [1.0, 1.0, 0.0]
    stale = program.init(shared, {"state": {**own, "sent_round": torch.tensor(2)}})  # not counted in round 4
    assert torch.equal(stale["teacher"][0], (a + b) / 2)


def test_fd_server_averages_each_labels_mean_over_its_holders():
    fed = build_federation(_cfg("fd"))
    alg: FD = fed.algorithm
    means = torch.randn(3, 10, 10)
    present = torch.zeros(3, 10)
    present[0, :5] = present[1, 3:] = present[2, 4] = 1.0
    first = ([0, 1], {"label_logits": means[:2], "label_present": present[:2]}, torch.ones(2))
    second = ([2], {"label_logits": means[2:], "label_present": present[2:]}, torch.ones(1))
    state = alg.server_step(fed.state, [first, second], rnd=3)
    assert state.extra["fd.count"].tolist() == present.sum(0).tolist()
    label = 4  # held by all three clients
    torch.testing.assert_close(state.extra["fd.sum"][label] / 3, means[:, label].mean(0))
    assert int(state.extra["fd.round"]) == 3


def test_fedmd_consensus_is_the_mean_and_the_digest_moves_towards_it():
    fed = build_federation(_cfg("fedmd"))
    alg = fed.algorithm
    scores = torch.randn(5, alg.subset, 10)
    state = alg.server_step(fed.state, [([0, 1], {"scores": scores[:2]}, torch.ones(2)),
                                        ([2, 3, 4], {"scores": scores[2:]}, torch.ones(3))], rnd=1)
    torch.testing.assert_close(state.extra["fedmd.consensus"], scores.mean(0))
    broadcast = alg.broadcast_group(state, 2, 0)
    assert torch.equal(broadcast["digest_idx"], alg.subset_indices(1)) and float(broadcast["has_consensus"]) == 1
    target = torch.zeros(alg.subset, 10)
    target[:, 3] = 5.0  # a consensus that says "class 3" everywhere
    broadcast["consensus"] = target
    program = alg.program_group(2, 0)
    start = alg.client_init(broadcast)
    model = alg.groups[0].model
    before = (model.apply(start["params"], broadcast["digest_x"]) - target).abs().sum(-1).mean()
    digested = program.init(broadcast, {"state": start})["params"]
    after = (model.apply(digested, broadcast["digest_x"]) - target).abs().sum(-1).mean()
    assert after < before
    first = alg.broadcast_group(fed.state, 1, 0)  # round 1: no consensus yet, the digest is a no-op
    assert float(first["has_consensus"]) == 0
    same = program.init(first, {"state": start})["params"]
    assert all(torch.equal(same[k], start["params"][k]) for k in same)


def test_feddf_without_distillation_steps_is_fedavg():
    """One group and zero server steps: FedDF's student is the sample-weighted FedAvg model."""
    common = dict(num_clients=8, clients_per_round=4, rounds=3)
    df = run(small_config(algorithm="feddf", distill_steps=0, public_size=100, **common))
    # FedDF carved its public inputs out of the pool: FedAvg runs on the very same clients
    avg = run(small_config(algorithm="fedavg", **common), data=df.federation.dataset)
    for k, v in avg.params.items():
        torch.testing.assert_close(df.federation.state.params[f"0.{k}"], v, atol=1e-6, rtol=1e-5)


def test_feddf_distillation_pulls_each_group_towards_the_ensemble():
    fed = build_federation(_cfg("feddf", distill_steps=30, distill_lr=0.01))
    alg = fed.algorithm
    replies = {}
    for g, grp in enumerate(alg.groups):
        members = list(grp.members[:2])
        deltas = {k: torch.randn(2, *v.shape) * 0.1 for k, v in grp.model.init_params().items()}
        replies[g] = (members, {"update": deltas}, torch.ones(2))
    state = alg.server_step(fed.state, [replies[0], replies[1]], rnd=1)
    x = alg.public_x
    teacher_logits = []
    for g, grp in enumerate(alg.groups):
        proto = alg.group_global(fed.state, g)
        for i in range(2):
            teacher_logits.append(grp.model.apply({k: proto[k] + replies[g][1]["update"][k][i] for k in proto}, x))
    teacher = torch.softmax(torch.stack(teacher_logits).mean(0), -1)

    def gap(params, g):
        return torch.nn.functional.kl_div(torch.log_softmax(alg.groups[g].model.apply(params, x), -1), teacher,
                                          reduction="batchmean")

    no_distil = alg.__class__(alg.groups, alg.server_opt, alg.lr, x, 0, 0.01, 32, 1.0, 0)
    plain = no_distil.server_step(fed.state, [replies[0], replies[1]], rnd=1)
    for g in range(2):
        assert gap(alg.group_global(state, g), g) < gap(alg.group_global(plain, g), g)


@pytest.mark.parametrize("algorithm", sorted(ALGS))
def test_resume_continues_exactly(tmp_path, algorithm):
    straight = run(_cfg(algorithm, rounds=4, out=str(tmp_path / "a")))
    run(_cfg(algorithm, rounds=2, out=str(tmp_path / "b")))
    resumed = run(_cfg(algorithm, rounds=4, out=str(tmp_path / "b")), resume=tmp_path / "b")
    a, b = straight.federation, resumed.federation
    for key in a.state.params:
        assert torch.equal(a.state.params[key], b.state.params[key]), key
    for key in a.state.extra:
        assert torch.equal(a.state.extra[key], b.state.extra[key]), key
    for cid in a.clients.ids():
        sa, sb = a.clients.get(cid, dict), b.clients.get(cid, dict)
        for key in sa.get("params", {}):
            assert torch.equal(sa["params"][key], sb["params"][key])
    assert straight.rows[-1]["personalized_accuracy"] == resumed.rows[-1]["personalized_accuracy"]


def test_public_inputs_are_carved_out_of_the_pool():
    fed = build_federation(_cfg("fedmd"))
    held = sum(c.num_train + c.num_test for c in fed.dataset.clients)
    assert fed.dataset.public.shape == (200, 64)
    assert held + 200 == 1797  # digits: no client holds a public input
    pooled = torch.cat([torch.cat([c.train_x, c.test_x]) for c in fed.dataset.clients])
    public_rows = {tuple(r.tolist()) for r in fed.dataset.public}
    client_rows = {tuple(r.tolist()) for r in pooled}
    # digits has a few duplicate images; carving takes samples, so overlap is at most those
    assert len(public_rows & client_rows) <= 5


def test_incompatible_settings_are_refused_in_one_line():
    for extra, says in ((dict(dp="central", dp_noise_multiplier=1.0), "--dp"),
                        (dict(secure_aggregation=True), "--secure-aggregation"),
                        (dict(compress="topk:0.1"), "--compress"),
                        (dict(mode="async"), "--mode async"),
                        (dict(aggregator="median"), "--aggregator median"),
                        (dict(server_optimizer="adam"), "--server-optimizer")):
        with pytest.raises(ConfigError, match=says):
            build_config(algorithm="fedmd", **extra)
    with pytest.raises(ConfigError, match="unknown model"):
        build_config(algorithm="fd", client_models="mlp:0.5,vit:0.5")
    with pytest.raises(ConfigError, match="public-subset is a setting of fedmd"):
        build_config(algorithm="feddf", public_subset=10)
    with pytest.raises(ValueError, match="leaves no data"):
        build_federation(small_config(algorithm="fedmd", public_size=5000))
    with pytest.raises(ValueError, match="--heldout-fraction"):
        build_federation(small_config(algorithm="feddf", dataset="synthetic", model="logistic"))
    with pytest.raises(ValueError, match="no client runs"):
        build_federation(small_config(algorithm="fd", num_clients=3, client_models="mlp:0.9,logistic:0.1"))


def test_distillation_deploys_but_not_its_simulated_faults():
    """The distillation algorithms run in deployment (deployment == simulation:
    tests/test_conformance.py, tests/test_deploy_pool.py); what is simulated still is not."""
    from metafed.run import check_deployable

    check_deployable(small_config(algorithm="fd"))
    with pytest.raises(ConfigError, match="simulated"):
        check_deployable(small_config(algorithm="fd", dropout=0.25))


def test_feddf_scores_new_clients_with_their_groups_server_model():
    """Held-out clients get an architecture by the same shares and are scored with its
    prototype after k fine-tuning steps; FedMD and FD (no model to hand out) report none."""
    result = run(_cfg("feddf", heldout_fraction=0.25, num_clients=12, clients_per_round=6))
    row = result.rows[-1]
    assert all(0.0 <= row[f"new_client_accuracy_k{k}"] <= 1.0 for k in (0, 1, 5, 10))
    fed = result.federation
    alg = fed.algorithm
    held = fed.dataset.heldout
    from metafed.distill.groups import assign_groups
    from metafed.eval import score_global

    group = assign_groups(len(held), [0.5, 0.5], fed.cfg.seed, 1)
    correct = count = 0.0
    for j, client in enumerate(held):
        g = int(group[j])
        s = score_global(alg.groups[g].model, alg.group_global(fed.state, g), [client.test_x], [client.test_y])
        correct, count = correct + float(s.correct[0]), count + float(s.count[0])
    assert row["new_client_accuracy_k0"] == pytest.approx(correct / count)
    fd = run(_cfg("fd", heldout_fraction=0.25, num_clients=12, clients_per_round=6)).rows[-1]
    assert not any(k.startswith("new_client") for k in fd)
