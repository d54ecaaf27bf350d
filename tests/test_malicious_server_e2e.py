"""A malicious server against metafed's real nodes, with real processes: a SuperLink, four
warm SuperNodes (``metafed node``) each with its own policy in its node config, and a
ServerApp (tests/malicious_server_app) that sends each node what an honest server never
would, and then a run whose app bundle ships its own ClientApp. Every attack must get a
refusal naming the node's policy, never the data it asks for. (The same attacks through the handlers in-process, with the honest control cases:
tests/test_node_policy.py, tests/test_secagg_floor.py.)"""
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from metafed.config import RunConfig  # noqa: E402
from metafed.deploy.policy import run_sha256  # noqa: E402

APP = Path(__file__).resolve().parent / "malicious_server_app"
THIEF = Path(__file__).resolve().parent / "thief_app"


def test_every_attack_of_a_malicious_server_is_refused_by_the_real_nodes(tmp_path):
    from metafed.deploy.local import LocalDeployment

    cfg = RunConfig(dataset="digits", rounds=1, num_clients=4, clients_per_round=4, hidden=[32], batch_size=16,
                    local_steps=2, backend="loop", progress=False)
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chmod(planted, 0o777)  # a state folder anyone on the machine can write to
    config_file, out = tmp_path / "run.json", tmp_path / "out"
    config_file.write_text(cfg.model_dump_json())
    # every node holds its SecAgg identity (deploy-local's set-up for a secure run); node 0 keeps
    # local DP, node 2 pinned the run, node 3 was given a planted state folder
    policies = {0: "dp-clip=0.1 dp-noise-multiplier=1.0", 2: f"run-sha256='{run_sha256(cfg)}'",
                3: f"state-dir='{planted}'"}
    with LocalDeployment(4, cfg.updated(secure_aggregation=True, secagg_range=1000.0), tmp_path / "work",
                         insecure=False, node_extra=policies) as deployment:
        code = deployment.submit_app(APP, f"config-file='{config_file}' out='{out}' num-nodes=4", echo=print,
                                     timeout=400)
        # a run whose bundle ships its own ClientApp (one that replies the node's data)
        thief = deployment.submit_app(THIEF, f"config-file='{config_file}' out='{out}' num-nodes=4", echo=print,
                                      timeout=400)
        logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "work" / "logs").glob("supernode-*.log")}
    assert code == 0 and thief == 0
    loot = json.loads((out / "loot.json").read_text())
    assert len(loot) == 4 and all("serves only metafed.deploy.client_app:app" in r.get("error", "") for r in loot), loot
    results = json.loads((out / "attacks.json").read_text())
    refused = {
        "omitted transform": "never sends an unclipped, unnoised update",
        "insecure flag": "did not opt in",
        "labels query": "does not share them",
        "hold=False": "never replies an upload in the clear",
        "cohort of one": "at least 3 clients",
        "unpinned run": "this node is pinned to",
        "planted state folder": "writable",
    }
    for attack, reason in refused.items():
        assert "error" in results[attack] and reason in results[attack]["error"], (attack, results[attack])
    assert results["held for a secure sum"] == {"content": ["meta"]}  # held: no upload, no loss in the clear
    assert results["pinned run"] == {"content": ["meta"]}  # the run it agreed to is served (held for SecAgg)
    assert "node policy: refused" in "".join(logs.values())  # and each node logged why
