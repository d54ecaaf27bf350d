"""--loggers: each tracker adapter receives every round's metrics row, a resume continues
the same tracker run, DP runs send only what the guarantee covers, and a missing package
fails before the run folder is written. The trackers' packages are stand-ins here (CI does
not install them); the adapters were also run against tensorboard 2.21, mlflow-skinny 3 and
wandb 0.2x (offline) by hand."""
import sys
import types

import pytest

from metafed.run import run
from tests.conftest import small_config


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"), id="run-1",
                                         log=record_log, finish=lambda: None)
        def record_log(metrics, step):
            self.calls.append(("log", (metrics,), {"step": step}))
        return record


@pytest.fixture
def fake_trackers(monkeypatch):
    rec = Recorder()
    mlflow = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(mlflow, name, rec(name))
    wandb = types.ModuleType("wandb")
    wandb.init = rec("wandb.init")
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    return rec


def _steps(rec, name):
    return [kw["step"] for n, a, kw in rec.calls if n == name]


def test_every_round_reaches_the_trackers_and_resume_continues_their_runs(tmp_path, fake_trackers):
    out = tmp_path / "run"
    run(small_config(rounds=2, eval_every=2, loggers=["mlflow", "wandb"], out=out))
    assert _steps(fake_trackers, "log_metrics") == [1, 2] and _steps(fake_trackers, "log") == [1, 2]
    metrics = [a[0] for n, a, kw in fake_trackers.calls if n == "log_metrics"]
    assert "train_loss" in metrics[0] and "global_accuracy" not in metrics[0] and "global_accuracy" in metrics[1]
    start = [kw for n, a, kw in fake_trackers.calls if n == "start_run"]
    assert start == [{"run_id": None, "run_name": "run"}]
    fake_trackers.calls.clear()
    run(small_config(rounds=3), resume=out)
    assert [kw["run_id"] for n, a, kw in fake_trackers.calls if n == "start_run"] == ["run-1"]
    assert [kw["id"] for n, a, kw in fake_trackers.calls if n == "wandb.init"] == ["run-1"]
    assert _steps(fake_trackers, "log_metrics") == [3]
    assert not [c for c in fake_trackers.calls if c[0] == "log_params"]  # params once, at the start


def test_under_dp_trackers_get_only_the_released_keys(tmp_path, fake_trackers):
    run(small_config(rounds=2, loggers=["mlflow"], out=tmp_path / "dp", dp="central", dp_noise_multiplier=1.0,
                     client_sampling="poisson"))
    sent = [a[0] for n, a, kw in fake_trackers.calls if n == "log_metrics"]
    assert sent and all(set(m) <= {"epsilon", "dp_delta", "dp_noise_multiplier", "dp_clip",
                                   "dp_unclipped_fraction_noisy"} for m in sent)
    assert all("epsilon" in m for m in sent)


def test_a_missing_tracker_package_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="needs the wandb extra"):
        run(small_config(loggers=["wandb"], out=tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_dp_without_dp_accounting_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match="needs the dp extra"):
        run(small_config(dp="central", dp_noise_multiplier=1.0, out=tmp_path / "dp"))
    assert not (tmp_path / "dp").exists()
