"""End to end on Flower's deployment engine: a real SuperLink and SuperNodes as separate
processes on 127.0.0.1 (TLS with a throwaway CA), started by ``metafed deploy-local``,
bounded in time. The deployment must equal the simulation (loop backend) of the same config."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from metafed.config import build_config  # noqa: E402
from metafed.run import run  # noqa: E402

CONFIG = """dataset: digits
rounds: 2
clients_per_round: 3
local_epochs: 1
batch_size: 16
hidden: [32]
personalize_steps: 2
"""


COMPRESSED = "compress: topk:0.1\nerror_feedback: true\ncompress_down: topk:0.2\n"
ASYNC = "mode: async\nasync_rule: fedasync\nclients_per_round: 1\nrounds: 3\n"


def _deploy_and_simulate(config: Path, out: Path, clients: int):
    """``metafed deploy-local`` of ``config`` into ``out`` with real processes, and the same
    config simulated on the loop backend: (the deployed final params, the simulation)."""
    done = subprocess.run([sys.executable, "-m", "metafed.cli", "deploy-local", "--clients", str(clients), "--config",
                           str(config), "--out", str(out), "--timeout", "360", "--round-timeout", "120"],
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sim = run(build_config(config, num_clients=clients, backend="loop", progress=False))
    return load_file(str(out / "final.safetensors")), sim


@pytest.mark.parametrize("algorithm,extra", [("fedavg", ""), ("ditto", ""), ("fedprox", "mu: 0.5\nrounds: 1\n"),
                                             ("maml", "local_steps: 3\nrounds: 1\n"), ("fedavg", COMPRESSED),
                                             ("fedavg", ASYNC)])
def test_deploy_local_equals_the_simulation(tmp_path, algorithm, extra):
    """fedavg; ditto (personal state kept on each SuperNode's own disk); fedprox; maml
    (second order, two batches per step); top-k uploads encoded on the nodes, residuals on
    their disks, bytes_up the encoded size; top-k broadcasts applied to the replicas the
    nodes keep (bytes_down the payloads); FedAsync over jobs pushed and pulled as they
    finish (one job at a time, so real arrival times cannot change the result)."""
    config = tmp_path / "run.yaml"
    base = CONFIG
    for line in ("rounds: 2\n", "clients_per_round: 3\n"):  # the case's own value replaces the default
        base = base.replace(line, "") if line.split(":")[0] in extra else base
    config.write_text(base + f"algorithm: {algorithm}\n" + extra)
    out = tmp_path / "deployed"
    deployed, sim = _deploy_and_simulate(config, out, 3)
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed[k], v, atol=1e-5, rtol=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "global_accuracy", "global_train_loss", "personalized_accuracy",
                "personalized_accuracy_p10", "clients_used", "bytes_up", "bytes_down"):
        assert rows[-1][key] == pytest.approx(sim.rows[-1][key], abs=1e-6), key
    assert json.loads((out / "checkpoint.json").read_text())["round"] == sim.rows[-1]["round"]
    assert not Path(out / "config.yaml").is_symlink()


def test_feddf_with_two_architectures_deploys_as_the_simulation(tmp_path):
    """Federated distillation between real processes: each SuperNode trains its group's
    architecture (MLP or logistic), the ServerApp holds the public inputs and distils on
    them; the final models of both groups and the metrics equal the simulation's."""
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG + "algorithm: {name: feddf, client_models: 'mlp:0.5,logistic:0.5', public_size: 60, "
                      "distill_steps: 3}\n")
    out = tmp_path / "deployed"
    deployed, sim = _deploy_and_simulate(config, out, 4)
    assert {k.split(".")[0] for k in deployed} == {"0", "1"}  # both groups' server models
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed[k], v, atol=1e-5, rtol=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "global_accuracy", "personalized_accuracy", "clients_used"):
        assert rows[-1][key] == pytest.approx(sim.rows[-1][key], abs=1e-6), key


def test_unauthenticated_supernode_is_refused(tmp_path):
    """SuperNode authentication is on with TLS: a node whose key is not on the SuperLink's
    allow-list never joins the federation."""
    import time

    from metafed.config import RunConfig
    from metafed.deploy.local import LocalDeployment, _tool

    with LocalDeployment(1, RunConfig(dataset="digits", num_clients=1), tmp_path, insecure=False) as deployment:
        rogue = deployment.start_node(7, register=False, partitions=1)
        deadline = time.monotonic() + 60
        nodes = []
        while time.monotonic() < deadline:
            listed = subprocess.run([_tool("flwr"), "supernode", "list", "metafed", "--format", "json"],
                                    env=deployment.env, capture_output=True, text=True, timeout=60)
            nodes = [n for n in json.loads(listed.stdout)["nodes"] if n["status"] == "online"]
            if len(nodes) >= 1 and rogue.poll() is not None:
                break
            time.sleep(2)
        assert len(nodes) == 1  # only the registered node
        assert rogue.poll() not in (None, 0)  # the rogue node gave up: refused by the SuperLink


