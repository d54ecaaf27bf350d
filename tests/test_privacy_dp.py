"""Differential privacy: accountant against published values, clipping, noise, adaptive clip."""
import math

import numpy as np
import pytest
import torch

from metafed.privacy.accountant import PrivacyAccountant, calibrate_noise
from metafed.privacy.dp import ClientDP, clip_each, client_norms, update_noise_multiplier
from metafed.privacy.noise import PrivacyRandom
from metafed.run import run
from tests.conftest import small_config


def test_rdp_accountant_matches_published_value():
    # Abadi et al. 2016 / TF Privacy: z = 1.5, q = 0.04, 2250 steps, delta = 1e-5 -> eps ~ 7.329 (RDP)
    acc = PrivacyAccountant(1.5, num_clients=2500, clients_per_round=100, delta=1e-5, sampling="poisson")
    assert acc.epsilon(2250) == pytest.approx(7.329, abs=2e-3)


def test_pld_gaussian_composition_matches_published_value():
    import dp_accounting as dpa
    from dp_accounting import pld

    acc = pld.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(math.sqrt(3)), 3)  # three Gaussians of sigma sqrt(3) == one of sigma 1
    assert acc.get_delta(1.0) == pytest.approx(0.126936, abs=1e-5)
    ours = PrivacyAccountant(1.0, 10, 10, 0.126936, sampling="poisson", method="pld")
    assert ours.epsilon(1) == pytest.approx(1.0, abs=1e-3)  # q = 1: a plain Gaussian, inverse of the above


def test_fixed_size_sampling_is_charged_more_than_poisson():
    fixed = PrivacyAccountant(1.0, 1000, 10, 1e-5, sampling="fixed").epsilon(100)
    poisson = PrivacyAccountant(1.0, 1000, 10, 1e-5, sampling="poisson").epsilon(100)
    assert fixed > poisson > 0
    assert PrivacyAccountant(1.0, 1000, 10, 1e-5).epsilon(200) > fixed


def test_target_epsilon_calibration():
    z = calibrate_noise(3.0, rounds=50, num_clients=500, clients_per_round=20, delta=1e-5, sampling="poisson")
    acc = lambda noise: PrivacyAccountant(noise, 500, 20, 1e-5, "poisson").epsilon(50)  # noqa: E731
    assert acc(z) <= 3.0 < acc(z * 0.99)


def test_every_clipped_update_has_norm_at_most_clip():
    g = torch.Generator().manual_seed(0)
    stacked = {"update": {"a": torch.randn(50, 7, 3, generator=g) * torch.logspace(-3, 2, 50).view(-1, 1, 1),
                          "b": torch.randn(50, 11, generator=g)}}
    clipped, norms = clip_each(stacked, 0.7)
    after = client_norms(clipped)
    assert (after <= 0.7 * (1 + 1e-6)).all()
    small = norms <= 0.7
    torch.testing.assert_close(after[small], norms[small])  # small updates are untouched


def test_central_noise_std_within_one_percent():
    dp = ClientDP("central", noise_multiplier=1.3, expected_clients=10.0)
    zeros = {"update": {"w": torch.zeros(10, 1_200_000)}}
    mean, _, _ = dp.aggregate(zeros, clip=2.0, rand=PrivacyRandom.secure_fresh())
    expected = 1.3 * 2.0 / 10.0
    assert float(mean["update"]["w"].std()) == pytest.approx(expected, rel=0.01)


def test_local_noise_std_within_one_percent():
    dp = ClientDP("local", noise_multiplier=0.5, expected_clients=4.0)
    private = dp.privatize({"update": {"w": torch.zeros(4, 300_000)}}, 3.0, [PrivacyRandom.secure_fresh() for _ in range(4)])
    assert float(private["update"]["w"].std()) == pytest.approx(1.5, rel=0.01)


def test_adaptive_clip_tracks_the_median_within_50_rounds():
    rng = np.random.default_rng(0)
    dp = ClientDP("central", noise_multiplier=1.0, expected_clients=100.0, adaptive=True)
    clip, gen = 0.1, PrivacyRandom.insecure_reproducible(3)  # Andrew et al.: C0 = 0.1, eta_C = 0.2
    median = math.exp(1.0)  # update norms ~ LogNormal(1, 0.5): median e
    for _ in range(50):
        norms = torch.from_numpy(rng.lognormal(1.0, 0.5, 100))
        stacked = {"update": {"w": norms.view(-1, 1).float()}}  # a 1-D message of norm |w|
        _, clip, _ = dp.aggregate(stacked, clip, gen)
    assert abs(clip - median) / median < 0.10


def test_adaptive_effective_noise_formula():
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="count noise"):
        update_noise_multiplier(4.0, 1.0)


def test_dp_run_reports_epsilon_every_round_and_resume_reports_the_same(tmp_path):
    common = dict(dp="central", dp_clip=0.5, dp_noise_multiplier=0.8, dp_adaptive_clip=True, dp_count_noise=2.0, eval_every=2,
                  clients_per_round=4, insecure_reproducible_privacy=True)  # bit-equal resume needs seeded noise
    full = run(small_config(rounds=4, out=tmp_path / "full", **common))
    assert [r["round"] for r in full.rows] == [1, 2, 3, 4]
    eps = [r["epsilon"] for r in full.rows]
    assert all(b > a > 0 for a, b in zip(eps, eps[1:]))
    run(small_config(rounds=2, out=tmp_path / "cut", **common))
    resumed = run(small_config(rounds=4), resume=tmp_path / "cut")
    assert [r["epsilon"] for r in resumed.rows] == eps
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])
    assert resumed.rows[-1]["dp_clip"] == full.rows[-1]["dp_clip"] != 0.5  # adaptive clip state resumed


def test_target_epsilon_run_and_config_errors():
    result = run(small_config(dp="central", target_epsilon=8.0, rounds=2, client_sampling="poisson"))
    assert result.rows[-1]["epsilon"] <= 8.0 + 1e-9
    with pytest.raises(Exception, match="exactly one"):
        small_config(dp="central")
    with pytest.raises(Exception, match="aggregator mean"):
        small_config(dp="central", dp_noise_multiplier=1.0, aggregator="attention")


def test_local_dp_run_is_finite_and_differs_from_clean():
    clean = run(small_config(rounds=2))
    local = run(small_config(rounds=2, dp="local", dp_clip=1.0, dp_noise_multiplier=0.3))
    assert not torch.equal(clean.params["out.weight"], local.params["out.weight"])
    assert all(torch.isfinite(v).all() for v in local.params.values())
