"""Secure aggregation: masks cancel, dropouts at every stage, aborts, uniformity, run parity."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from metafed.privacy.secagg import (FixedPoint, QuantizationRangeError, SecAggAbort, SecAggConfig, secure_sum,
                                    secure_sum_encoded, shamir)
from metafed.privacy.secagg.protocol import SurvivorList
from metafed.run import run
from tests.conftest import small_config


def seeded_bytes(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


FIXED = FixedPoint(1.0, 24)
N, T, D = 40, 21, 40


def _vectors(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return {c: rng.uniform(-1, 1, D) for c in range(n)}


def _plain_encoded_sum(vectors, survivors):
    return sum(FIXED.encode(vectors[c]) for c in survivors).astype(np.uint64)


def test_shamir_roundtrip_and_threshold():
    secret = bytes(range(32))
    shares = shamir.split(secret, list(range(1, 11)), 4, seeded_bytes(1))
    assert shamir.combine({x: shares[x] for x in (2, 5, 7, 9)}, 4) == secret
    assert shamir.combine({x: shares[x] for x in (1, 2, 3)} | {10: shares[10]}, 4) == secret
    with pytest.raises(ValueError, match="cannot reconstruct"):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # t - 1 shares say nothing: a wrong guess at the missing share gives another secret
    assert shamir.combine({1: shares[1], 2: shares[2], 3: shares[3], 4: shares[4] + 1}, 4) != secret


@pytest.mark.parametrize("stage", ["share", "upload"])
def test_thirty_percent_drop_survivors_sum_exact(stage):
    # stage "upload": they shared keys, then vanished before sending masked input (after key sharing);
    # drops before "sign" happen after the masked upload (see the next test)
    vectors = _vectors()
    gone = set(range(0, N, 10)) | set(range(1, N, 10)) | set(range(2, N, 10))  # 30 % of the clients
    result = secure_sum(vectors, SecAggConfig(T), FIXED, {stage: gone}, seeded_bytes(2))
    assert set(result.survivors) == set(range(N)) - gone
    assert np.array_equal(result.encoded_total, _plain_encoded_sum(vectors, result.survivors))  # bit for bit
    exact = sum(vectors[c] for c in result.survivors)
    assert np.abs(result.total - exact).max() <= FIXED.max_error(len(result.survivors))


def test_drop_after_masked_upload_is_exact():
    vectors = _vectors(1)
    gone = set(range(12))
    result = secure_sum(vectors, SecAggConfig(T), FIXED, {"unmask": gone}, seeded_bytes(3))
    assert len(result.survivors) == N  # their inputs arrived; their unmasking help is not needed
    assert np.array_equal(result.encoded_total, _plain_encoded_sum(vectors, range(N)))


def test_secagg_plus_sparse_graph_with_dropouts():
    vectors = _vectors(2)
    config = SecAggConfig(T, neighbours=24)
    result = secure_sum(vectors, config, FIXED, {"upload": set(range(4)), "unmask": set(range(4, 7))},
                        seeded_bytes(4))
    assert np.array_equal(result.encoded_total, _plain_encoded_sum(vectors, result.survivors))
    assert len(config.neighbourhood(0, list(range(N)), b"any graph seed")) == 24


def test_too_few_survivors_aborts_without_releasing_live_mask_keys():
    vectors = _vectors(3)
    released = []
    from metafed.privacy.secagg.client import SecAggClient

    original = SecAggClient.unmask

    def spy(self, request):
        response = original(self, request)
        released.append(response)
        return response

    SecAggClient.unmask = spy
    try:
        with pytest.raises(SecAggAbort, match="threshold 21"):
            secure_sum(vectors, SecAggConfig(T), FIXED, {"upload": set(range(20))}, seeded_bytes(5))
    finally:
        SecAggClient.unmask = original
    assert released == []  # aborted before any client revealed anything


def test_inconsistent_lists_make_honest_clients_abort():
    vectors = _vectors(4, n=12)
    encoded = {c: FIXED.encode(v) for c, v in vectors.items()}

    def claims_live_client_dropped(client, lists):  # try to learn client 3's mask key while its input is in
        alive = tuple(c for c in lists.survivors if c != 3)
        return SurvivorList(lists.session, lists.keyset, alive, lists.dropped + (3,)) if client != 3 else lists

    # the victim's peers sign a list that differs from the victim's: the victim's unmasking
    # finds < t signatures on its list, the others cannot reveal the victim's key share
    # without first revealing ... nothing: the round aborts before the victim's key is rebuilt
    with pytest.raises(SecAggAbort):
        secure_sum_encoded(encoded, SecAggConfig(7), None, seeded_bytes(6), tamper=claims_live_client_dropped)

    def both_lists(client, lists):
        return SurvivorList(lists.session, lists.keyset, lists.survivors, lists.dropped + (lists.survivors[0],))

    with pytest.raises(SecAggAbort, match="consistency check"):
        secure_sum_encoded(encoded, SecAggConfig(7), None, seeded_bytes(7), tamper=both_lists)


def test_masked_vectors_look_uniform():
    vectors = {c: np.zeros(4000) for c in range(20)}  # constant inputs: only masks remain
    result = secure_sum(vectors, SecAggConfig(11), FIXED, None, seeded_bytes(8))
    top_bytes = np.concatenate([(v >> np.uint64(56)).astype(np.int64) for v in result.masked.values()])
    _, p = chisquare(np.bincount(top_bytes, minlength=256))
    assert p > 1e-3
    assert np.array_equal(result.encoded_total, _plain_encoded_sum(vectors, range(20)))


def test_quantization_range_and_overflow_are_refused():
    with pytest.raises(QuantizationRangeError, match="2 of 3 values"):
        FIXED.encode(np.array([0.5, 1.5, -2.0]))
    with pytest.raises(QuantizationRangeError):
        FIXED.encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="overflow"):
        FixedPoint(1.0, 50).check_capacity(100)


def test_run_with_secure_aggregation_matches_plain_run():
    plain = run(small_config(rounds=2, clients_per_round=5))
    secure = run(small_config(rounds=2, clients_per_round=5, secure_aggregation=True, secagg_threshold=3,
                              secagg_range=1000.0))
    for k in plain.params:
        torch.testing.assert_close(secure.params[k], plain.params[k], atol=1e-5, rtol=0)
    dropped = run(small_config(rounds=2, clients_per_round=5, secure_aggregation=True, secagg_threshold=3,
                               secagg_range=1000.0, secagg_dropout=0.4))
    assert dropped.rows[-1]["clients_used"] == 3


def test_nonlinear_aggregator_after_secagg_is_refused():
    with pytest.raises(Exception, match="secure aggregation"):
        small_config(secure_aggregation=True, aggregator="median")


def test_hundred_clients_thirty_percent_drop_after_sharing():
    vectors = _vectors(9, n=100)
    gone = set(range(0, 100, 10)) | set(range(1, 100, 10)) | set(range(2, 100, 10))
    result = secure_sum(vectors, SecAggConfig(51), FIXED, {"upload": gone}, seeded_bytes(10))
    assert np.array_equal(result.encoded_total, _plain_encoded_sum(vectors, result.survivors))
    assert len(result.survivors) == 70