def _committed_round(out) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _submit_until_commit(deployment, out, round_timeout, resume=False, rounds_done=1):
    """Submit a run in a thread; return (thread, exit codes) once ``rounds_done`` rounds are committed."""
    import threading
    import time

    codes = []
    runner = threading.Thread(target=lambda: codes.append(
        deployment.submit(out, resume, round_timeout, echo=lambda line: None, timeout=300)))
    runner.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _committed_round(out) < rounds_done:
        time.sleep(0.2)
    assert _committed_round(out) >= rounds_done, "no round was committed"
    return runner, codes


def test_serverapp_then_superlink_killed_with_sigkill_resume_to_the_uninterrupted_result(tmp_path):
    """kill -9 of the ServerApp after a committed round, resume; then kill -9 of the SuperLink
    (and with it the ServerApp) after the next commit: the SuperLink restarts on the same port
    and state database, the SuperNodes reconnect by themselves (the same processes), and the
    resumed run ends with the parameters of an uninterrupted run."""
    import os
    import signal

    from metafed.deploy.local import LocalDeployment

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 4") + "eval_every: 4\n")
    cfg = build_config(config, num_clients=3, backend="loop", progress=False)
    out = tmp_path / "deployed"
    with LocalDeployment(3, cfg.updated(out=out), tmp_path / "work", insecure=False,
                         persistent=True) as deployment:
        nodes = deployment.procs[1:4]
        first, _ = _submit_until_commit(deployment, out, 120.0)
        killed = subprocess.run(["pkill", "-9", "-f", "flwr-serverapp"], capture_output=True)
        assert killed.returncode == 0
        first.join(timeout=300)
        done = _committed_round(out)
        assert done < 4 and not (out / "summary.json").exists()  # it really died mid-run
        second, _ = _submit_until_commit(deployment, out, 120.0, resume=True, rounds_done=done + 1)
        os.killpg(deployment.superlink.pid, signal.SIGKILL)  # the coordinator dies: SuperLink and ServerApp
        subprocess.run(["pkill", "-9", "-f", "flwr-serverapp"], capture_output=True)
        second.join(timeout=120)
        assert _committed_round(out) < 4 and not (out / "summary.json").exists()
        deployment.start_superlink()
        assert all(node.poll() is None for node in nodes)  # the SuperNodes kept running, retrying
        # the SuperNodes reconnect with up to 20 s back-off and may first finish a dead run's message;
        # the run waits for all three (a run with fewer would train another federation)
        assert deployment.submit(out, True, 120.0, echo=print, timeout=400, connect_timeout=240) == 0
    sim = run(cfg)
    deployed = load_file(str(out / "final.safetensors"))
    for k, v in sim.params.items():
        torch.testing.assert_close(deployed[k], v, atol=1e-5, rtol=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # one row per round, each once across the kills
    assert [r["round"] for r in rows if "global_accuracy" in r] == [4]  # --eval-every 4


def test_supernode_killed_mid_round_is_dropped_and_the_run_finishes(tmp_path):
    import os
    import signal

    from metafed.deploy.local import LocalDeployment

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG + "eval_every: 2\n")
    cfg = build_config(config, num_clients=3, backend="loop", progress=False)
    out = tmp_path / "deployed"
    with LocalDeployment(3, cfg.updated(out=out), tmp_path / "work", insecure=True) as deployment:
        runner, codes = _submit_until_commit(deployment, out, 45.0)
        victim = deployment.procs[3]  # procs: SuperLink, then SuperNodes 0, 1, 2
        os.killpg(victim.pid, signal.SIGKILL)  # the node and its running ClientApp, in round 2
        runner.join(timeout=300)
    assert codes == [0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and rows[-1]["clients_used"] == 2
    assert (out / "summary.json").exists()


def test_secure_aggregation_between_real_processes_with_a_node_killed_mid_protocol(tmp_path, monkeypatch):
    """metafed's SecAgg between 4 real SuperNodes over TLS with SuperNode auth. One node is
    killed (kill -9, with its ClientApp) right after it shared its key shares: it never
    uploads, the others reveal its mask-key shares, and the sum over the 3 survivors is exact:
    the model equals the same round through the real ClientApp code with that node dead."""
    import os
    import signal
    import threading
    import time

    from metafed.deploy.local import LocalDeployment
    from tests.test_deploy_secagg import Nodes

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 1").replace("clients_per_round: 3", "clients_per_round: 4")
                      + "secure_aggregation: true\nsecagg_range: 1000.0\nsecagg_threshold: 3\n")
    cfg = build_config(config, num_clients=4, backend="loop", progress=False)
    out = tmp_path / "deployed"
    lines, killed = [], threading.Event()
    # the nodes wait 5 s before asking for a message again when none waited: the victim is killed
    # as soon as its own log says its share reply was sent, long before it could see the next stage
    with LocalDeployment(4, cfg.updated(out=out), tmp_path / "work", insecure=False, idle_poll=5.0) as deployment:
        victim, log = deployment.procs[3], tmp_path / "work" / "logs" / "supernode-2.log"

        def kill_after_share() -> None:
            while not killed.is_set() and victim.poll() is None:
                text = log.read_text(errors="replace") if log.exists() else ""
                stages = text.split("Sending: query.secagg message")
                if len(stages) >= 3 and "Sent successfully" in stages[2]:  # advertise, then share: sent
                    os.killpg(victim.pid, signal.SIGKILL)  # SuperNode of client 2, with its worker
                    killed.set()
                time.sleep(0.005)

        watcher = threading.Thread(target=kill_after_share, daemon=True)
        watcher.start()
        code = deployment.submit(out, False, 40.0, echo=lines.append, timeout=400)
    assert code == 0 and killed.is_set(), "\n".join(lines[-40:])
    assert any("secure aggregation upload: 3 of 4" in line for line in lines), "\n".join(lines[-40:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients_used"] == 3 and "round_skipped" not in rows[-1]
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # in-process reference messages
        monkeypatch.setattr(TaskIdentity, name, value)
    reference = Nodes(4, tmp_path / "reference")
    reference.dead_from[102] = "upload"
    expected = run(cfg, pool=reference.pool(cfg))
    deployed = load_file(str(out / "final.safetensors"))
    for k, v in expected.params.items():
        torch.testing.assert_close(deployed[k], v, atol=1e-5, rtol=0)


def test_every_client_keeps_its_signed_ledger_receipts(tmp_path):
    """--contribution size in deployment: the server's ledger verifies, and each SuperNode
    received, checked and kept exactly its own entries, byte for byte the server's."""
    from metafed.deploy.local import LocalDeployment
    from metafed.deploy.receipts import read_receipts
    from metafed.incentive.ledger import LEDGER_FILE, read, verify

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG + "contribution: size\n")
    cfg = build_config(config, num_clients=3, backend="loop", progress=False)
    out, work = tmp_path / "deployed", tmp_path / "work"
    with LocalDeployment(3, cfg.updated(out=out), work, insecure=True) as deployment:
        assert deployment.submit(out, False, 120.0, print, 360.0) == 0
    result = verify(out / LEDGER_FILE)
    assert result.ok and result.entries == 2 * 3  # 2 rounds x 3 clients
    _, entries = read(out / LEDGER_FILE)
    for client in range(3):
        kept = read_receipts(work / f"node-{client}", client)
        assert [{k: v for k, v in r.items() if k != "public_key"} for r in kept] == \
            [e for e in entries if e["client"] == client]
        assert all(r["public_key"] == result.public_key for r in kept)


def _processes_naming(folder: Path) -> list[int]:
    """Live processes whose command line names ``folder`` (the deployment's work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(int(entry.name))
    return found


def _wait_until(condition, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def test_sigterm_to_deploy_local_tears_every_process_down(tmp_path):
    """The SuperLink, the SuperNodes and their executors run in process groups of their own:
    a SIGTERM to deploy-local alone must still take all of them down."""
    import os
    import signal

    work_root = tmp_path / "tmp"
    work_root.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("rounds: 2\n", "rounds: 200\n"))
    proc = subprocess.Popen([sys.executable, "-m", "metafed.cli", "deploy-local", "--clients", "2", "--config",
                             str(config), "--out", str(tmp_path / "out")], env={**os.environ, "TMPDIR": str(work_root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_until(lambda: len(_processes_naming(work_root)) >= 3, 120), "the deployment never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        assert _wait_until(lambda: not _processes_naming(work_root), 30), _processes_naming(work_root)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_naming(work_root):
            os.kill(pid, signal.SIGKILL)


def test_a_failed_start_leaks_no_process(tmp_path, monkeypatch):
    from metafed.deploy.local import LocalDeployment

    started = []
    original = LocalDeployment.start_node

    def second_node_fails(self, i, *args, **kwargs):
        if i == 1:
            raise RuntimeError("the second SuperNode could not start")
        started.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(LocalDeployment, "start_node", second_node_fails)
    work = tmp_path / "work"
    work.mkdir()
    cfg = build_config(num_clients=2, clients_per_round=2)
    with pytest.raises(RuntimeError, match="second SuperNode"):
        with LocalDeployment(2, cfg, work, insecure=False):
            pass
    assert started == [0]
    assert _wait_until(lambda: not _processes_naming(work), 30), _processes_naming(work)
