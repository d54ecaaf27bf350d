"""Secure aggregation's floors: a cohort smaller than MIN_COHORT, or a threshold below
MIN_THRESHOLD, hides nothing (the "sum" of one client is its input). The library, the
config and each client's own node refuse them; a malicious server that asks one client
alone gets a refusal from the node, not its upload."""
from __future__ import annotations

import numpy as np
import pytest

from metafed.config import ConfigError, build_config
from metafed.privacy.secagg import FixedPoint, SecAggAbort, SecAggConfig, secure_sum
from metafed.privacy.secagg.protocol import MIN_COHORT, MIN_THRESHOLD


def test_the_floors():
    assert (MIN_COHORT, MIN_THRESHOLD) == (3, 2)
    for n, t in ((1, 1), (2, 2)):
        with pytest.raises(SecAggAbort, match="at least 3 clients and a threshold of at least 2"):
            SecAggConfig(t).check_cohort(n)
    with pytest.raises(SecAggAbort, match="n/2 < t"):  # t = 1 of 3: a minority already
        SecAggConfig(1).check_cohort(3)
    SecAggConfig(2).check_cohort(3)  # the smallest cohort that hides an input in a sum of two


def test_the_in_memory_protocol_refuses_a_cohort_of_one():
    victim = np.array([0.25, -0.5])
    with pytest.raises(SecAggAbort, match="a cohort of 1"):
        secure_sum({7: victim}, SecAggConfig(1), FixedPoint(1.0, 24))


@pytest.mark.parametrize("clients, sampling", [(1, "fixed"), (2, "fixed"), (2, "poisson")])
def test_the_config_refuses_secure_aggregation_over_fewer_than_three(clients, sampling):
    with pytest.raises(ConfigError, match=f"--secure-aggregation with {clients} clients per round"):
        build_config(secure_aggregation=True, clients_per_round=clients, client_sampling=sampling)
    with pytest.raises(ConfigError, match="--secure-aggregation with 2 clients per round"):
        build_config(secure_aggregation=True, num_clients=2, clients_per_round=10)
    build_config(secure_aggregation=True, clients_per_round=3)



def test_a_malicious_server_asking_one_client_alone_is_refused_by_the_node(tmp_path, server_task):
    """Through the real ClientApp handlers: the node holds its trained upload for the secure
    sum; a server that opens a round whose cohort is that client alone (threshold 1), or it
    and one other (threshold 2), gets an error reply naming the floor, and no key, share or
    masked input."""
    from tests.test_deploy_secagg import _node_after_train, _setup, _stage

    nodes, config_json, _ = _node_after_train(tmp_path)
    for node, cohort in ((100, [0]), (101, [1, 2])):
        setup = {**_setup(cohort), "threshold": len(cohort)}  # a majority: only the floor stops it
        reply = _stage(nodes, node, "advertise", 1, bytes([len(cohort)]) * 16, config_json, setup)
        assert reply.has_error() and "at least 3 clients" in reply.error.reason, cohort
        assert not reply.has_content()
    # and the node gave up its held upload with the refused round: a retry gets nothing either
    retry = _stage(nodes, 100, "advertise", 1, b"x" * 16, config_json, _setup([0, 1, 2, 3, 4]))
    assert retry.has_error() and "no upload" in retry.error.reason
