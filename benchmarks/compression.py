"""Accuracy vs bytes sent: dense uploads against top-k (with and without error feedback),
random-k, QSGD and 8-bit quantization. MNIST, 100 clients with Dirichlet(0.3) label skew,
MLP 784-100-10 (79,510 parameters), FedAvg, 10 clients per round, 20 local steps of batch
10, lr 0.05, standardised inputs.

    METAFED_DATA=../shared/data python benchmarks/compression.py [--rounds 100] [--seeds 2] [--part up|down]

Prints one table (final round, mean ± std over seeds) and writes docs/img/compression.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sweep import run_grid  # noqa: E402

METHODS = {
    "dense": {},
    "top-k 1 % + error feedback": dict(compress="topk:0.01", error_feedback=True),
    "top-k 1 %": dict(compress="topk:0.01"),
    "random-k 1 %": dict(compress="randk:0.01"),
    "random-k 1 % + error feedback": dict(compress="randk:0.01", error_feedback=True),
    "QSGD, 16 levels": dict(compress="qsgd:16"),
    "8-bit": dict(compress="q8"),
}
# --part down: the broadcast compressed too (--compress-down; the replica keeps what was left out)
DOWN = {
    "dense both ways": {},
    "8-bit down": dict(compress_down="q8"),
    "top-k 10 % down": dict(compress_down="topk:0.1"),
    "top-k 1 % + EF up, 8-bit down": dict(compress="topk:0.01", error_feedback=True, compress_down="q8"),
    "top-k 1 % + EF up, top-k 10 % down": dict(compress="topk:0.01", error_feedback=True, compress_down="topk:0.1"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/compression"))
    ap.add_argument("--img", type=Path, default=Path("../docs/img"))
    ap.add_argument("--part", choices=("up", "down"), default="up")
    a = ap.parse_args()
    base = dict(dataset="mnist", model="mlp", hidden=[100], num_clients=100, partition="dirichlet",
                dirichlet_alpha=0.3, standardize=True, clients_per_round=10, local_steps=20, batch_size=10, lr=0.05,
                rounds=a.rounds, eval_every=10, eval_clients=50, eval_train_loss=False, personalize_steps=0)
    key = lambda m: "".join(c for c in m if c.isalnum())  # noqa: E731
    grid = {f"{key(m)}-s{s}": {**cfg, "seed": s} for m, cfg in METHODS.items() for s in range(a.seeds)}
    if a.part == "down":
        return downlink(a, base, key)
    results = run_grid(a.out, base, grid)
    print(f"\nMNIST Dirichlet(0.3), 100 clients, MLP, FedAvg, {a.rounds} rounds, mean ± std over {a.seeds} seeds\n")
    print("| upload | global acc | MB up, total | bytes up vs dense |")
    print("|---|---|---|---|")
    dense_bytes = None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        runs = [results[k] for k in grid if k.startswith(f"{key(m)}-s")]
        acc = [r[-1]["global_accuracy"] for r in runs]
        sent = float(np.mean([r[-1]["bytes_up_total"] for r in runs]))
        dense_bytes = dense_bytes or sent
        print(f"| {m} | {np.mean(acc):.4f} ± {np.std(acc):.4f} | {sent / 1e6:.1f} | 1/{dense_bytes / sent:.0f} |")
        rows = [r for r in runs[0] if "global_accuracy" in r]
        ax.plot([r["bytes_up_total"] / 1e6 for r in rows], [r["global_accuracy"] for r in rows], marker=".", label=m)
    ax.set(xscale="log", xlabel="MB uploaded (cumulative, log scale)", ylabel="global test accuracy",
           title="Accuracy vs bytes sent (MNIST Dirichlet 0.3, 100 clients, seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    a.img.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.img / "compression.png", dpi=90)


def downlink(a, base: dict, key) -> None:
    grid = {f"down-{key(m)}-s{s}": {**cfg, "seed": s} for m, cfg in DOWN.items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print(f"\nMNIST Dirichlet(0.3), 100 clients, MLP, FedAvg, {a.rounds} rounds, mean ± std over {a.seeds} seeds\n")
    print("| upload / broadcast | global acc | MB up, total | MB down, total | bytes down vs dense |")
    print("|---|---|---|---|---|")
    dense_down = None
    for m in DOWN:
        last = [results[k][-1] for k in grid if k.startswith(f"down-{key(m)}-s")]
        acc = [r["global_accuracy"] for r in last]
        up, down = (float(np.mean([r[f"bytes_{d}_total"] for r in last])) for d in ("up", "down"))
        dense_down = dense_down or down
        print(f"| {m} | {np.mean(acc):.4f} ± {np.std(acc):.4f} | {up / 1e6:.1f} | {down / 1e6:.1f} | "
              f"1/{dense_down / down:.1f} |")


if __name__ == "__main__":
    main()
