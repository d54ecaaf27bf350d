"""Scale: seconds per round and peak RSS for W1 federations of 10^3 to 10^5 clients.

Each point is a fresh `metafed run` process (so its peak RSS is its own): the w1 dataset
(W1's clients, built on demand), MLP 60-200-10, 5 local epochs of SGD (lr 0.01, batch 10),
C clients per round, evaluation only at the last round on a seeded sample of 100 clients.
s/round is the median over rounds 2..R-1 (round 1 warms up, round R evaluates), from the
run's own wall-clock column. FedAvg, and Ditto (a personal model per client: client state
that grows with the clients touched, kept in RUN_DIR/clients and checkpointed
incrementally every round).

    python benchmarks/scale.py [--rounds 6] [--ray]          # one JSON line per point
    python benchmarks/scale.py --only 100000:1000:ditto --rounds 30 --memory-mb 256

--ray adds Ray (2 local workers) beside the vectorized backend at N = 10^4, C = 1000.
Run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POINTS = [(n, c, alg) for alg in ("fedavg", "ditto") for n in (1_000, 10_000, 100_000) for c in (100, 1_000)]


def run_point(n: int, c: int, alg: str, rounds: int, backend: str = "vectorized", memory_mb: float | None = None,
              ray_workers: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "metafed", "run", "--dataset", "w1", "--num-clients", str(n),
               "--clients-per-round", str(c), "--algorithm", alg, "--rounds", str(rounds), "--local-epochs", "5",
               "--batch-size", "10", "--lr", "0.01", "--eval-every", str(rounds), "--eval-clients", "100",
               "--no-eval-train-loss", "--backend", backend, "--out", str(out), "-q"]
        if alg == "ditto":
            cmd += ["--ditto-lambda", "0.1"]
        if memory_mb:
            cmd += ["--client-memory-mb", str(memory_mb)]
        if ray_workers:
            cmd += ["--ray-workers", str(ray_workers)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        total = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        wall = np.array([0.0] + [r["wall_time_s"] for r in rows])
        per_round = np.diff(wall)[1:-1]  # rounds 2..R-1
        disk = sum(p.stat().st_size for p in (out / "clients").iterdir()) if (out / "clients").is_dir() else 0
        return {"N": n, "C": c, "algorithm": alg, "backend": backend + (f"x{ray_workers}" if ray_workers else ""),
                "rounds": rounds, "sec_per_round": round(float(np.median(per_round)), 3),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "process_s": round(total, 1),
                "client_states_on_disk_mb": round(disk / 2**20, 1), "memory_cap_mb": memory_mb,
                "final_personalized_accuracy": rows[-1].get("personalized_accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--only", help="N:C:algorithm, one point")
    ap.add_argument("--memory-mb", type=float, default=None, help="--client-memory-mb for the runs")
    ap.add_argument("--ray", action="store_true", help="also Ray (2 workers) vs vectorized at N=10^4, C=1000")
    a = ap.parse_args()
    points = [tuple(int(v) if v.isdigit() else v for v in a.only.split(":"))] if a.only else POINTS
    for n, c, alg in points:
        print(json.dumps(run_point(n, c, alg, a.rounds, memory_mb=a.memory_mb)), flush=True)
    if a.ray:
        for backend, workers in (("vectorized", None), ("ray", 2)):
            print(json.dumps(run_point(10_000, 1_000, "fedavg", a.rounds, backend, ray_workers=workers)), flush=True)


if __name__ == "__main__":
    main()
