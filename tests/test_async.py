"""--mode async: FedAsync and FedBuff on a virtual clock. Staleness weights follow their
formulas, FedBuff with K = M and no staleness is synchronous FedAvg, FedAsync with one client
and no delay is the sequential mixing rule by hand, and a resumed run continues exactly."""
import numpy as np
import pytest
import torch

from metafed.asynchrony import staleness_weight
from metafed.config import ConfigError, build_config
from metafed.data.schedule import sample_clients
from metafed.run import build_federation, check_deployable, run
from tests.conftest import small_config

ASYNC = dict(mode="async", local_steps=3, client_speed="constant", staleness="constant")


def test_staleness_weights_follow_their_formulas():
    assert [staleness_weight("constant")(t) for t in (0, 5)] == [1.0, 1.0]
    poly = staleness_weight("poly:1")
    assert [poly(t) for t in (0, 1, 3)] == [1.0, 0.5, 0.25]  # the documents' 1 / (1 + staleness)
    assert staleness_weight("poly:0.5")(3) == pytest.approx(0.5)
    hinge = staleness_weight("hinge:2,3")
    assert [hinge(t) for t in (0, 3, 4, 6)] == [1.0, 1.0, pytest.approx(1 / 3), pytest.approx(1 / 7)]
    with pytest.raises(ValueError, match="expected constant, poly:A or hinge:A,B"):
        staleness_weight("poly:x")


def test_fedbuff_with_k_equal_m_and_no_staleness_is_synchronous_fedavg():
    sync = run(small_config(local_steps=3, rounds=3))
    fedbuff = run(small_config(**ASYNC, rounds=3))
    for k in sync.params:
        torch.testing.assert_close(fedbuff.params[k], sync.params[k], atol=1e-6, rtol=0)
    assert [r["staleness_max"] for r in fedbuff.rows] == [0, 0, 0]
    assert [r["virtual_time"] for r in fedbuff.rows] == [3.0, 6.0, 9.0]  # 3 steps of one time unit each


def test_fedasync_with_one_client_and_no_delay_is_the_sequential_rule_by_hand():
    cfg = small_config(**ASYNC, async_rule="fedasync", async_alpha=0.5, clients_per_round=1, rounds=4)
    got = run(cfg)
    fed = build_federation(cfg)  # the reference: same clients, same batches, mixed one at a time
    alg, w = fed.algorithm, fed.algorithm.global_params(fed.state)
    for version in range(4):
        client = int(sample_clients(fed.pool.num_clients, 1, version + 1, cfg.seed)[0])
        broadcast = {"params": w}
        replies = fed.pool.train(version + 1, np.array([client]), alg.client_program(version + 1), broadcast)
        trained = {k: w[k] + replies.outputs["update"][k][0] for k in w}
        w = {k: 0.5 * w[k] + 0.5 * trained[k] for k in w}
    for k in w:
        torch.testing.assert_close(got.params[k], w[k], atol=1e-6, rtol=0)


def test_heterogeneous_speeds_make_stale_updates_and_a_resume_continues_exactly(tmp_path):
    cfg = small_config(mode="async", local_steps=3, client_speed="lognormal:1.0", slow_clients=0.25,
                       staleness="poly:1", buffer_size=2, rounds=6, eval_every=3)
    full = run(cfg)
    times = [r["virtual_time"] for r in full.rows]
    assert times == sorted(times) and max(r["staleness_max"] for r in full.rows) > 0
    out = tmp_path / "run"
    run(cfg.updated(rounds=3, out=out))
    resumed = run(small_config(rounds=6), resume=out)
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    assert [r["virtual_time"] for r in resumed.rows] == times


def test_async_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="use --algorithm fedavg or fedprox"):
        build_config(mode="async", algorithm="ditto")
    with pytest.raises(ConfigError, match="does not combine with --dp"):
        build_config(mode="async", dp="central", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="FedAsync mixes models"):
        build_config(mode="async", async_rule="fedasync", server_optimizer="adam")
    with pytest.raises(ConfigError, match="settings of --mode async"):
        build_config(buffer_size=4)
    check_deployable(build_config(mode="async"))  # deployment runs on real arrivals (tests/test_deploy_pool.py)
    with pytest.raises(ConfigError, match="speeds are real"):
        check_deployable(build_config(mode="async", slow_clients=0.2))
