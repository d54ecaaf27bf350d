"""``metafed node``: the warm SuperNode (process isolation, one long-lived worker) and its
shortened Flower waits. The deployments that run through it end to end, equal to the
simulation, are in tests/test_deploy_e2e.py (deploy-local uses warm nodes by default)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from metafed.config import build_config  # noqa: E402
from metafed.deploy.supernode_polls import patch_supernode_waits, shortened_time  # noqa: E402
from metafed.deploy.warm_node import NodeArgsError, supernode_command  # noqa: E402
from metafed.run import run  # noqa: E402
from tests.test_deploy_e2e import CONFIG, _submit_until_commit  # noqa: E402


def test_the_node_command_line_keeps_process_isolation_and_a_loopback_runtime_api():
    command, runtime = supernode_command(["--superlink", "10.0.0.1:9092", "--insecure"], idle_poll=0.25)
    assert command[:3] == [sys.executable, "-m", "metafed.deploy.supernode_polls"]
    assert command[command.index("--") + 1:command.index("--") + 3] == ["--isolation", "process"]
    assert command[command.index("--idle-poll") + 1] == "0.25"
    port = command[command.index("--port") + 1]
    assert runtime == f"127.0.0.1:{port}"
    command, runtime = supernode_command(["--port", "9555", "--isolation", "process"])
    assert runtime == "127.0.0.1:9555" and command.count("--isolation") == 1
    with pytest.raises(NodeArgsError, match="--isolation subprocess is not possible"):
        supernode_command(["--isolation", "subprocess"])
    with pytest.raises(NodeArgsError, match="--host is not possible"):
        supernode_command(["--host", "0.0.0.0"])
    with pytest.raises(NodeArgsError, match="must be positive"):
        supernode_command([], idle_poll=0)


def test_only_flowers_two_fixed_waits_are_shortened(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = shortened_time(idle_poll=0.2, reply_poll=0.01)
    for seconds in (3, 0.5, 1.7):
        clock.sleep(seconds)
    assert slept == [0.2, 0.01, 1.7]
    assert clock.monotonic is time.monotonic and clock.time is time.time

    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    assert patch_supernode_waits(0.2, 0.01)  # Flower 1.42's loop is the one it was written for
    assert loop.time is not time and loop.time.sleep is not time.sleep


def test_a_worker_that_dies_is_restarted_and_the_run_finishes_as_the_simulation(tmp_path):
    """SIGKILL to one node's worker between rounds: ``metafed node`` starts a new one, which
    serves the node's next messages from the same state folder, and the run ends with the
    simulation's parameters (no message was in flight, so nothing was lost)."""
    from metafed.deploy.local import LocalDeployment

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 3") + "algorithm: ditto\n")
    cfg = build_config(config, num_clients=3, backend="loop", progress=False)
    out = tmp_path / "deployed"
    with LocalDeployment(3, cfg.updated(out=out), tmp_path / "work", insecure=True) as deployment:
        node = deployment.procs[1]
        runner, codes = _submit_until_commit(deployment, out, 60.0)
        workers = subprocess.run(["pgrep", "-P", str(node.pid), "-f", "metafed.deploy.worker"],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == 1
        os.kill(int(workers[0]), signal.SIGKILL)
        runner.join(timeout=300)
        log = (tmp_path / "work" / "logs" / "supernode-0.log").read_text()
    assert codes == [0]
    assert "the worker exited with code -9; restarting it" in log
    sim = run(cfg)
    deployed = load_file(str(out / "final.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 3 and rows[-1]["clients_used"] == 3  # the new worker served the last round
    if all(r["clients_used"] == 3 for r in rows):  # the kill fell between messages (almost always)
        for k, v in sim.params.items():
            torch.testing.assert_close(deployed[k], v, atol=1e-5, rtol=0)


def _bundle(clientapp: str) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("pyproject.toml", f'[tool.flwr.app.components]\nclientapp = "{clientapp}"\n')
        bundle.writestr("metafed/deploy/client_app.py", "raise SystemExit('the bundle code ran')\n")
    return buffer.getvalue()


def test_a_warm_node_runs_only_the_client_apps_its_operator_allows_from_its_own_packages():
    """The app bundle names the ClientApp; the node decides whether it runs it, and imports it
    from its own installed packages (a bundle shipping a module of the same name is not run)."""
    from metafed.deploy import client_app
    from metafed.deploy.served_app import ClientAppRefused, served_client_app

    assert served_client_app(_bundle("metafed.deploy.client_app:app")) is client_app.app
    with pytest.raises(ClientAppRefused, match="names the ClientApp 'thief:client_app': this node serves only"):
        served_client_app(_bundle("thief:client_app"))
    with pytest.raises(ClientAppRefused, match="is not a Flower ClientApp"):
        served_client_app(_bundle("metafed.deploy.client_app:log"), ("metafed.deploy.client_app:log",))
    with pytest.raises(ClientAppRefused, match="names no ClientApp"):
        served_client_app(b"not a zip")
