"""Robust aggregation and availability under malicious clients (findings 15-19), and the
run folder's own defences (findings 20-24) beyond the bad-input table."""
import json
import logging
import os

import numpy as np
import pytest
import torch

from metafed.aggregate import RoundSkipped, cap_sample_weights
from metafed.aggregate.attention import Attention
from metafed.config import RunConfig
from metafed.data import load_dataset
from metafed.run import build_federation, run
from metafed.run_folder import RunFolderError
from tests.conftest import small_config


def _msgs(x):
    return {"update": {"w": x}}


def test_f_must_be_stated_for_rules_that_depend_on_it():
    for rule in ("krum", "multi-krum", "trimmed-mean", "bulyan"):
        with pytest.raises(Exception, match="needs --byzantine-f"):
            small_config(aggregator=rule)
    assert build_federation(small_config(aggregator="trimmed-mean", byzantine_f=1)).aggregator.f == 1


def test_attack_default_f_is_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="metafed"):
        fed = build_federation(small_config(aggregator="trimmed-mean", attack="sign-flip", malicious_fraction=0.25))
    assert fed.aggregator.f == 1 and "tolerates f = 1" in caplog.text


@pytest.mark.parametrize("lie", [-30.0, float("-inf"), float("nan"), float("inf")])
def test_attention_rejects_forged_loss_reports(lie):
    """Finding 16: a loss of -30 took all the weight; -inf made the model NaN forever."""
    x = torch.tensor([[1.0], [1.2], [0.8], [100.0]])
    loss = torch.tensor([0.5, 0.6, 0.4, lie])
    agg = Attention("loss")
    w = agg.weights(_msgs(x), torch.ones(4), loss)
    assert float(w[3]) == 0.0 and torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
    assert abs(float(agg(_msgs(x), torch.ones(4), loss)["update"]["w"][0]) - 1.0) < 0.3


def test_attention_loss_zero_liar_is_bounded_and_all_invalid_skips():
    x = torch.tensor([[1.0], [1.0], [100.0]])
    w = Attention("loss").weights(_msgs(x), torch.ones(3), torch.tensor([2.0, 2.0, 0.0]))
    assert float(w[2]) < 0.8  # at most the weight a perfect fit earns: bounded, not all of it
    with pytest.raises(RoundSkipped):
        Attention("loss").weights(_msgs(x), torch.ones(3), torch.tensor([float("nan")] * 3))


def test_one_client_claiming_a_billion_samples_does_not_become_the_mean():
    """Finding 17: by default a client claiming 1e9 samples became the mean."""
    reported = torch.tensor([50.0, 60.0, 40.0, 55.0, 1e9])
    w = cap_sample_weights(reported, 10.0)
    assert float(w[4]) == 10 * 55.0 and torch.equal(w[:4], reported[:4].double())
    fed = build_federation(small_config())
    assert fed.cfg.sample_weight_cap == 10.0  # on by default


def test_short_rounds_are_skipped_not_fatal(caplog):
    """Finding 18: a round with too few clients for Krum crashed the run before any checkpoint."""
    with caplog.at_level(logging.WARNING, logger="metafed"):
        result = run(small_config(aggregator="krum", byzantine_f=1, clients_per_round=5, dropout=0.4, rounds=2))
    assert all(r.get("round_skipped") == 1 for r in result.rows)
    assert "krum needs n >= 2f + 3" in caplog.text
    with pytest.raises(ValueError, match="needs at least 7"):
        build_federation(small_config(aggregator="bulyan", byzantine_f=1, clients_per_round=4))


def test_fltrust_root_is_a_server_held_split_not_client_data():
    """Finding 19: the root set was drawn from honest clients' data, which a server cannot know."""
    cfg = small_config(aggregator="fltrust", attack="label-flip", malicious_fraction=0.25, fltrust_root_size=50)
    ds = load_dataset(cfg)
    root_x, _ = ds.server_root
    client_rows = torch.cat([c.train_x for c in ds.clients] + [c.test_x for c in ds.clients])
    assert len(root_x) == 50 and sum(c.num_train + c.num_test for c in ds.clients) == 1797 - 50
    overlap = (torch.cdist(root_x, client_rows) == 0).any(dim=1)
    assert not overlap.any()  # no root sample is any client's sample
    run(small_config(aggregator="fltrust", rounds=1, fltrust_root_size=50))
    with pytest.raises(ValueError, match="heldout-fraction"):
        load_dataset(small_config(dataset="synthetic", aggregator="fltrust"))


def test_existing_run_is_refused_then_replaced_with_overwrite(tmp_path):
    """Finding 21: --out over an existing run silently replaced it, resume point included."""
    run(small_config(rounds=1, out=tmp_path / "r"))
    with pytest.raises(RunFolderError, match="--overwrite"):
        run(small_config(rounds=1, out=tmp_path / "r"))
    (tmp_path / "r" / "stale.txt").write_text("old")
    run(small_config(rounds=2, out=tmp_path / "r"), overwrite=True)
    assert not (tmp_path / "r" / "stale.txt").exists()
    assert json.loads((tmp_path / "r" / "checkpoint.json").read_text())["round"] == 2


def test_resume_does_not_write_through_a_planted_symlink(tmp_path):
    run(small_config(rounds=1, out=tmp_path / "r"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.replace(tmp_path / "r" / "metrics.jsonl", tmp_path / "m.jsonl")
    os.symlink(victim, tmp_path / "r" / "metrics.jsonl")
    run(RunConfig(rounds=2, progress=False), resume=tmp_path / "r")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "r" / "metrics.jsonl").is_symlink()


def test_checkpoint_pointer_cannot_delete_files_outside_the_run(tmp_path):
    """Finding 20: the next save deleted whatever the pointer's 'file' named."""
    run(small_config(rounds=1, out=tmp_path / "r"))
    victim = tmp_path / "victim.safetensors"
    victim.write_text("keep me")
    meta = json.loads((tmp_path / "r" / "checkpoint.json").read_text())
    meta["file"] = "../victim.safetensors"
    (tmp_path / "r" / "checkpoint.json").write_text(json.dumps(meta))
    from metafed.checkpoint import CheckpointError, save_checkpoint
    fed = build_federation(small_config(rounds=1))
    save_checkpoint(tmp_path / "r", 2, fed.state, fed.clients, {})
    assert victim.read_text() == "keep me"
    with pytest.raises(CheckpointError):
        meta["round"], meta["file"] = 3, "../victim.safetensors"
        (tmp_path / "r" / "checkpoint.json").write_text(json.dumps(meta))
        run(RunConfig(rounds=4, progress=False), resume=tmp_path / "r")


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    """Finding 24: a torn last line in metrics.jsonl (power loss) blocked resume."""
    full = run(small_config(rounds=3, out=tmp_path / "full"))
    run(small_config(rounds=2, out=tmp_path / "cut"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "global_acc')
    resumed = run(RunConfig(rounds=3, progress=False), resume=tmp_path / "cut")
    assert [r["round"] for r in resumed.rows] == [1, 2, 3]
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])


def test_resume_refuses_changed_settings_with_the_list(tmp_path):
    run(small_config(rounds=1, out=tmp_path / "r"))
    with pytest.raises(Exception, match=r"lr: 0.1 -> 0.5.*seed: 0 -> 3"):
        run(RunConfig(rounds=2, lr=0.5, seed=3), resume=tmp_path / "r")


def test_clients_per_round_above_federation_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="metafed"):
        build_federation(small_config(clients_per_round=50))
    assert "larger than the federation" in caplog.text
    assert np.isfinite(1.0)
