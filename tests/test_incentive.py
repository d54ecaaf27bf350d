"""Incentives: Shapley values (exact == brute force, the axioms, the estimator against
exact), rewards, free-riders flagged, and every kind of ledger tampering detected."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metafed.cli import app
from metafed.config import ConfigError, build_config
from metafed.incentive.ledger import LEDGER_FILE, Ledger, check_receipt, load_or_create_key, verify
from metafed.incentive.rewards import free_rider_flags, split_rewards
from metafed.incentive.shapley import CachedUtility, exact_shapley, gtg_shapley, leave_one_out
from metafed.run import run
from tests.conftest import small_config


def _brute_force(n, utility):
    """Shapley by its permutation definition: the mean marginal over all n! orders."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        prefix = frozenset()
        for j in order:
            phi[j] += utility(prefix | {j}) - utility(prefix)
            prefix = prefix | {j}
    return phi / math.factorial(n)


def _game(values: list[float], synergy: float = 0.0):
    """A coalition is worth the concave sum of its members' values (plus a synergy of players 1 and 2)."""
    def u(s: frozenset) -> float:
        base = sum(values[i] for i in s)
        return math.sqrt(base) + (synergy if {1, 2} <= s else 0.0)
    return u


def test_exact_shapley_equals_brute_force_and_satisfies_the_axioms():
    values = [1.0, 2.0, 2.0, 0.0]  # players 1 and 2 symmetric, player 3 null
    u = _game(values, synergy=0.3)
    phi = exact_shapley(4, u)
    np.testing.assert_allclose(phi, _brute_force(4, u), atol=1e-12)
    assert phi.sum() == pytest.approx(u(frozenset(range(4))) - u(frozenset()))  # efficiency
    assert phi[1] == pytest.approx(phi[2])  # symmetry
    assert phi[3] == pytest.approx(0.0, abs=1e-12)  # null player


def test_gtg_estimate_is_within_tolerance_of_exact_on_8_clients():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.1, 2.0, 8).tolist()
    u = CachedUtility(_game(values, synergy=0.2))
    exact = exact_shapley(8, u)
    estimate = gtg_shapley(8, _game(values, synergy=0.2), np.random.default_rng(1), eps=1e-6,
                           max_permutations=400, tolerance=1e-3)
    rel = np.abs(estimate - exact).sum() / np.abs(exact).sum()
    assert rel < 0.05, (estimate, exact)
    assert estimate.sum() == pytest.approx(exact.sum(), rel=1e-6)  # every permutation is efficient


def test_a_duplicated_client_splits_its_value():
    """Two clients with the same data are interchangeable: Shapley gives each half of what
    one alone would add; leave-one-out gives each (nearly) nothing."""
    def u(s: frozenset) -> float:
        has_a = bool({0, 1} & s)  # 0 and 1 hold the same data
        return (1.0 if has_a else 0.0) + (0.5 if 2 in s else 0.0)
    phi = exact_shapley(3, u)
    assert phi[0] == pytest.approx(0.5) and phi[1] == pytest.approx(0.5) and phi[2] == pytest.approx(0.5)
    loo = leave_one_out(3, u)
    assert loo[0] == pytest.approx(0.0) and loo[1] == pytest.approx(0.0)


def test_rewards_split_by_positive_contribution_with_a_floor():
    r = split_rewards(np.array([3.0, 1.0, -1.0, 5.0]), np.array([False, False, False, True]), 100, floor=0.0)
    np.testing.assert_allclose(r, [75, 25, 0, 0])
    r = split_rewards(np.array([3.0, 1.0, -1.0, 5.0]), np.array([False, False, False, True]), 100, floor=0.3)
    np.testing.assert_allclose(r, [10 + 52.5, 10 + 17.5, 10, 0])
    assert r.sum() == pytest.approx(100)


