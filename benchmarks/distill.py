"""Federated distillation vs FedAvg with heterogeneous client models: accuracy and bytes.

MNIST, 50 clients with Dirichlet(0.3) label skew, standardised inputs; half the clients
run an MLP 784-100-10 (79,510 parameters), half the small CNN (0.11 M parameters)
(``--client-models mlp:0.5,small-cnn:0.5``). 10 clients per round, 20 local steps of batch
32 at lr 0.05. FedAvg cannot mix architectures, so it runs each architecture alone;
"local only" is FD with gamma = 0 (every client trains alone). FedMD and FedDF draw 1,000
public inputs from the pool before partitioning (``--public-data pool``).

    METAFED_DATA=../shared/data python benchmarks/distill.py [--rounds 40] [--seeds 1]

Prints one table (final round, mean ± std over seeds).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sweep import run_grid

HETERO = dict(client_models="mlp:0.5,small-cnn:0.5")
METHODS = {
    "FedAvg, all MLP": dict(algorithm="fedavg", model="mlp"),
    "FedAvg, all small CNN": dict(algorithm="fedavg", model="small-cnn"),
    "local only (FD, gamma = 0)": dict(algorithm="fd", distill_weight=0.0, personalize_steps=0, **HETERO),
    "FD": dict(algorithm="fd", personalize_steps=0, **HETERO),
    "FedMD": dict(algorithm="fedmd", personalize_steps=0, **HETERO),
    "FedAvg per group (FedDF, 0 steps)": dict(algorithm="feddf", distill_steps=0, **HETERO),
    "FedDF": dict(algorithm="feddf", **HETERO),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/distill"))
    a = ap.parse_args()
    base = dict(dataset="mnist", hidden=[100], num_clients=50, partition="dirichlet", dirichlet_alpha=0.3,
                standardize=True, clients_per_round=10, local_steps=20, batch_size=32, lr=0.05, rounds=a.rounds,
                eval_every=10, eval_train_loss=False, personalize_steps=5)
    key = lambda m: "".join(c for c in m if c.isalnum())  # noqa: E731
    grid = {f"{key(m)}-s{s}": {**cfg, "seed": s} for m, cfg in METHODS.items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print(f"\nMNIST Dirichlet(0.3), 50 clients, {a.rounds} rounds, 10 per round, mean ± std over {a.seeds} seeds\n")
    print("| method | global acc | own / personalized acc (mean, p10) | MB up, total | MB down, total |")
    print("|---|---|---|---|---|")
    fmt = lambda xs: f"{np.mean(xs):.4f} ± {np.std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"  # noqa: E731
    for m in METHODS:
        last = [results[k][-1] for k in grid if k.startswith(f"{key(m)}-s")]
        glob = fmt([r["global_accuracy"] for r in last]) if "global_accuracy" in last[0] else "– (no global model)"
        pers = f"{fmt([r['personalized_accuracy'] for r in last])} ({np.mean([r['personalized_accuracy_p10'] for r in last]):.3f})"
        up = np.mean([r["bytes_up_total"] for r in last]) / 1e6
        down = np.mean([r["bytes_down_total"] for r in last]) / 1e6
        print(f"| {m} | {glob} | {pers} | {up:.2f} | {down:.2f} |")


if __name__ == "__main__":
    main()
