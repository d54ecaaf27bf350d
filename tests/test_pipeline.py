"""The aggregation pipeline (metafed.pipeline): the chain refuses a wrong order when built,
each config gets the stages it asks for, the stages compute what their papers say (by hand),
their state lives in named slots that checkpoints keep (old checkpoints migrate), and a new
stage is one class."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from metafed.aggregate import RoundSkipped, make_aggregator
from metafed.algorithms.base import ServerState
from metafed.checkpoint import load_checkpoint, save_checkpoint
from metafed.client_store import ClientStore
from metafed.pipeline import Chain, ChainError, Flow, RoundContext, ServerStage, build_chain
from metafed.pipeline.stages import CentralNoise, ClippedSum, DivideByWeight, Gate, LocalDPReport, Rule, SecureSum
from metafed.privacy.dp import ClientDP
from metafed.privacy.noise import PrivacyRandom
from metafed.run import run
from tests.conftest import small_config


def _context(metrics: dict | None = None, **overrides) -> RoundContext:
    def refuse(*_):
        raise AssertionError("this stage should not need the round for that")

    parts = dict(secure_sum=refuse, empty_message=refuse, root_update=refuse, label_counts=refuse,
                 privacy_random=lambda stream: PrivacyRandom.insecure_reproducible(0, 1, stream))
    parts.update(overrides)
    return RoundContext(1, {} if metrics is None else metrics, **parts)


def _flow(rows: np.ndarray, weights=None) -> Flow:
    x = torch.from_numpy(rows)
    w = torch.ones(len(rows), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return Flow(list(range(len(rows))), {"update": {"w": x}}, w, torch.zeros(len(rows)))


# ---------------------------------------------------------------- the order is checked when built
def test_a_non_linear_rule_cannot_follow_a_secure_sum():
    with pytest.raises(ChainError, match=r"Rule\(RobustAggregator\) is not linear.*after SecureSum"):
        Chain((Gate(), SecureSum(), Rule(make_aggregator("median", byzantine_f=1))))
    Chain((Gate(), SecureSum(), DivideByWeight()))  # linear after the sum: accepted


def test_central_noise_needs_a_clipping_sum_before_it():
    dp = ClientDP("central", 1.0, 4.0)
    with pytest.raises(ChainError, match="CentralNoise calibrates to a norm bound"):
        Chain((Gate(), Rule(make_aggregator("mean")), CentralNoise(dp, 1.0)))
    with pytest.raises(ChainError, match="CentralNoise calibrates to a norm bound"):
        Chain((Gate(), CentralNoise(dp, 1.0), ClippedSum()))  # clipped after the noise: too late
    Chain((Gate(), ClippedSum(), CentralNoise(dp, 1.0)))


def test_an_encoder_cannot_come_before_a_secure_sum():
    with pytest.raises(ChainError, match="client encoder 'topk:0.1' before SecureSum"):
        Chain((Gate(), SecureSum(), DivideByWeight()), client_encoder="topk:0.1")
    Chain((Gate(), Rule(make_aggregator("mean"))), client_encoder="topk:0.1")


def test_two_stages_cannot_share_a_slot():
    dp = ClientDP("central", 1.0, 4.0)
    with pytest.raises(ChainError, match="share a state slot"):
        Chain((ClippedSum(), CentralNoise(dp, 1.0), CentralNoise(dp, 1.0)))


@pytest.mark.parametrize("overrides, stages", [
    ({}, (Gate, Rule)),
    ({"secure_aggregation": True}, (Gate, SecureSum, DivideByWeight)),
    ({"dp": "local", "dp_noise_multiplier": 0.5}, (Gate, LocalDPReport, Rule)),
    ({"dp": "local", "dp_noise_multiplier": 0.5, "secure_aggregation": True},
     (Gate, LocalDPReport, SecureSum, DivideByWeight)),
    ({"dp": "central", "dp_noise_multiplier": 0.5}, (Gate, ClippedSum, CentralNoise)),
    ({"dp": "central", "dp_noise_multiplier": 0.5, "secure_aggregation": True}, (Gate, SecureSum, CentralNoise)),
])
def test_each_config_gets_its_stages(overrides, stages):
    cfg = small_config(**overrides)
    dp = ClientDP(cfg.dp, 0.5, 4.0) if cfg.dp else None
    chain = build_chain(cfg, dp, make_aggregator("mean"))
    assert tuple(type(s) for s in chain.stages) == stages


# ---------------------------------------------------------------- the stages' numbers, by hand
def test_clipped_sum_and_central_noise_at_zero_noise_is_the_clipped_sum_over_m():
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])  # norms 5, 0.5, 2
    clip, m = 1.0, 4.0
    chain = Chain((Gate(), ClippedSum(), CentralNoise(ClientDP("central", 0.0, m), clip)))
    result, slots = chain.run(_flow(rows), _context(), {})
    norms = np.linalg.norm(rows, axis=1)
    expected = (rows * np.minimum(1.0, clip / norms)[:, None]).sum(0) / m  # fixed denominator m, not C
    np.testing.assert_allclose(result["update"]["w"].numpy(), expected, rtol=1e-12)
    assert float(slots["central-dp"]["clip"]) == clip  # not adaptive: the clip stays


def test_adaptive_clip_moves_by_the_geometric_rule_in_its_slot():
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])  # one of three at or below C = 1
    dp = ClientDP("central", 0.0, 3.0, adaptive=True, target_quantile=0.5, clip_lr=0.2, count_std=1e-12)
    chain = Chain((Gate(), ClippedSum(), CentralNoise(dp, 1.0)))
    _, slots = chain.run(_flow(rows), _context(), {"central-dp": {"clip": torch.tensor(1.0, dtype=torch.float64)}})
    fraction = (1 - 0.5 * 3) / 3 + 0.5  # the centred count over m, plus 1/2: 1/3
    assert float(slots["central-dp"]["clip"]) == pytest.approx(np.exp(-0.2 * (fraction - 0.5)), rel=1e-9)


def test_secure_sum_then_division_is_the_weighted_mean():
    rows = np.array([[1.0, 2.0], [3.0, -1.0]])
    weights = np.array([1.0, 3.0])
    seen = {}

    def secure_sum(transform, weighting):  # what the clients' own stages and the protocol return
        seen.update(transform=transform, weighting=weighting)
        total = (rows * weights[:, None]).sum(0)
        return {"message": {"update": {"w": torch.from_numpy(total)}}, "weight": torch.tensor(weights.sum())}, [0, 1]

    metrics = {}
    chain = Chain((Gate(), SecureSum("samples"), DivideByWeight()))
    result, _ = chain.run(Flow([0, 1], None, None, None), _context(metrics, secure_sum=secure_sum), {})
    np.testing.assert_allclose(result["update"]["w"].numpy(), (rows * weights[:, None]).sum(0) / 4, rtol=1e-6)
    assert seen["weighting"] == "samples" and seen["transform"].identity and metrics["clients_used"] == 2


def test_under_central_dp_the_clients_clip_to_the_norm_the_noise_stage_owns():
    seen = {}

    def secure_sum(transform, weighting):
        seen.update(transform=transform)
        return {"message": {"update": {"w": torch.zeros(2, dtype=torch.float64)}}, "count": torch.tensor(0.5)}, [0]

    dp = ClientDP("central", 0.0, 2.0, adaptive=True, count_std=1.0)
    chain = Chain((Gate(), SecureSum(), CentralNoise(dp, 1.0)))
    chain.run(Flow([0], None, None, None), _context(secure_sum=secure_sum),
              {"central-dp": {"clip": torch.tensor(0.25, dtype=torch.float64)}})
    assert seen["transform"].clip == 0.25 and seen["transform"].count_bit


def test_the_gate_skips_rounds_below_min_clients_and_central_dp_releases_empty_rounds():
    with pytest.raises(RoundSkipped, match="fewer than --min-clients 3"):
        Gate(3).apply(_flow(np.ones((2, 2))), _context(), {})
    with pytest.raises(RoundSkipped, match="0 valid replies"):
        Gate(1).apply(Flow([], None, None, None), _context(), {})
    empty = Flow([], None, None, None)
    assert Gate(3, release_empty=True).apply(empty, _context(), {})[0] is empty
    with pytest.raises(RoundSkipped):  # some replies but too few: skipped even under central DP
        Gate(3, release_empty=True).apply(_flow(np.ones((2, 2))), _context(), {})


# ---------------------------------------------------------------- a new stage is one class
@dataclass(frozen=True)
class MedianOfMeans(ServerStage):
    """A clipping-free robust rule: split the clients into ``groups``, average each group,
    take the coordinate-wise median of the group means (not linear)."""

    groups: int = 2
    linear = False

    def apply(self, flow, ctx, slot):
        x = flow.rows["update"]["w"]
        means = torch.stack([part.mean(0) for part in torch.tensor_split(x, self.groups)])
        return replace(flow, result={"update": {"w": means.median(0).values}}), slot


def test_a_new_stage_is_one_class_and_the_chain_checks_it_too():
    rows = np.array([[1.0], [3.0], [100.0], [102.0], [5.0], [7.0]])
    result, _ = Chain((Gate(), MedianOfMeans(3))).run(_flow(rows), _context(), {})
    assert float(result["update"]["w"][0]) == 6.0  # group means 2, 101, 6
    with pytest.raises(ChainError, match="MedianOfMeans is not linear"):
        Chain((Gate(), SecureSum(), MedianOfMeans(3)))


# ---------------------------------------------------------------- slots in the server state
def test_stage_slots_round_trip_through_checkpoints_and_old_keys_migrate(tmp_path):
    params = {"w": torch.ones(2)}
    state = ServerState(params, {}, {"meta.u": torch.zeros(2)},
                        {"central-dp": {"clip": torch.tensor(0.7, dtype=torch.float64)},
                         "privacy-ledger": {"ledger": torch.tensor([1.0, 1.5], dtype=torch.float64)}})
    (tmp_path / "new").mkdir()
    save_checkpoint(tmp_path / "new", 2, state, ClientStore(), {})
    back = load_checkpoint(tmp_path / "new").state
    assert set(back.extra) == {"meta.u"} and float(back.stages["central-dp"]["clip"]) == 0.7
    assert back.stages["privacy-ledger"]["ledger"].tolist() == [1.0, 1.5]
    # a checkpoint written before the pipeline kept the same state under extra's string keys
    old = ServerState(params, {}, {"dp.clip": torch.tensor(0.7, dtype=torch.float64),
                                   "dp.ledger": torch.tensor([1.0, 1.5], dtype=torch.float64)})
    (tmp_path / "old").mkdir()
    save_checkpoint(tmp_path / "old", 2, old, ClientStore(), {})
    migrated = load_checkpoint(tmp_path / "old").state
    assert migrated.extra == {} and float(migrated.stages["central-dp"]["clip"]) == 0.7
    assert migrated.stages["privacy-ledger"]["ledger"].tolist() == [1.0, 1.5]


def test_a_central_dp_run_keeps_its_clip_and_ledger_in_their_slots():
    cfg = small_config(dp="central", dp_noise_multiplier=0.8, dp_clip=0.5, dp_adaptive_clip=True, dp_count_noise=2.0,
                       rounds=2, eval_every=2)
    state = run(cfg).federation.state
    assert not any(k.startswith("dp.") for k in state.extra)
    assert state.stages["privacy-ledger"]["ledger"].tolist() == pytest.approx([0.8, 0.8])
    assert float(state.stages["central-dp"]["clip"]) != 0.5  # adapted by the noisy count each round
