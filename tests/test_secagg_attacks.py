"""Secure aggregation under attack: each test plays a malicious server or malicious
clients against honest ones, and checks that the victim's input stays hidden (the honest
parties abort or drop the cheater) or that the sum stays exact."""
import logging

import numpy as np
import pytest

from metafed.privacy.secagg import FixedPoint, SecAggAbort, SecAggConfig, crypto, secure_sum, setup, shamir
from metafed.privacy.secagg.messages import (AdvertiseKeys, EncryptedShare, SharesForYou, SurvivorList, UnmaskRequest,
                                             UnmaskResponse)

FIXED = FixedPoint(1.0, 24)
N, T, D = 8, 5, 16
VICTIM = 3


def seeded_bytes(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def _encoded(n=N, seed=0):
    rng = np.random.default_rng(seed)
    vectors = {c: rng.uniform(-1, 1, D) for c in range(n)}
    return vectors, {c: FIXED.encode(v) for c, v in vectors.items()}


def _plain(encoded, ids):
    return sum(encoded[c] for c in ids).astype(np.uint64)


def _to_masked(clients, server):
    """Honest run of stages 0-2; returns (adverts, inbox, lists)."""
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share_keys(adverts) for c in clients.values()])
    lists = server.collect_masked([clients[c].masked_input(inbox[c]) for c in inbox])
    return adverts, inbox, lists


def _unmask_all(clients, server, lists):
    sigs = [clients[c].sign_survivors(lists) for c in lists.survivors]
    request = server.unmask_request(lists, sigs)
    return [clients[c].unmask(request) for c in lists.survivors]


def test_honest_protocol_is_exact():
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(1))
    _, _, lists = _to_masked(clients, server)
    total = server.finish(lists, _unmask_all(clients, server, lists))
    assert np.array_equal(total, _plain(encoded, range(N)))


def test_second_survivor_list_cannot_extract_the_victims_mask_key():
    """Finding 1: after the honest unmasking (the victim's self-mask shares are out), the
    server asks again with a list that marks the victim dropped, to collect its key shares."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(2))
    _, _, lists = _to_masked(clients, server)
    responses = _unmask_all(clients, server, lists)
    assert all(VICTIM in r.self_mask_shares for r in responses if r.client != VICTIM)
    forged = SurvivorList(lists.session, lists.keyset, tuple(c for c in lists.survivors if c != VICTIM), (VICTIM,))
    for c in lists.survivors:
        if c == VICTIM:
            continue
        with pytest.raises(SecAggAbort, match="expecting"):
            clients[c].sign_survivors(forged)  # a second signature: refused
        with pytest.raises(SecAggAbort, match="aborted earlier"):
            clients[c].unmask(UnmaskRequest(forged, {}))  # and the client stays closed for the round


def test_no_client_reveals_both_shares_even_when_asked_twice_before_unmasking():
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(3))
    _, _, lists = _to_masked(clients, server)
    forged = SurvivorList(lists.session, lists.keyset, tuple(c for c in lists.survivors if c != VICTIM), (VICTIM,))
    for c in lists.survivors:
        clients[c].sign_survivors(lists)
    sigs = {c: clients[c]._identity.sign(lists.digest()) for c in lists.survivors}
    helper = next(c for c in lists.survivors if c != VICTIM)
    clients[helper].unmask(UnmaskRequest(lists, sigs))
    with pytest.raises(SecAggAbort):
        clients[helper].unmask(UnmaskRequest(forged, sigs))  # stage already done


def test_withheld_shares_make_the_victim_refuse_to_mask():
    """Finding 2: the server withholds the victim's incoming shares so it masks with its
    self-mask alone, which the server would then rebuild from the others."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(4))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share_keys(adverts) for c in clients.values()])
    for c in clients:
        if c != VICTIM:
            clients[c].masked_input(inbox[c])
    with pytest.raises(SecAggAbort, match="refusing to mask"):
        clients[VICTIM].masked_input(SharesForYou(VICTIM, inbox[VICTIM].shares[: T - 2]))  # t-2 + own < t


def test_t_minus_one_peer_shares_plus_its_own_are_enough():
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(5))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share_keys(adverts) for c in clients.values()])
    masked = clients[VICTIM].masked_input(SharesForYou(VICTIM, inbox[VICTIM].shares[: T - 1]))
    assert len(masked.paired) == T - 1


