"""Byzantine-robust aggregators and attack simulations."""
import pytest
import torch

from metafed.aggregate import RoundSkipped
from metafed.aggregate.robust import RobustAggregator, coordinate_median, krum_scores, trimmed_mean
from metafed.attacks import add_trigger, alie_z, corrupt_updates
from metafed.run import run
from tests.conftest import small_config


def _msgs(x):
    return {"update": {"w": x}}


def test_median_and_trimmed_mean_exact():
    x = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(coordinate_median(x), torch.tensor([2.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(trimmed_mean(x, 1), torch.tensor([2.5, 0.5], dtype=torch.float64))
    with pytest.raises(RoundSkipped, match="more than 4"):
        trimmed_mean(x, 2)


def test_krum_and_multi_krum_ignore_outliers():
    honest = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0
    bad = torch.full((2, 5), 50.0)
    x = torch.cat([honest, bad])
    scores = krum_scores(x.double(), f=2)
    assert scores[8:].min() > scores[:8].max()
    for name in ("krum", "multi-krum", "bulyan" if len(x) >= 11 else "median", "median", "trimmed-mean",
                 "centered-clipping"):
        agg = RobustAggregator(name, f=2)
        out = agg(_msgs(x), torch.ones(10))["update"]["w"]
        assert (out - 1.0).abs().max() < 0.5, name


def test_invalid_n_f_is_a_clear_error():
    x = _msgs(torch.randn(6, 3))
    with pytest.raises(RoundSkipped, match="krum needs n >= 2f \\+ 3"):
        RobustAggregator("krum", f=2)(x, torch.ones(6))
    with pytest.raises(RoundSkipped, match="bulyan needs n >= 4f \\+ 3"):
        RobustAggregator("bulyan", f=1)(x, torch.ones(6))
    with pytest.raises(ValueError, match="unknown aggregator"):
        RobustAggregator("average-ish")


def test_bulyan_with_enough_clients():
    honest = torch.randn(9, 4, generator=torch.Generator().manual_seed(1)) * 0.1
    x = torch.cat([honest, torch.full((2, 4), -30.0)])  # n = 11 >= 4*2 + 3
    out = RobustAggregator("bulyan", f=2)(_msgs(x), torch.ones(11))["update"]["w"]
    assert out.abs().max() < 0.3


def test_fltrust_zero_trust_for_opposite_updates():
    ref = {"update": {"w": torch.tensor([1.0, 0.0])}}
    x = torch.tensor([[2.0, 0.0], [-5.0, 0.0], [1.0, 1.0]])
    out = RobustAggregator("fltrust")(_msgs(x), torch.ones(3), reference=ref)["update"]["w"]
    # trust: 1, 0 (ReLU of cos = -1), 1/sqrt(2); all rescaled to norm 1
    t3 = 2 ** -0.5
    expected = (torch.tensor([1.0, 0.0]) + t3 * torch.tensor([t3, t3])) / (1 + t3)
    torch.testing.assert_close(out, expected)


def test_update_attacks_touch_only_malicious_rows():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    bad = torch.tensor([False, True, False, False, True])
    g = torch.Generator().manual_seed(0)
    for attack in ("sign-flip", "gaussian", "alie", "ipm", "backdoor"):
        out = corrupt_updates(attack, _msgs(x.clone()), bad, 2.0, g)["update"]["w"]
        torch.testing.assert_close(out[~bad], x[~bad])
        assert not torch.allclose(out[bad], x[bad]), attack
    flipped = corrupt_updates("sign-flip", _msgs(x.clone()), bad, 2.0, g)["update"]["w"]
    torch.testing.assert_close(flipped[bad], -2.0 * x[bad])
    assert alie_z(50, 10) == pytest.approx(0.4677, abs=1e-3)  # s = 16: z = Phi^-1(34/50)


def test_trigger_stamps_a_corner_square():
    x = torch.zeros(2, 784)
    stamped = add_trigger(x, (784,)).view(2, 28, 28)
    assert stamped[:, -5:-1, -5:-1].min() == 0 and stamped.sum() == 0  # all-zero data: max is 0
    x[0, 0] = 1.0
    stamped = add_trigger(x, (784,)).view(2, 28, 28)
    assert stamped[:, 23:27, 23:27].eq(1.0).all() and stamped[:, :20].sum() == 1.0


def test_attack_hurts_fedavg_and_robust_rules_defend():
    base = dict(num_clients=20, clients_per_round=10, rounds=10, local_epochs=2, personalize_steps=0, partition="iid",
                attack="sign-flip", malicious_fraction=0.2)
    clean = run(small_config(**{k: v for k, v in base.items() if k not in ("attack", "malicious_fraction")}))
    attacked = run(small_config(**base))
    defended = run(small_config(**base, aggregator="multi-krum"))
    clean_acc = clean.rows[-1]["global_accuracy"]
    assert attacked.rows[-1]["global_accuracy"] < clean_acc - 0.3
    assert defended.rows[-1]["global_accuracy"] > clean_acc - 0.1


def test_backdoor_run_reports_backdoor_accuracy():
    result = run(small_config(rounds=2, attack="backdoor", malicious_fraction=0.25))
    assert 0.0 <= result.rows[-1]["backdoor_accuracy"] <= 1.0
    with pytest.raises(Exception, match="go together"):
        small_config(attack="gaussian")
