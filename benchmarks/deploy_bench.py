"""Deployment latency, bytes and server memory: metafed's ServerApp vs Flower's own FedAvg
strategy on the same Flower engine (one SuperLink, the same N SuperNodes, TLS + SuperNode
auth), the same model and node data; and the simulation of the same config.

Models: the W1 MLP (60-200-10 on metafed's synthetic data) and the FEMNIST CNN (LEAF's
2-conv CNN, 6.6 M parameters, ~26 MB, on MNIST partitions). FedAvg with
``local_steps`` SGD steps per client, every node trains every round, no evaluation rounds
(eval_every > rounds; metafed evaluates once after the last round, outside the timing).

    python benchmarks/deploy_bench.py --nodes 10 --rounds 3
    python benchmarks/deploy_bench.py --nodes 10 --rounds 4 --eval-every 1 --models w1-mlp

Systems: ``metafed-warm`` (each node ``metafed node``: one long-lived worker), the same with
secure aggregation, ``metafed-subprocess`` (Flower's default: a ClientApp process per
message), ``flower-subprocess`` (Flower's own FedAvg app), and ``simulation``.

Prints one JSON line per (model, system): seconds per round (median of the rounds after the
first), payload bytes per round, the SuperLink's socket+disk I/O per round (its read+write
syscalls, /proc/PID/io: the same meter for both systems), and the ServerApp's peak RSS.
Run on an otherwise idle machine."""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from metafed.config import RunConfig
from metafed.deploy.local import LocalDeployment

HERE = Path(__file__).resolve().parent
MODELS = {
    "w1-mlp": dict(dataset="synthetic", model="mlp", hidden=[200], lr=0.01, batch_size=10, local_steps=50),
    "femnist-cnn": dict(dataset="mnist", model="cnn", lr=0.01, batch_size=10, local_steps=5),
}


def superlink_io(deployment) -> int:
    text = Path(f"/proc/{deployment.superlink.pid}/io").read_text()
    fields = dict(line.split(": ") for line in text.splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def round_times(lines: list[str], pattern: str) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(pattern, line))]


def peak(lines: list[str]) -> float | None:
    found = [float(m.group(1)) for line in lines if (m := re.search(r"server_peak_rss_mib=([0-9.]+)", line))]
    return found[-1] if found else None


SYSTEMS = {  # name -> (app, warm nodes, config changes)
    "metafed-warm": ("metafed", True, {}),
    "metafed-warm-secagg": ("metafed", True, {"secure_aggregation": True, "secagg_range": 100.0}),
    "metafed-subprocess": ("metafed", False, {}),
    "flower-subprocess": ("flower", False, {}),
}


def measure(system: str, cfg: RunConfig, nodes: int, work: Path) -> dict:
    lines: list[str] = []
    app, warm, changes = SYSTEMS[system]
    cfg = cfg.updated(**changes)
    with LocalDeployment(nodes, cfg, work, insecure=False, warm=warm) as deployment:
        time.sleep(5)  # let the SuperNodes connect before the meter starts
        before = superlink_io(deployment)
        evals: list[float] = []
        if app == "metafed":
            code = deployment.submit(work / "out", False, 600.0, echo=lines.append, timeout=3000)
            times = round_times(lines, r"round \d+ trained in ([0-9.]+) s")
            evals = round_times(lines, r"round \d+ evaluated in ([0-9.]+) s")
        else:
            config_file = work / "flower-config.json"
            config_file.write_text(cfg.model_dump_json())
            code = deployment.submit_app(HERE / "flower_fedavg_app",
                                         f"config-file='{config_file}' num-nodes={nodes}", lines.append, 3000)
            times = round_times(lines, r"flower round \d+ trained in ([0-9.]+) s")
        io = superlink_io(deployment) - before
    if code != 0 or len(times) != cfg.rounds:
        raise SystemExit(f"{system} run failed (exit {code}, {len(times)} rounds timed):\n" + "\n".join(lines[-30:]))
    result = {"system": system, "s_per_round": statistics.median(times[1:] or times), "rounds": times,
              "superlink_io_mb_per_round": io / cfg.rounds / 1e6, "server_peak_rss_mib": peak(lines)}
    if evals:
        result.update(s_per_evaluation=statistics.median(evals[1:] or evals), evaluations=evals)
    if app == "metafed":
        row = json.loads((work / "out" / "metrics.jsonl").read_text().splitlines()[-1])
        result["payload_mb_per_round"] = (row["bytes_up_total"] + row["bytes_down_total"]) / cfg.rounds / 1e6
    return result


def simulate(cfg: RunConfig) -> dict:
    from metafed.run import build_federation

    fed = build_federation(cfg.updated(out=None))
    times, evals = [], []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        fed.state, _ = fed.step(fed.state, rnd)
        times.append(time.perf_counter() - t0)
        if rnd % cfg.eval_every == 0:
            t0 = time.perf_counter()
            fed.evaluate(rnd)
            evals.append(time.perf_counter() - t0)
    result = {"system": "simulation-loop", "s_per_round": statistics.median(times[1:] or times), "rounds": times}
    if evals:
        result.update(s_per_evaluation=statistics.median(evals[1:] or evals), evaluations=evals)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--systems", nargs="+", default=["simulation", *SYSTEMS], choices=["simulation", *SYSTEMS])
    ap.add_argument("--eval-every", type=int, default=0, help="evaluation rounds, timed apart (0: only after the last)")
    args = ap.parse_args()
    for name in args.models:
        cfg = RunConfig(algorithm="fedavg", num_clients=args.nodes, clients_per_round=args.nodes, rounds=args.rounds,
                        eval_every=args.eval_every or args.rounds + 1, progress=False, backend="loop", **MODELS[name])
        for system in args.systems:
            with tempfile.TemporaryDirectory(prefix="metafed-bench-") as tmp:
                out = simulate(cfg) if system == "simulation" else measure(system, cfg, args.nodes, Path(tmp))
            print(json.dumps({"model": name, "nodes": args.nodes, **out}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