def test_server_cannot_swap_keys_or_run_fake_clients():
    """Finding 3: the server replaces the victim's advertised keys with its own, and adds a
    fake client; peers check adverts against the identity roster and ignore both."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(6))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    server_sk, server_pk = crypto.identity_keypair(bytes(range(32)))
    _, enc_pk = crypto.x25519_keypair(bytes(32 * [7]))
    swapped = AdvertiseKeys(VICTIM, enc_pk, enc_pk, bytes(32))
    swapped = AdvertiseKeys(VICTIM, enc_pk, enc_pk, bytes(32), server_sk.sign(swapped.body(server.session)))
    fake = AdvertiseKeys(99, enc_pk, enc_pk, bytes(32))
    fake = AdvertiseKeys(99, enc_pk, enc_pk, bytes(32), server_sk.sign(fake.body(server.session)))
    relayed = [a for a in adverts if a.client != VICTIM] + [swapped, fake]
    for c in clients:
        if c == VICTIM:
            with pytest.raises(SecAggAbort, match="own keys"):
                clients[c].share_keys(relayed)
        else:
            share = clients[c].share_keys(relayed)
            assert {s.recipient for s in share.shares} == set(range(N)) - {c, VICTIM}  # nothing for the swap or fake
            assert VICTIM not in clients[c]._adverts and 99 not in clients[c]._adverts


def test_forged_survivor_signatures_do_not_count():
    """The server drops honest clients and forges their list signatures to reach t."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(7))
    _, _, lists = _to_masked(clients, server)
    small = SurvivorList(lists.session, lists.keyset, lists.survivors[:T - 1], lists.survivors[T - 1:])
    with pytest.raises(SecAggAbort, match="below the threshold"):
        clients[0].sign_survivors(small)
    # a list of t survivors where the server forges one signature with a key of its own
    alive = lists.survivors[1:T + 1]  # client 0 has aborted: leave it out
    lists2 = SurvivorList(lists.session, lists.keyset, alive, tuple(sorted(set(range(N)) - set(alive))))
    sigs = {c: clients[c].sign_survivors(lists2).signature for c in alive[:T - 1]}
    forger, _ = crypto.identity_keypair(bytes(range(32)))
    sigs[alive[T - 1]] = forger.sign(lists2.digest())
    with pytest.raises(SecAggAbort, match="valid signatures"):
        clients[alive[0]].unmask(UnmaskRequest(lists2, sigs))


@pytest.mark.parametrize("threshold", [1, 3, 4])
def test_threshold_at_or_below_half_the_cohort_is_refused(threshold):
    """Finding 4: with t <= n/2 a server can show two halves different lists."""
    _, encoded = _encoded()
    with pytest.raises(SecAggAbort, match="n/2 < t"):
        setup(encoded, SecAggConfig(threshold), seeded_bytes(8))


def test_secagg_plus_refuses_odd_k_and_draws_its_graph_from_the_keys():
    with pytest.raises(ValueError, match="even"):
        SecAggConfig(5, neighbours=3)
    members = list(range(20))
    config = SecAggConfig(11, neighbours=4)
    graph_a = [config.neighbourhood(c, members, b"keys of round a") for c in members]
    graph_b = [config.neighbourhood(c, members, b"keys of round b") for c in members]
    assert graph_a != graph_b and all(len(g) == 4 for g in graph_a + graph_b)
    # in the protocol the seed is the hash of all advertised keys, the same for every party
    _, encoded = _encoded(20)
    clients, server = setup(encoded, config, seeded_bytes(9))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    for c in clients.values():
        c.share_keys(adverts)
    assert all(clients[c]._neighbours == server.graph[c] for c in clients)


def test_forged_share_sender_is_dropped_without_crashing_peers(caplog):
    """Finding 5a: a share claiming another sender (garbage ciphertext) reaches the victim."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(10))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share_keys(adverts) for c in clients.values()])
    forged = EncryptedShare(0, VICTIM, b"\x00" * 180, bytes(32), bytes(32), b"\x01" * 64)
    inbox[VICTIM] = SharesForYou(VICTIM, inbox[VICTIM].shares + (forged,))
    with caplog.at_level(logging.WARNING, logger="metafed.secagg"):
        lists = server.collect_masked([clients[c].masked_input(inbox[c]) for c in inbox])
    assert "dropping peer 0" in caplog.text
    total = server.finish(lists, _unmask_all(clients, server, lists))
    assert np.array_equal(total, _plain(encoded, lists.survivors))
    assert 0 not in lists.survivors  # its pairwise mask with the victim is one-sided: it is dropped


def test_small_order_public_key_is_ignored_not_a_crash():
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(11))
    adverts = server.collect_keys([c.advertise() for c in clients.values()])
    bad = adverts[1]
    zero = AdvertiseKeys(1, bytes(32), bytes(32), bad.seed_commitment)  # the all-zero point has small order
    zero = AdvertiseKeys(1, bytes(32), bytes(32), bad.seed_commitment, clients[1]._identity.sign(zero.body(server.session)))
    relayed = [a if a.client != 1 else zero for a in adverts]
    share = clients[0].share_keys(relayed)
    assert 1 not in {s.recipient for s in share.shares}


def test_bad_share_in_unmasking_is_caught_by_its_commitment():
    """Finding 5b: a malicious survivor reveals wrong shares to corrupt the sum."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(12))
    _, _, lists = _to_masked(clients, server)
    responses = _unmask_all(clients, server, lists)
    liar = responses[0]
    wrong = {o: (s + 1) % shamir.PRIME for o, s in liar.self_mask_shares.items()}
    liar_msg = UnmaskResponse(liar.client, wrong, {})
    responses[0] = UnmaskResponse(liar.client, wrong, {}, clients[liar.client]._identity.sign(liar_msg.body(server.session)))
    total = server.finish(lists, responses)
    assert np.array_equal(total, _plain(encoded, lists.survivors))


