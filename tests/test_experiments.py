"""Experiment outputs: `metafed sweep` over a grid (restartable, validated up front) and the
per-client CSV of a run folder (named clients, truncated on resume)."""
import csv
import json

from typer.testing import CliRunner

from metafed.cli import app

runner = CliRunner()
TINY = ["--num-clients", "4", "--clients-per-round", "2", "--local-steps", "1", "--rounds", "1", "--hidden", "16"]


def test_sweep_runs_every_point_then_continues_without_rerunning(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--grid", "lr=0.05,0.1", "--grid", "algorithm=fedavg,reptile", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    points = ["lr=0.05,algorithm=fedavg", "lr=0.05,algorithm=reptile", "lr=0.1,algorithm=fedavg",
              "lr=0.1,algorithm=reptile"]
    assert json.loads((out / "sweep.json").read_text())["points"] == points
    for name in points:
        assert (out / name / "summary.json").exists()
    table = (out / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in points)
    before = (out / points[0] / "metrics.jsonl").stat().st_mtime_ns
    (out / points[-1] / "summary.json").unlink()  # as if the sweep was stopped during the last point
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "done before, kept" in res.output and "[4/4] lr=0.1,algorithm=reptile: resuming" in res.output
    assert (out / points[0] / "metrics.jsonl").stat().st_mtime_ns == before


def test_sweep_refuses_a_bad_point_before_running_anything(tmp_path):
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["sweep", *TINY, "--algorithm", "fedprox", "--grid", "mu=0.1,0", "--out", str(out)])
    assert res.exit_code == 2 and "sweep point mu=0" in res.output and "needs --mu > 0" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["sweep", *TINY, "--grid", "lr", "--out", str(out)])
    assert res.exit_code == 2 and "KEY=V1,V2" in res.output
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    res = runner.invoke(app, ["sweep", *TINY, "--grid", "lr=0.1", "--out", str(other)])
    assert res.exit_code == 2 and "not a sweep folder" in res.output


def test_clients_csv_names_each_client_and_is_truncated_on_resume(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", *TINY, "--rounds", "2", "--heldout-fraction", "0.25", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "clients.csv").open()))
    train = [r for r in rows if r["kind"] == "train"]
    new = [r for r in rows if r["kind"] == "new"]
    assert [r["round"] for r in train].count("2") == 3 and len(new) == 2  # 3 training clients, 1 new, 2 rounds
    assert all(r["client"].startswith("digits-") for r in rows)
    assert all(r["new_k0"] and r["new_k10"] and not r["global_accuracy"] for r in new)
    summary = json.loads((out / "summary.json").read_text())
    final = [r for r in train if r["round"] == "2"]
    assert [float(r["global_accuracy"]) for r in final] == summary["per_client_accuracy"]["global"]
    # a crash after round 2 logged its rows but before its checkpoint: the resume drops them
    (out / "clients.csv").write_text((out / "clients.csv").read_text() + "3,digits-0,train,0.5,0.5,,,,\n")
    res = runner.invoke(app, ["run", "--resume", str(out), "--rounds", "3", "-q"])
    assert res.exit_code == 0, res.output
    rounds = [r["round"] for r in csv.DictReader((out / "clients.csv").open())]
    assert rounds.count("3") == 4 and rounds.count("2") == 4


def test_plots_of_a_run_and_of_a_run_with_no_evaluation_yet(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", *TINY, "--rounds", "2", "--eval-every", "2", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    for name in ("accuracy.png", "loss.png", "bytes.png", "client_accuracy_hist.png", "client_scatter.png",
                 "client_labels.png"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and "train_loss" in rows[0] and "global_accuracy" not in rows[0]
    counts = json.loads((out / "summary.json").read_text())["client_label_counts"]
    assert len(counts) == 4 and len(counts[0]) == 10
    (out / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # as if stopped before the first evaluation
    res = runner.invoke(app, ["plot", str(out)])
    assert res.exit_code == 2 and "no evaluated round yet" in res.output


def test_dp_run_plots_epsilon_and_keeps_label_counts_out(tmp_path):
    out = tmp_path / "dp"
    res = runner.invoke(app, ["run", *TINY, "--rounds", "2", "--dp", "central", "--dp-noise-multiplier", "1.0",
                              "--client-sampling", "poisson", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "epsilon.png").exists()
    assert json.loads((out / "summary.json").read_text())["client_label_counts"] is None
