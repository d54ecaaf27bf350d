"""Run folder, resume == uninterrupted, and the CLI's clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from metafed.checkpoint import CheckpointError
from metafed.cli import app
from metafed.run import run
from tests.conftest import small_config

runner = CliRunner()


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    result = run(small_config(out=out, heldout_fraction=0.25))
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "final.safetensors", "summary.json",
                 "accuracy.png", "loss.png", "client_accuracy_hist.png", "new_clients.png"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for key in ("global_accuracy", "global_loss", "personalized_accuracy", "personalized_accuracy_p10",
                "train_loss", "wall_time_s", "bytes_up", "bytes_down", "new_client_accuracy_k5"):
        assert key in rows[-1], key
    # bytes: 4 sampled clients each receive and send every float32 parameter
    n_bytes = 4 * sum(v.numel() for v in result.params.values())
    assert rows[0]["bytes_down"] == 4 * n_bytes and rows[0]["bytes_up"] == 4 * n_bytes
    final = load_file(str(out / "final.safetensors"))
    assert set(final) == set(result.params)


def test_resume_equals_uninterrupted(tmp_path):
    full = run(small_config(rounds=6, out=tmp_path / "full", algorithm="fedavg", server_optimizer="adam",
                            server_lr=0.05))
    run(small_config(rounds=3, out=tmp_path / "cut", algorithm="fedavg", server_optimizer="adam", server_lr=0.05))
    # simulate a crash mid-round 4: a stray metrics row past the checkpoint is dropped on resume
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 4, "global_accuracy": 0.0}) + "\n")
    resumed = run(small_config(rounds=6), resume=tmp_path / "cut")
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    assert [r["round"] for r in resumed.rows] == [1, 2, 3, 4, 5, 6]
    assert resumed.rows[-1]["global_accuracy"] == full.rows[-1]["global_accuracy"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run(small_config(rounds=1, out=tmp_path / "r"))
    (tmp_path / "r" / "checkpoint-1.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        run(small_config(rounds=2), resume=tmp_path / "r")


def _cli(*args):
    return runner.invoke(app, list(args))


def test_cli_loop_and_vectorized_write_equal_params(tmp_path):
    common = ["run", "--rounds", "2", "--num-clients", "6", "--clients-per-round", "3", "--seed", "4",
              "--no-progress", "--set", "hidden=[16]"]
    for backend in ("loop", "vectorized"):
        res = _cli(*common, "--backend", backend, "--out", str(tmp_path / backend))
        assert res.exit_code == 0, res.output
    a, b = (load_file(str(tmp_path / be / "final.safetensors")) for be in ("loop", "vectorized"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["--algorithm", "fedsgdx"], "unknown algorithm 'fedsgdx'"),
    (["--dataset", "imagenet"], "dataset"),
    (["--rounds", "0"], "rounds"),
    (["--lr", "-1"], "lr"),
    (["--set", "roudns=3"], "unknown config key 'roudns'"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, needle):
    res = _cli("run", "--no-progress", "--out", str(tmp_path / "x"), *args)
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output


def test_cli_config_file_typo_and_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rounds: 2\nlocal_epoch: 3\n")
    res = _cli("run", "--config", str(cfg), "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "unknown config key 'local_epoch'" in res.output
    cfg.write_text("rounds: [\n")
    res = _cli("run", "--config", str(cfg), "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "not valid YAML" in res.output


def test_cli_resume_missing_folder(tmp_path):
    res = _cli("run", "--resume", str(tmp_path / "nope"), "--no-progress")
    assert res.exit_code == 2 and "config.yaml" in res.output


def test_cli_lists():
    assert "fedprox" in _cli("algorithms").output
    assert "synthetic" in _cli("datasets").output


def test_resume_keeps_personal_client_state(tmp_path):
    common = dict(algorithm="ditto", ditto_lambda=0.5, server_optimizer="yogi", server_lr=0.1)
    full = run(small_config(rounds=4, out=tmp_path / "full", **common))
    run(small_config(rounds=2, out=tmp_path / "cut", **common))
    resumed = run(small_config(rounds=4), resume=tmp_path / "cut")
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    assert resumed.rows[-1]["personalized_accuracy"] == full.rows[-1]["personalized_accuracy"]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "reptile", "maml", "fomaml", "meta-sgd", "per-fedavg-fo",
                                  "per-fedavg-hf", "personalized-fedavg", "pfedme", "ditto", "meta-updater"])
def test_cli_every_algorithm_writes_personalized_and_new_client_metrics(tmp_path, name):
    res = _cli("run", "--algorithm", name, "--dataset", "digits", "--rounds", "2", "--num-clients", "8",
               "--clients-per-round", "3", "--heldout-fraction", "0.25", "--set", "hidden=[16]",
               "--no-progress", "--out", str(tmp_path / name), *(["--mu", "0.1"] if name == "fedprox" else []))
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("personalized_accuracy", "new_client_accuracy_k0", "new_client_accuracy_k10"):
        assert 0.0 <= row[key] <= 1.0, key


def test_a_run_folder_in_use_refuses_a_second_writer(tmp_path):
    """An orphaned process still writing a run folder (e.g. a ServerApp that outlived its
    SuperLink): a resume of the same folder is refused with a clear error, nothing written."""
    from metafed.run import run
    from metafed.run_folder import exclusive
    from tests.conftest import small_config

    out = tmp_path / "r"
    run(small_config(rounds=1, out=out))
    before = (out / "metrics.jsonl").read_text()
    with exclusive(out):  # the other writer
        import subprocess
        import sys

        code = ("import sys; from metafed.run import run; from metafed.config import RunConfig\n"
                f"run(RunConfig(rounds=2, progress=False), resume={str(out)!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "in use by another metafed process" in done.stderr
    assert (out / "metrics.jsonl").read_text() == before
    run(small_config(rounds=2), resume=out)  # free again: the resume goes ahead


def test_seeds_then_compare_write_their_outputs(tmp_path):
    """--seeds 0,1 runs the config twice (OUT/seed-K) and writes mean ± std; `metafed compare`
    overlays the runs and tabulates final, best and rounds to a target."""
    out = tmp_path / "multi"
    res = _cli("run", "--dataset", "digits", "--rounds", "2", "--num-clients", "6", "--clients-per-round", "3",
               "--set", "hidden=[8]", "--no-progress", "--seeds", "0,1", "--out", str(out))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "seeds.json").read_text())
    values = summary["global_accuracy"]["values"]
    assert len(values) == 2 and summary["global_accuracy"]["mean"] == pytest.approx(sum(values) / 2)
    assert (out / "seed-1" / "final.safetensors").exists()
    res = _cli("compare", str(out / "seed-0"), str(out / "seed-1"), "--out", str(tmp_path / "cmp"), "--target", "0.0")
    assert res.exit_code == 0, res.output
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| seed-0 |" in table and "| seed-1 |" in table and "| 1 |" in table  # target 0 reached in round 1
    assert (tmp_path / "cmp" / "compare_global_accuracy.png").exists()
    assert _cli("run", "--dataset", "digits", "--seeds", "0,x", "--out", str(tmp_path / "bad")).exit_code == 2


def test_plot_without_an_evaluated_round_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    res = _cli("plot", str(tmp_path))
    assert res.exit_code == 2 and "no evaluated round yet" in res.output


def test_importing_metafed_does_not_load_the_dp_accountant():
    """dp-accounting and SciPy load only when a run uses DP (lazy import, fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, metafed; print(sorted(m for m in ('dp_accounting', 'scipy', 'flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