def test_reply_claiming_client_minus_one_is_rejected():
    """Finding 5c: id -1 would be Shamir point 0, i.e. the secret itself."""
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(13))
    _, _, lists = _to_masked(clients, server)
    responses = _unmask_all(clients, server, lists)
    rogue = UnmaskResponse(-1, {v: 12345 for v in lists.survivors}, {}, b"\x00" * 64)
    total = server.finish(lists, [rogue] + responses)
    assert np.array_equal(total, _plain(encoded, lists.survivors))


def test_out_of_range_client_is_dropped_not_the_round(caplog):
    """Finding 6: one client out of the fixed-point range used to abort the whole run."""
    vectors, _ = _encoded()
    vectors[2] = vectors[2] * 1000
    with caplog.at_level(logging.WARNING, logger="metafed.secagg"):
        result = secure_sum(vectors, SecAggConfig(T), FIXED, None, seeded_bytes(14))
    assert result.rejected == (2,) and 2 not in result.survivors
    assert "dropped client 2" in caplog.text
    assert np.abs(result.total - sum(vectors[c] for c in result.survivors)).max() <= FIXED.max_error(N)


def test_mask_generator_is_little_endian_on_every_machine():
    """Finding 7: AES-256-CTR keystream under the all-zero key starts with AES_0(0), the
    FIPS-197 style known answer dc95c078a2408989..., read as little-endian words."""
    first = crypto.prg_uint64(bytes(32), 2)
    assert first.dtype == np.uint64
    assert int(first[0]) == int.from_bytes(bytes.fromhex("dc95c078a2408989"), "little")
    assert int(first[1]) == int.from_bytes(bytes.fromhex("ad48a21492842087"), "little")


def test_threshold_equal_to_cohort_without_dropouts():
    """Finding 23: t = n used to abort ("n-1 neighbours, threshold n")."""
    vectors, encoded = _encoded()
    result = secure_sum(vectors, SecAggConfig(N), FIXED, None, seeded_bytes(15))
    assert result.survivors == tuple(range(N))
    assert np.array_equal(result.encoded_total, _plain(encoded, range(N)))


def test_stages_out_of_order_abort():
    _, encoded = _encoded()
    clients, server = setup(encoded, SecAggConfig(T), seeded_bytes(16))
    with pytest.raises(SecAggAbort, match="expecting 'advertise'"):
        clients[0].masked_input(SharesForYou(0, ()))
    with pytest.raises(SecAggAbort, match="aborted earlier"):
        clients[0].advertise()
    clients[1].advertise()
    with pytest.raises(SecAggAbort, match="expecting 'share'"):
        clients[1].advertise()


def test_messages_replayed_from_another_round_are_rejected():
    """Every signature covers the session id (run, round): an advert or a masked input
    recorded in round 1 does not verify in round 2, even with the same identities."""
    from metafed.privacy.secagg import identities
    from metafed.privacy.secagg.messages import session_id

    _, encoded = _encoded()
    signing, roster = identities(range(N), seeded_bytes(17))
    old, old_server = setup(encoded, SecAggConfig(T), seeded_bytes(18), signing=signing, roster=roster,
                            session=session_id(b"run", 1))
    new, new_server = setup(encoded, SecAggConfig(T), seeded_bytes(19), signing=signing, roster=roster,
                            session=session_id(b"run", 2))
    old_adverts = old_server.collect_keys([c.advertise() for c in old.values()])
    new_adverts = [c.advertise() for c in new.values()]
    replayed = [a if a.client != VICTIM else old_adverts[VICTIM] for a in new_adverts]
    accepted = new_server.collect_keys(replayed)
    assert VICTIM not in {a.client for a in accepted}  # the round-1 advert fails round 2's session
    old_inbox = old_server.route_shares([c.share_keys(old_adverts) for c in old.values()])
    old_masked = old[VICTIM].masked_input(old_inbox[VICTIM])
    new_inbox = new_server.route_shares([new[c].share_keys(accepted) for c in new if c != VICTIM])
    lists = new_server.collect_masked([new[c].masked_input(new_inbox[c]) for c in new_inbox] + [old_masked])
    assert VICTIM not in lists.survivors + lists.dropped