def test_free_riders_are_flagged():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(5, 300, generator=g, dtype=torch.float64) + 1.0  # correlated honest updates
    previous = honest.mean(0)
    rows = torch.cat([honest, torch.zeros(1, 300), honest[2:3], previous[None],
                      torch.randn(1, 300, generator=g, dtype=torch.float64)])
    hashes = [str(hash(tuple(r.tolist()))) for r in rows]
    ids = list(range(10, 19))
    contrib = np.array([0.1] * 5 + [0.0, 0.1, 0.05, -0.01])
    flags = free_rider_flags(rows, hashes, ids, contrib, previous)
    assert flags[:2] == [[], []] and flags[3:5] == [[], []]
    assert flags[5] == ["zero update"]
    assert flags[6] == ["identical to client 12"] and flags[2] == ["identical to client 16"]
    assert flags[7] == ["replays the previous global update"]
    assert flags[8] and flags[8][0].startswith("uncorrelated with the cohort")


# ---------------------------------------------------------------------- the ledger
def _ledger(tmp_path, rounds=3, clients=3):
    key = load_or_create_key(tmp_path / "key.pem")
    ledger = Ledger(tmp_path, key)
    for rnd in range(1, rounds + 1):
        ledger.append(rnd, [{"client": c, "update_sha256": f"{rnd}{c}" * 8, "contribution": 0.1 * c,
                             "reward": 10.0 * c, "flags": []} for c in range(clients)])
    return ledger, key


def _lines(tmp_path):
    return (tmp_path / LEDGER_FILE).read_text().splitlines()


def _write(tmp_path, lines):
    (tmp_path / LEDGER_FILE).write_text("\n".join(lines) + "\n")


def _change_entry(tmp_path, change):
    """Rewrite ledger entry 4 (reward raised to 1000) with ``change`` applied to it."""
    lines = _lines(tmp_path)
    e = json.loads(lines[4])
    e["reward"] = 1000.0
    change(e)
    lines[4] = json.dumps(e)
    _write(tmp_path, lines)


def _edit(tmp_path):
    _change_entry(tmp_path, lambda e: None)


def _edit_and_rehash(tmp_path):
    """Edit an entry and recompute its hash (without the server's key the signature fails)."""
    from metafed.incentive.ledger import entry_hash

    _change_entry(tmp_path, lambda e: e.update(hash=entry_hash(e)))


def _remove(tmp_path):
    lines = _lines(tmp_path)
    del lines[3]
    _write(tmp_path, lines)


def _reorder(tmp_path):
    lines = _lines(tmp_path)
    lines[2], lines[3] = lines[3], lines[2]
    _write(tmp_path, lines)


def _insert(tmp_path):
    lines = _lines(tmp_path)
    lines.insert(3, lines[3])
    _write(tmp_path, lines)


