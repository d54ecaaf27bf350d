"""Reproduction: LEAF FEMNIST subset (105 writers), CNN, with 20 % of writers held out as
new clients that never train: FedAvg vs Reptile vs MAML vs Meta-SGD vs Per-FedAvg.

Reference: LEAF-style FEMNIST runs report FedAvg ~74.7 % vs Reptile ~80.2 % (personalized).
Each method reports global accuracy, personalized accuracy (5 local steps on train data)
and new-client accuracy after k = 0, 1, 5, 10 adaptation steps.

    METAFED_DATA=../shared/data python benchmarks/femnist_repro.py [--rounds 100] [--seeds 3]

Cost: the FEMNIST CNN (6.6 M parameters) needs ~100 MFLOP per sample; on 2 CPU cores a
round of 10 writers x 1 epoch takes ~10-20 s, so the full grid is a multi-hour job
(use --compile, or a GPU host with the same command).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sweep import run_grid

METHODS = {
    "FedAvg": dict(algorithm="fedavg", lr=0.05),
    "Reptile": dict(algorithm="reptile", lr=0.05, server_lr=0.5),
    "MAML": dict(algorithm="maml", inner_lr=0.05, lr=0.05),
    "Meta-SGD": dict(algorithm="meta-sgd", inner_lr=0.05, lr=0.01),
    "Per-FedAvg (FO)": dict(algorithm="per-fedavg-fo", inner_lr=0.05, lr=0.01),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/femnist"))
    a = ap.parse_args()
    base = dict(dataset="femnist", model="cnn", heldout_fraction=0.2, clients_per_round=10, local_epochs=1,
                batch_size=10, rounds=a.rounds, eval_every=10, personalize_steps=5, compile=True)
    grid = {f"femnist-{m.replace(' ', '').replace('(', '').replace(')', '')}-s{s}": {**cfg, "seed": s}
            for m, cfg in METHODS.items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print("| method | global acc | personalized acc | new clients k=0 | k=1 | k=5 | k=10 |")
    print("|---|---|---|---|---|---|---|")
    for m in METHODS:
        key = m.replace(" ", "").replace("(", "").replace(")", "")
        rows = [results[k][-1] for k in grid if k.startswith(f"femnist-{key}-")]
        cell = lambda f: f"{np.mean([r[f] for r in rows]):.4f} ± {np.std([r[f] for r in rows]):.4f}"  # noqa: E731
        print(f"| {m} | {cell('global_accuracy')} | {cell('personalized_accuracy')} | "
              + " | ".join(cell(f"new_client_accuracy_k{k}") for k in (0, 1, 5, 10)) + " |")


if __name__ == "__main__":
    main()