def _resign_with_another_key(tmp_path):
    """A forger re-signs an edited entry with its own key: the pinned key catches it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from metafed.incentive.ledger import entry_hash

    def resign(e):
        e["hash"] = entry_hash(e)
        e["sig"] = Ed25519PrivateKey.generate().sign(bytes.fromhex(e["hash"])).hex()

    _change_entry(tmp_path, resign)


@pytest.mark.parametrize("tamper, problem", [
    (_edit, "content does not match its hash"),
    (_edit_and_rehash, "signature does not match"),
    (_remove, "removed, inserted or reordered"),
    (_reorder, "removed, inserted or reordered"),
    (_insert, "removed, inserted or reordered"),
    (_resign_with_another_key, "signature does not match"),
])
def test_every_kind_of_tampering_is_detected(tmp_path, tamper, problem):
    _, key = _ledger(tmp_path)
    from metafed.incentive.ledger import public_hex

    assert verify(tmp_path / LEDGER_FILE, public_hex(key)).ok
    tamper(tmp_path)
    result = verify(tmp_path / LEDGER_FILE, public_hex(key))
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_a_client_checks_its_receipt(tmp_path):
    key = load_or_create_key(tmp_path / "key.pem")
    ledger = Ledger(tmp_path, key)
    from metafed.incentive.ledger import public_hex

    receipt = ledger.append(1, [{"client": 4, "update_sha256": "ab" * 32, "contribution": 0.2, "reward": 7.0}])[0]
    assert check_receipt(receipt, public_hex(key))
    assert not check_receipt({**receipt, "reward": 70.0}, public_hex(key))  # the server cannot deny or alter it


def test_a_run_keeps_a_verifiable_ledger_and_resumes_it(tmp_path):
    cfg = dict(contribution="shapley", rounds=4, num_clients=10, clients_per_round=5, free_riders=0.2,
               free_ride="zero")
    straight = run(small_config(out=str(tmp_path / "a"), **cfg))
    run(small_config(out=str(tmp_path / "b"), **{**cfg, "rounds": 2}))
    resumed = run(small_config(out=str(tmp_path / "b"), **cfg), resume=tmp_path / "b")
    a, b = verify(tmp_path / "a" / LEDGER_FILE), verify(tmp_path / "b" / LEDGER_FILE)
    assert a.ok and b.ok and a.entries == b.entries == 4 * 5
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("hash", "sig", "prev")}  # noqa: E731
                          for r in rows[1:]]
    assert strip(_lines(tmp_path / "a")) == strip(_lines(tmp_path / "b"))  # same contributions and rewards
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k])
    riders = straight.federation.free_riders
    entries = [json.loads(r) for r in _lines(tmp_path / "a")[1:]]
    assert all(e["flags"] == ["zero update"] and e["reward"] == 0 for e in entries if e["client"] in riders)
    assert all(sum(e["reward"] for e in entries if e["round"] == r) == pytest.approx(100) for r in range(1, 5))
    out = CliRunner().invoke(app, ["ledger", "verify", str(tmp_path / "a")])
    assert out.exit_code == 0 and "ok: 20 entries" in out.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["ledger"]
    assert summary["entries"] == 20 and summary["head"] == a.head and summary["public_key"] == a.public_key
    shown = CliRunner().invoke(app, ["ledger", "show", str(tmp_path / "a")])
    assert shown.exit_code == 0 and "(verified)" in shown.output
    _edit(tmp_path / "a")
    out = CliRunner().invoke(app, ["ledger", "verify", str(tmp_path / "a")])
    assert out.exit_code == 1 and "TAMPERED" in out.output


def test_incentive_settings_are_checked():
    with pytest.raises(ConfigError, match="--contribution measures each client's own update"):
        build_config(contribution="loo", secure_aggregation=True)
    with pytest.raises(ConfigError, match="at most 14 clients per round"):
        build_config(contribution="shapley-exact", clients_per_round=20, num_clients=30)
    with pytest.raises(ConfigError, match="--reward-budget has no effect without --contribution"):
        build_config(reward_budget=5)


def test_a_node_keeps_only_receipts_that_verify_under_one_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from metafed.deploy.receipts import ReceiptRefused, keep_receipt, read_receipts
    from metafed.incentive.ledger import public_hex

    key = load_or_create_key(tmp_path / "key.pem")
    ledger = Ledger(tmp_path, key)
    first = ledger.append(1, [{"client": 2, "update_sha256": "ab" * 32, "contribution": 0.5, "reward": 3.0}])[0]
    keep_receipt(tmp_path / "node", 2, 1, first, public_hex(key))
    second = ledger.append(2, [{"client": 2, "update_sha256": "cd" * 32, "contribution": 0.4, "reward": 2.0}])[0]
    with pytest.raises(ReceiptRefused, match="hash or signature"):
        keep_receipt(tmp_path / "node", 2, 2, {**second, "reward": 20.0}, public_hex(key))
    with pytest.raises(ReceiptRefused, match="not client 3"):
        keep_receipt(tmp_path / "node", 3, 2, second, public_hex(key))
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ReceiptRefused, match="another ledger key"):
        keep_receipt(tmp_path / "node", 2, 2, second, public_hex(other))
    keep_receipt(tmp_path / "node", 2, 2, second, public_hex(key))
    assert [r["round"] for r in read_receipts(tmp_path / "node", 2)] == [1, 2]
